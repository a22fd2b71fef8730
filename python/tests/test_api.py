"""The Python API against a real in-process server over loopback TCP: results, zero-copy
buffers, the GIL released while waiting, and every error a user can make."""

import gc
import os
import signal
import threading
import time

import numpy as np
import pytest

import hetsync

SHAPES = [(3, 2), 4]


def addr_of(buf: np.ndarray) -> int:
    return buf.__array_interface__["data"][0]


def run_threads(fns, timeout=30.0):
    """Runs each fn on its own thread; fails (instead of hanging) if one does not finish."""
    errors, threads = [], []

    def wrap(fn):
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    for fn in fns:
        t = threading.Thread(target=wrap, args=(fn,), daemon=True)
        t.start()
        threads.append(t)
    for t in threads:
        t.join(timeout)
        assert not t.is_alive(), "a worker thread hung (is the GIL held while waiting?)"
    if errors:
        raise errors[0]


def test_two_workers_on_threads_train_to_the_sgd_result():
    # Two workers in one process: each wait must release the GIL, or the other never pushes
    # and the naive barrier never closes.
    with hetsync.Server(2, SHAPES, policy="naive", lr=0.5, rounds=3) as server:
        finals = {}

        def worker(rank):
            with hetsync.Worker(server.address, rank, dims=SHAPES, transport="tcp") as w:
                models = [w.pull(0), w.pull(1)]
                assert models[0].shape == (3, 2) and models[1].shape == (4,)
                while not w.finished:
                    models = w.step([m - np.float32(1.0) for m in models])
                finals[rank] = [m.copy() for m in models]
                assert w.round(0) == 3

        run_threads([lambda: worker(0), lambda: worker(1)])
        report = server.wait(timeout=10)
    assert report["rounds"] == 3 and report["pushes_applied"] == 12
    for rank in (0, 1):
        # Three SGD steps at rate 0.5 from 0 towards 1: 1 - 0.5^3.
        for m in finals[rank]:
            np.testing.assert_array_equal(m, np.full(m.shape, 0.875, np.float32))


def test_models_are_read_only_views_of_one_buffer_and_gradients_can_be_written_in_place():
    with hetsync.Server(1, SHAPES, policy="naive", lr=1.0, rounds=2) as server:
        with hetsync.Worker(server.address, 0, dims=SHAPES, transport="tcp") as w:
            with pytest.raises(hetsync.HetSyncError, match="pull\\(1\\) before pushing it"):
                w.push(1, np.zeros(4, np.float32))  # its first model is not in yet
            m0 = w.pull(0)
            w.pull(1)
            with pytest.raises(ValueError):
                m0[0, 0] = 1.0  # read-only
            assert isinstance(m0.base, hetsync.Worker)  # a view; the worker keeps it alive
            g = w.gradient(0)
            assert g.flags.writeable and g.shape == (3, 2)
            g[...] = 2.0  # computed in place: push(0) sends it without a copy
            w.push(0)
            w.push(1, np.arange(4, dtype=np.float32))
            again = w.pull(0)
            assert addr_of(again) == addr_of(m0)  # the same buffer, updated in place
            np.testing.assert_array_equal(m0, np.full((3, 2), -2.0, np.float32))
            np.testing.assert_array_equal(w.pull(1), -np.arange(4, dtype=np.float32))
            assert addr_of(w.gradient(0)) == addr_of(g)
            # step() hands out the same buffers again.
            models = w.step([np.zeros((3, 2), np.float32), np.zeros(4, np.float32)])
            assert [addr_of(m) for m in models] == [addr_of(m0), addr_of(w.pull(1))]
            out = np.empty((3, 2), np.float32)
            got = w.pull(0, out=out)
            assert got is out and addr_of(out) != addr_of(m0)
            np.testing.assert_array_equal(out, m0)
        # The arrays outlive the worker object.
        del w
        gc.collect()
        assert float(m0.sum()) == -12.0


def test_wrong_input_raises_the_matching_python_error_with_the_rust_message():
    with hetsync.Server(1, SHAPES, policy="naive", rounds=1) as server:
        with hetsync.Worker(server.address, 0, dims=SHAPES, transport="tcp") as w:
            w.pull(0)
            w.pull(1)
            with pytest.raises(TypeError, match="float32 NumPy array, got float64"):
                w.push(0, np.zeros((3, 2)))
            with pytest.raises(TypeError, match="float32"):
                w.push(0, [1.0] * 6)
            with pytest.raises(ValueError, match=r"shape \[5\]; the job's tensor has shape \[3, 2\]"):
                w.push(0, np.zeros(5, np.float32))
            with pytest.raises(ValueError, match=r"shape \[2, 3\]; the job's tensor has shape"):
                w.push(0, np.zeros((2, 3), np.float32))  # the right size, the wrong shape
            with pytest.raises(ValueError, match="pull\\(0\\)'s out is read-only"):
                w.pull(0, out=w.pull(0))
            with pytest.raises(IndexError, match="key 2 out of range: the job has 2 tensors"):
                w.pull(2)
            with pytest.raises(ValueError, match="step\\(\\) got 1 gradients; the job has 2"):
                w.step([np.zeros(6, np.float32)])
            w.push(0, np.zeros(6, np.float32))  # flat is fine too
            with pytest.raises(hetsync.HetSyncError, match="pull\\(0\\) before pushing it"):
                w.push(0, np.zeros(6, np.float32))
            with pytest.raises(hetsync.HetSyncError, match="pull\\(0\\) first"):
                w.gradient(0)
            w.close()
            with pytest.raises(hetsync.HetSyncError, match="worker 0 is closed"):
                w.pull(0)
            with pytest.raises(hetsync.HetSyncError, match="closed"):
                w.push(1, np.zeros(4, np.float32))
            w.close()  # twice is fine


def test_vector_clock_workers_must_tick_between_iterations():
    with hetsync.Server(1, [4], policy="ssp", staleness=2, lr=1.0, rounds=3) as server:
        with hetsync.Worker(server.address, 0, dims=[4], transport="tcp") as w:
            w.pull(0)
            w.push(0, np.ones(4, np.float32))
            np.testing.assert_array_equal(w.pull(0), np.full(4, -1.0, np.float32))
            with pytest.raises(hetsync.HetSyncError, match="call clock\\(\\) between iterations"):
                w.push(0, np.ones(4, np.float32))
            w.clock()
            assert w.clock_count == 1
            w.push(0, np.ones(4, np.float32))
            np.testing.assert_array_equal(w.pull(0), np.full(4, -2.0, np.float32))


def test_the_server_starts_from_the_initial_model_given():
    init = [np.arange(6, dtype=np.float32).reshape(3, 2), np.full(4, 7.0, np.float32)]
    with hetsync.Server(1, SHAPES, policy="naive", rounds=1, init=init) as server:
        with hetsync.Worker(server.address, 0, dims=SHAPES, transport="tcp") as w:
            np.testing.assert_array_equal(w.pull(0), init[0])
            np.testing.assert_array_equal(w.pull(1), init[1])
    with pytest.raises(ValueError, match="init has 1 arrays; the job has 2 tensors"):
        hetsync.Server(1, SHAPES, init=init[:1])
    with pytest.raises(TypeError, match=r"init\[1\] must be a float32"):
        hetsync.Server(1, SHAPES, init=[init[0], np.zeros(4)])


def test_bad_configuration_and_unreachable_servers_say_what_to_do(monkeypatch):
    with pytest.raises(ValueError, match="policy must be one of naive, timeout"):
        hetsync.Server(2, [4], policy="fast")
    with pytest.raises(ValueError, match="ssp needs staleness >= 1"):
        hetsync.Server(2, [4], policy="ssp", staleness=0)
    with pytest.raises(ValueError, match="late must be"):
        hetsync.Server(2, [4], late="later")
    with pytest.raises(ValueError, match="transport must be"):
        hetsync.Worker("127.0.0.1:1", 0, dims=[4], transport="udp")
    with pytest.raises(ValueError, match="dims must list every tensor"):
        hetsync.Worker("127.0.0.1:1", 0, dims="abc")
    with pytest.raises(hetsync.HetSyncError, match="invalid configuration"):
        hetsync.Server(0, [4])
    monkeypatch.delenv("SLURM_PROCID", raising=False)
    with pytest.raises(ValueError, match="no rank: pass rank=..., or run under Slurm"):
        hetsync.Worker("127.0.0.1:1", dims=[4])
    # Nothing listens on port 1: the connection error names the server.
    with pytest.raises(hetsync.HetSyncError, match="worker 0 joining 127.0.0.1:1"):
        hetsync.Worker("127.0.0.1:1", 0, dims=[4], transport="tcp", connect_timeout=0.2)


def test_rank_and_job_size_come_from_slurm(monkeypatch):
    monkeypatch.setenv("SLURM_PROCID", "1")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    with hetsync.Server(2, [4], policy="naive", rounds=1) as server:
        got = {}

        def worker(rank):
            w = hetsync.Worker(server.address, rank, dims=[4], transport="tcp")
            got[rank] = (w.rank, w.workers)
            w.pull(0)
            w.step()
            w.close()

        def slurm_worker():
            w = hetsync.Worker(server.address, dims=[4], transport="tcp")
            got["slurm"] = (w.rank, w.workers)
            w.pull(0)
            w.step()
            w.close()

        run_threads([lambda: worker(0), slurm_worker])
    assert got["slurm"] == (1, 2)
    assert got[0] == (0, 0)  # a rank given: Slurm's job size is not applied to it
    monkeypatch.setenv("SLURM_PROCID", "2")
    with pytest.raises(ValueError, match="rank 2 is not below the job's 2 workers"):
        hetsync.Worker("127.0.0.1:1", dims=[4])


def test_a_job_secret_admits_its_workers_and_refuses_others(tmp_path):
    secret, wrong = tmp_path / "secret", tmp_path / "wrong"
    for path, text in [(secret, "a" * 32), (wrong, "b" * 32)]:
        path.write_text(text)
        path.chmod(0o600)
    with hetsync.Server(1, [4], policy="naive", rounds=1, secret_file=secret) as server:
        with pytest.raises(hetsync.HetSyncError, match="does not match this worker's secret"):
            hetsync.Worker(server.address, 0, dims=[4], transport="tcp", secret_file=wrong,
                           connect_timeout=1.0)
        with pytest.raises(hetsync.HetSyncError, match="admits only workers that know"):
            hetsync.Worker(server.address, 0, dims=[4], transport="tcp", connect_timeout=1.0)
        with hetsync.Worker(server.address, 0, dims=[4], transport="tcp",
                            secret_file=str(secret)) as w:
            w.pull(0)
            w.step([np.ones(4, np.float32)])
        assert server.wait(timeout=10)["rounds"] == 1
    with pytest.raises(hetsync.HetSyncError, match="reading the job's secret"):
        hetsync.Server(1, [4], secret_file=tmp_path / "missing")


def test_gradients_in_any_memory_layout_arrive_in_logical_order():
    # Column-major, transposed and reversed views (some of the gradient buffer itself) are
    # copied in the order their indices say, never in memory order.
    ramp = np.arange(6, dtype=np.float32).reshape(3, 2)
    with hetsync.Server(1, SHAPES, policy="naive", lr=1.0, rounds=4) as server:
        with hetsync.Worker(server.address, 0, dims=SHAPES, transport="tcp") as w:
            w.pull(0)
            w.pull(1)
            expected = np.zeros((3, 2), np.float32)
            cases = [
                lambda: np.asfortranarray(ramp),                  # column-major
                lambda: np.ascontiguousarray(ramp.T).T,          # a transposed view
                lambda: w.gradient(0).__setitem__(..., ramp[::-1]) or w.gradient(0)[::-1],
                lambda: ramp.ravel()[::-1].copy()[::-1],         # a reversed view, flat
            ]
            for make in cases:
                g = make()
                w.push(0, g)
                w.push(1, np.zeros(4, np.float32))
                expected -= ramp
                np.testing.assert_array_equal(w.pull(0), expected)
                w.pull(1)
            f = np.empty((3, 2), np.float32, order="F")
            w.pull(0, out=f)
            np.testing.assert_array_equal(f, expected)


def test_ctrl_c_interrupts_a_wait_and_the_wait_resumes():
    with hetsync.Server(2, [4], policy="naive", rounds=1) as server:
        w = hetsync.Worker(server.address, 0, dims=[4], transport="tcp")
        # The first model waits for the second worker, which has not come: a SIGINT must
        # end the wait (the GIL is released, signals are looked at every 100 ms).
        timer = threading.Timer(0.3, lambda: os.kill(os.getpid(), signal.SIGINT))
        timer.start()
        began = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            w.pull(0)
        assert time.monotonic() - began < 10, "the wait was not interrupted"
        other = threading.Thread(target=lambda: hetsync.Worker(server.address, 1, dims=[4],
                                                               transport="tcp").pull(0))
        other.start()
        np.testing.assert_array_equal(w.pull(0), np.zeros(4, np.float32))  # resumed
        other.join(30)
        w.close()


def test_stop_from_another_thread_ends_a_wait_on_the_server():
    server = hetsync.Server(1, [4], policy="naive")
    got = {}
    waiter = threading.Thread(target=lambda: got.setdefault("report", server.wait()))
    waiter.start()
    time.sleep(0.2)
    assert server.running
    report = server.stop()
    waiter.join(30)
    assert not waiter.is_alive() and not server.running
    assert got["report"] == report and report["started"] is False


def test_after_a_connection_error_every_call_says_so():
    # Worker 1 never pushes; the server evicts it after 300 ms of everyone waiting for it.
    with hetsync.Server(2, [4], policy="naive", evict_after_ms=300) as server:
        lazy = {}

        def join_and_idle():
            w = hetsync.Worker(server.address, 1, dims=[4], transport="tcp")
            w.pull(0)
            lazy["w"] = w

        t = threading.Thread(target=join_and_idle)
        t.start()
        with hetsync.Worker(server.address, 0, dims=[4], transport="tcp") as w0:
            w0.pull(0)
            t.join(30)
            w0.push(0, np.ones(4, np.float32))
            # The round closed without the evicted worker: the mean of one gradient.
            np.testing.assert_array_equal(w0.pull(0), np.full(4, -0.1, np.float32))
        w1 = lazy["w"]
        with pytest.raises(hetsync.HetSyncError, match="pushing key 0|waiting for the models"):
            for _ in range(3):  # the first push may still be taken by the kernel
                w1.step([np.ones(4, np.float32)])
        with pytest.raises(hetsync.HetSyncError, match="worker 1's connection failed earlier"):
            w1.pull(0)
        w1.close()  # nothing to say goodbye to: no second error


def test_out_of_range_durations_are_errors_not_crashes():
    with pytest.raises(ValueError, match="connect_timeout must be a number of seconds"):
        hetsync.Worker("127.0.0.1:1", 0, dims=[4], connect_timeout=1e30)
    with pytest.raises(ValueError, match="timeout_ms must be a number of milliseconds"):
        hetsync.Server(1, [4], timeout_ms=-1)
    with pytest.raises(ValueError, match="seconds must be a number of seconds from 0"):
        hetsync.Server(1, [4], seconds=float("nan"))
    with hetsync.Server(1, [4]) as server:
        with pytest.raises(ValueError, match="timeout must be"):
            server.wait(timeout=1e30)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_worker_waits_for_a_server_that_comes_later_and_ctrl_c_stops_the_wait():
    port = free_port()
    # Nobody listens: Ctrl-C ends the retries long before connect_timeout.
    timer = threading.Timer(0.3, lambda: os.kill(os.getpid(), signal.SIGINT))
    timer.start()
    began = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        hetsync.Worker(f"127.0.0.1:{port}", 0, dims=[4], transport="tcp", connect_timeout=60)
    assert time.monotonic() - began < 10, "the connection retries were not interrupted"
    # The server starts half a second after the worker: the worker's retries find it.
    servers = []
    later = threading.Timer(0.5, lambda: servers.append(
        hetsync.Server(1, [4], policy="naive", rounds=1, listen=f"127.0.0.1:{port}")))
    later.start()
    with hetsync.Worker(f"127.0.0.1:{port}", 0, dims=[4], transport="tcp",
                        connect_timeout=30) as w:
        w.pull(0)
        w.step([np.ones(4, np.float32)])
    later.join()
    assert servers[0].wait(timeout=10)["rounds"] == 1
    servers[0].stop()
