"""The host-wide KSM lock.

KSM's counters and knobs are global to the host, so every run, test or pytest-xdist worker that
drives the real kernel takes this one flock first. A lock file (not a pid file) means a crashed
holder releases it automatically.

The lock is re-entrant within one thread: a pytest fixture can hold it while the code under
test (a scenario or playbook run) takes it again. flock alone would deadlock there, since two
open() calls in one process are two lock owners.
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from harness.errors import HarnessError

DEFAULT_LOCK = Path(os.environ.get("KSM_HARNESS_LOCK", "/run/lock/ksm-harness.lock"))

_held = threading.local()  # path -> depth, for this thread


def _depths() -> dict[str, int]:
    if not hasattr(_held, "depths"):
        _held.depths = {}
    depths: dict[str, int] = _held.depths
    return depths


@contextmanager
def ksm_lock(path: Path = DEFAULT_LOCK, timeout: float | None = 1800.0) -> Iterator[None]:
    """Hold the host-wide KSM lock; wait at most `timeout` seconds (None: forever)."""
    key = str(Path(path).resolve())
    depths = _depths()
    if depths.get(key):
        depths[key] += 1
        try:
            yield
        finally:
            depths[key] -= 1
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if deadline is not None and time.monotonic() > deadline:
                    raise HarnessError(
                        f"another ksm-harness run holds {path} (waited {timeout:.0f} s)",
                        hint="wait for it to finish, or find it with: fuser " + str(path),
                    ) from None
                time.sleep(0.1)
        depths[key] = 1
        try:
            yield
        finally:
            depths[key] = 0
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
