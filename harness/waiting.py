"""One way to wait for something: poll a check until it holds or a deadline passes."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from harness.errors import HarnessError

T = TypeVar("T")


class WaitTimeout(HarnessError):
    """A wait_until() deadline passed (callers usually pass a more specific error)."""


def wait_until(
    check: Callable[[], T],
    timeout: float,
    *,
    what: str = "a condition",
    interval: float = 0.05,
    error: Callable[[], HarnessError] | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Call `check` until it returns a truthy value and return that value.

    `check` runs at least once, even with timeout 0. When `timeout` seconds (on `clock`) pass
    first, raise `error()` if given, else WaitTimeout naming `what`. `clock` and `sleep` are
    parameters so a model backend can wait in virtual time.
    """
    deadline = clock() + timeout
    while True:
        value = check()
        if value:
            return value
        now = clock()
        if now >= deadline:
            raise (
                error()
                if error is not None
                else WaitTimeout(f"timed out after {timeout:g} s waiting for {what}")
            )
        sleep(min(interval, max(deadline - now, 0.0)))
