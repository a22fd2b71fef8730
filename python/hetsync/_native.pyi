"""Type hints of the native module (the classes are documented in their docstrings)."""

from os import PathLike
from typing import Any, Iterable, Optional, Sequence, Union

import numpy as np
import numpy.typing as npt

__version__: str

Shape = Union[int, Sequence[int]]
Float32Array = npt.NDArray[np.float32]

class HetSyncError(RuntimeError):
    """A Het-Sync operation failed; the message is the Rust error's."""

class Worker:
    """A worker's connection to a Het-Sync server: push gradients, pull models."""

    def __init__(
        self,
        server: str,
        rank: Optional[int] = None,
        *,
        dims: Sequence[Shape],
        workers: Optional[int] = None,
        transport: str = "auto",
        secret_file: Optional[Union[str, PathLike[str]]] = None,
        connect_timeout: float = 60.0,
        rdma_device: Optional[str] = None,
        gid_index: Optional[int] = None,
    ) -> None: ...
    @property
    def rank(self) -> int: ...
    @property
    def workers(self) -> int: ...
    @property
    def shapes(self) -> list[list[int]]: ...
    @property
    def dims(self) -> list[int]: ...
    @property
    def transport(self) -> str: ...
    @property
    def finished(self) -> bool: ...
    @property
    def clock_count(self) -> int: ...
    def round(self, key: int) -> int: ...
    def pull(self, key: int, out: Optional[Float32Array] = None) -> Float32Array: ...
    def gradient(self, key: int) -> Float32Array: ...
    def push(self, key: int, grad: Optional[Float32Array] = None) -> None: ...
    def clock(self) -> None: ...
    def step(self, grads: Optional[Iterable[Float32Array]] = None) -> list[Float32Array]: ...
    def close(self) -> None: ...

class Server:
    """A Het-Sync server on a thread of this process."""

    def __init__(
        self,
        workers: int,
        dims: Sequence[Shape],
        *,
        policy: str = "timeout",
        timeout_ms: float = 10.0,
        staleness: int = 3,
        late: str = "fold",
        lr: float = 0.1,
        rounds: Optional[int] = None,
        seconds: Optional[float] = None,
        listen: str = "127.0.0.1:0",
        transport: str = "auto",
        partition_bytes: int = 524288,
        secret_file: Optional[Union[str, PathLike[str]]] = None,
        start_after_ms: Optional[float] = None,
        evict_after_ms: Optional[float] = None,
        log: bool = False,
        init: Optional[Sequence[Float32Array]] = None,
    ) -> None: ...
    @property
    def address(self) -> str: ...
    @property
    def transport(self) -> str: ...
    @property
    def policy(self) -> str: ...
    @property
    def running(self) -> bool: ...
    def wait(self, timeout: Optional[float] = None) -> Optional[dict[str, Any]]: ...
    def stop(self) -> Optional[dict[str, Any]]: ...
