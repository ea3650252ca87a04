"""The worker protocol without KSM: no `map` is ever sent, so nothing is registered with KSM
(a worker's buffer only becomes mergeable in `map`). Real processes, FIFOs and signals."""

from __future__ import annotations

import os
import time

import pytest

from harness.scenario.errors import WorkerError
from harness.scenario.workers import WorkerPool, process_alive


def test_ping_fork_exit_and_kill_all() -> None:
    with WorkerPool(timeout=10) as pool:
        root = pool.spawn_worker("w1")
        assert root.request("ping", 10) == f"pong {root.pid}"
        child = pool.fork("w1", "c1")
        assert child.pid not in (0, root.pid, os.getpid())
        assert child.request("ping", 10) == f"pong {child.pid}"
        grandchild = pool.fork("c1", "g1")
        assert grandchild.request("ping", 10) == f"pong {grandchild.pid}"
        pool.exit("c1")  # returns once the process is gone (reaped by its parent)
        assert not process_alive(child.pid)
        assert grandchild.request("ping", 10) == f"pong {grandchild.pid}"  # orphan still works
        assert [w.name for w in pool.live()] == ["w1", "g1"]
        pids = list(pool.pids)
    assert not any(process_alive(p) for p in pids)
    assert not pool.dir.exists()


def test_worker_errors_are_reported() -> None:
    with WorkerPool(timeout=10) as pool:
        w = pool.spawn_worker("w1")
        with pytest.raises(WorkerError, match="unknown command 'bogus'"):
            w.request("bogus", 10)
        with pytest.raises(WorkerError, match="write failed: RuntimeError: no buffer yet"):
            w.request("write a 0", 10)
        assert w.request("ping", 10).startswith("pong")


def test_dead_worker_is_detected() -> None:
    with WorkerPool(timeout=10) as pool:
        w = pool.spawn_worker("w1")
        assert w.proc is not None
        w.proc.kill()
        w.proc.wait(10)
        with pytest.raises(WorkerError, match="w1"):
            w.request("ping", 2)


def test_process_alive_sees_zombies_as_dead() -> None:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    try:
        deadline = time.monotonic() + 10
        while process_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.001)  # the child becomes a zombie until we reap it
        assert not process_alive(pid)
        assert os.path.exists(f"/proc/{pid}")
    finally:
        os.waitpid(pid, 0)
    assert not process_alive(pid)
