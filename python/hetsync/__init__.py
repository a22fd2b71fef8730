"""Het-Sync from Python: a worker client for training loops and an in-process server.

A worker pushes each tensor's gradient and pulls its model::

    import numpy as np
    import hetsync

    with hetsync.Worker("10.0.0.1:7070", dims=[(64, 10), 10]) as w:   # rank from Slurm
        W, b = w.pull(0), w.pull(1)          # read-only views of the link's model buffers
        while not w.finished:
            gW, gb = compute_gradients(W, b)  # float32 arrays of the tensors' shapes
            W, b = w.step([gW, gb])           # push both, tick the clock, wait for both

The server (``hetsync server`` on a cluster, or :class:`Server` in this process) sums the
gradients with SIMD and applies ``model -= lr * mean(gradients)`` under the synchronisation
policy it was started with: ``naive``, ``timeout``, ``adaptive`` (round barriers that do not
wait for stragglers) or ``bsp``/``ssp``/``asp`` (vector clocks).
"""

from types import TracebackType
from typing import Optional, Type, TypeVar

from . import _native
from ._native import HetSyncError, __version__

__all__ = ["HetSyncError", "Server", "Worker", "__version__"]

_T = TypeVar("_T", bound="_Closes")


class _Closes:
    """``with`` support: leaving the block calls ``close()``, also on an exception."""

    def __enter__(self: _T) -> _T:
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> bool:
        if exc_type is None:
            self.close()  # type: ignore[attr-defined]
        else:
            # Leaving on an error: close as well as possible, and let that error through
            # rather than one from saying goodbye on a connection it may have broken.
            try:
                self.close()  # type: ignore[attr-defined]
            except HetSyncError:
                pass
        return False


class Worker(_Closes, _native.Worker):
    __doc__ = _native.Worker.__doc__


class Server(_Closes, _native.Server):
    __doc__ = _native.Server.__doc__

    def close(self) -> None:
        """Stops the server, like ``stop()``, discarding the report."""
        self.stop()
