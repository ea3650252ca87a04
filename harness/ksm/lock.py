"""The host-wide KSM lock.

KSM's counters and knobs are global to the host, so every run, test or pytest-xdist worker that
drives the real kernel takes this one flock first. A lock file (not a pid file) means a crashed
holder releases it automatically.

The lock lives in a root-owned directory that no other user can write (/run/ksm-harness), is
opened with O_NOFOLLOW and created 0600: another user can neither plant a symlink there nor
open the file to hold the flock and block every run.

The lock is re-entrant within one thread: a pytest fixture can hold it while the code under
test (a scenario or playbook run) takes it again. flock alone would deadlock there, since two
open() calls in one process are two lock owners.
"""

from __future__ import annotations

import fcntl
import os
import signal
import stat
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from harness.errors import HarnessError

STATE_DIR = Path("/run/ksm-harness")
DEFAULT_LOCK = Path(os.environ.get("KSM_HARNESS_LOCK", str(STATE_DIR / "ksm.lock")))

_held = threading.local()  # path -> depth, for this thread


def _depths() -> dict[str, int]:
    if not hasattr(_held, "depths"):
        _held.depths = {}
    depths: dict[str, int] = _held.depths
    return depths


ROOT_HINT = "run as root (the host-wide state of ksm-harness is root's)"


def private_dir(path: Path, mode: int = 0o755, hint: str = ROOT_HINT) -> Path:
    """Create `path` (`mode`) if needed and check that only root or we can write it.

    A world- or group-writable directory, a symlink, or one owned by another user would let
    someone else replace what we keep there; refuse it with the reason. `hint` is what to do
    when it cannot be created.
    """
    try:
        path.mkdir(mode=mode, parents=True, exist_ok=True)
        st = os.lstat(path)
    except PermissionError:
        raise HarnessError(f"cannot create {path}: permission denied", hint=hint) from None
    except OSError as exc:
        raise HarnessError(f"cannot create {path}: {exc.strerror}", hint=hint) from None
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise HarnessError(f"{path} is not a plain directory", hint=f"remove it: rm {path}")
    if st.st_uid not in (0, os.geteuid()):
        raise HarnessError(
            f"{path} belongs to uid {st.st_uid}, not to root or us",
            hint=f"remove it (as root): rm -r {path}",
        )
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise HarnessError(
            f"{path} is writable by other users (mode {stat.S_IMODE(st.st_mode):o})",
            hint=f"chmod 755 {path}, or set KSM_HARNESS_LOCK to a file in a private directory",
        )
    return path


def _open_lock(path: Path) -> int:
    private_dir(path.parent)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except PermissionError:
        raise HarnessError(
            f"cannot open the host KSM lock {path}: permission denied",
            hint="runs that touch real KSM or boot guests need root",
        ) from None
    except OSError as exc:
        raise HarnessError(
            f"cannot open the host KSM lock {path}: {exc.strerror}",
            hint=f"is {path} a symlink? remove it",
        ) from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid not in (0, os.geteuid()):
        os.close(fd)
        raise HarnessError(f"{path} is not our lock file", hint=f"remove it (as root): rm {path}")
    return fd


class _TimedOut(Exception):
    pass


def _alarm(signum: int, frame: object) -> None:
    raise _TimedOut


def _wait_for(fd: int, timeout: float | None) -> bool:
    """flock(fd, LOCK_EX) within `timeout` seconds (None: forever); False when it ran out.

    A blocked flock() is queued in the kernel and wakes as soon as the holder lets go, so a
    waiter polling with LOCK_NB loses every race against blocked ones (measured: a run polling
    every 0.1 s waited 15 minutes behind `flock` commands taking turns). So block, and end the
    wait with SIGALRM; outside the main thread (no signals there) poll instead."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        pass
    if timeout is None:
        fcntl.flock(fd, fcntl.LOCK_EX)
        return True
    if threading.current_thread() is not threading.main_thread():
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            time.sleep(0.1)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                continue
        return False
    old = signal.signal(signal.SIGALRM, _alarm)
    old_timer = signal.setitimer(signal.ITIMER_REAL, max(timeout, 0.001))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        return True
    except _TimedOut:
        return False
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        if old_timer[0]:  # someone else's alarm was pending: put it back
            signal.setitimer(signal.ITIMER_REAL, *old_timer)


@contextmanager
def ksm_lock(path: Path = DEFAULT_LOCK, timeout: float | None = 1800.0) -> Iterator[None]:
    """Hold the host-wide KSM lock; wait at most `timeout` seconds (None: forever)."""
    key = str(Path(path).absolute())
    depths = _depths()
    if depths.get(key):
        depths[key] += 1
        try:
            yield
        finally:
            depths[key] -= 1
        return
    fd = _open_lock(Path(path))
    try:
        if not _wait_for(fd, timeout):
            raise HarnessError(
                f"another ksm-harness run holds {path} (waited {timeout:.0f} s)",
                hint="wait for it to finish, or find it with: fuser " + str(path),
            )
        depths[key] = 1
        try:
            yield
        finally:
            depths[key] = 0
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
