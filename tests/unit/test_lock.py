"""The host-wide KSM lock: exclusive across processes, re-entrant within a thread."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from harness.errors import HarnessError
from harness.ksm.lock import ksm_lock
from harness.run import PIPE, spawn

HOLDER = """
import sys, time
from pathlib import Path
from harness.ksm.lock import ksm_lock
with ksm_lock(Path(sys.argv[1])):
    print("held", flush=True)
    sys.stdin.read()
"""


def test_another_process_holding_it_makes_us_wait_then_fail(tmp_path: Path) -> None:
    lock = tmp_path / "ksm.lock"
    holder = spawn([sys.executable, "-c", HOLDER, str(lock)], stdin=PIPE, stdout=PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
        t0 = time.monotonic()
        with (
            pytest.raises(HarnessError, match="another ksm-harness run holds"),
            ksm_lock(lock, timeout=0.3),
        ):
            pass
        assert time.monotonic() - t0 >= 0.3
    finally:
        holder.kill()
        holder.wait(5)
    with ksm_lock(lock, timeout=5):  # released by the holder's death
        pass


WAITER = """
import sys
from pathlib import Path
from harness.ksm.lock import ksm_lock
with ksm_lock(Path(sys.argv[1]), timeout=30):
    print("got it", flush=True)
"""


def blocked_waiters(pid: int) -> int:
    """Lines of /proc/locks where `pid` waits, queued in the kernel (marked '->')."""
    lines = Path("/proc/locks").read_text().splitlines()
    return sum(1 for line in lines if "->" in line and line.split()[5] == str(pid))


def test_a_waiting_run_is_queued_in_the_kernel_not_polling(tmp_path: Path) -> None:
    """Blocked flock() waiters wake the moment the holder lets go; a poller loses every race
    to them (a run polling every 0.1 s once waited 15 minutes behind `flock` commands)."""
    lock = tmp_path / "ksm.lock"
    holder = spawn([sys.executable, "-c", HOLDER, str(lock)], stdin=PIPE, stdout=PIPE)
    assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
    waiter = spawn([sys.executable, "-c", WAITER, str(lock)], stdout=PIPE)
    try:
        deadline = time.monotonic() + 10
        while blocked_waiters(waiter.pid) == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert blocked_waiters(waiter.pid) == 1
        assert holder.stdin is not None
        holder.stdin.close()  # the holder lets go
        assert waiter.stdout is not None and waiter.stdout.readline() == b"got it\n"
        assert waiter.wait(10) == 0
    finally:
        for p in (holder, waiter):
            p.kill()
            p.wait(5)


def test_a_timed_out_wait_leaves_other_alarms_alone(tmp_path: Path) -> None:
    lock = tmp_path / "ksm.lock"
    fired: list[int] = []
    previous = signal.signal(signal.SIGALRM, lambda n, f: fired.append(n))
    signal.setitimer(signal.ITIMER_REAL, 30)
    holder = spawn([sys.executable, "-c", HOLDER, str(lock)], stdin=PIPE, stdout=PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
        with pytest.raises(HarnessError, match="waited 0 s"), ksm_lock(lock, timeout=0.2):
            pass
        remaining, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 25 < remaining <= 30  # our alarm is still set, to the same second
        assert fired == [] and signal.getsignal(signal.SIGALRM) is not previous
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        holder.kill()
        holder.wait(5)


def test_reentrant_in_one_thread_exclusive_across_threads(tmp_path: Path) -> None:
    lock = tmp_path / "ksm.lock"
    events: list[str] = []

    def other() -> None:
        with ksm_lock(lock, timeout=10):
            events.append("other")

    with ksm_lock(lock):
        with ksm_lock(lock, timeout=0.1):  # nested: no deadlock, no wait
            events.append("inner")
        t = threading.Thread(target=other)
        t.start()
        time.sleep(0.3)
        events.append("outer-end")
    t.join(10)
    assert events == ["inner", "outer-end", "other"]


def test_refuses_a_world_writable_directory(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    with (
        pytest.raises(HarnessError, match="writable by other users") as exc,
        ksm_lock(shared / "ksm.lock", timeout=0.1),
    ):
        pass
    assert exc.value.hint and "chmod 755" in exc.value.hint
    assert not (shared / "ksm.lock").exists()


def test_refuses_a_symlink_planted_as_the_lock(tmp_path: Path) -> None:
    target = tmp_path / "victim"
    target.write_text("keep me\n")
    (tmp_path / "ksm.lock").symlink_to(target)
    with pytest.raises(HarnessError, match="symlink"), ksm_lock(tmp_path / "ksm.lock"):
        pass
    assert target.read_text() == "keep me\n"


def test_the_lock_file_is_private_to_its_owner(tmp_path: Path) -> None:
    lock = tmp_path / "run" / "ksm.lock"
    with ksm_lock(lock):
        pass
    assert lock.stat().st_mode & 0o777 == 0o600
    assert lock.parent.stat().st_mode & 0o777 == 0o755


NOT_ROOT = """
import fcntl, os, sys
try:
    fd = os.open(sys.argv[1], os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    print("took it")
except PermissionError as exc:
    print("refused", exc.errno)
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a command as another user")
def test_another_user_cannot_take_the_host_lock_to_block_runs() -> None:
    from harness.ksm import lock

    os.close(lock._open_lock(lock.DEFAULT_LOCK))  # make sure it exists, as a run would
    done = subprocess.run(
        [
            "runuser",
            "-u",
            "nobody",
            "--",
            "/usr/bin/python3",
            "-c",
            NOT_ROOT,
            str(lock.DEFAULT_LOCK),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.stdout.strip() == "refused 13", done.stdout + done.stderr
