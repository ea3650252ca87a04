"""wait_until: returns the check's value, checks at least once, times out with the given error."""

from __future__ import annotations

import pytest

from harness.errors import ScanTimeout
from harness.waiting import WaitTimeout, wait_until


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.t += s


def test_returns_the_first_truthy_value_of_the_check() -> None:
    clock = FakeClock()
    values = iter([0, None, "", 7, 8])
    got = wait_until(lambda: next(values), 10, interval=1, clock=clock, sleep=clock.sleep)
    assert got == 7
    assert clock.sleeps == [1, 1, 1]


def test_checks_once_even_with_no_time_left() -> None:
    calls: list[int] = []
    assert wait_until(lambda: calls.append(1) or "ok", 0) == "ok"
    assert calls == [1]


def test_times_out_naming_what_it_waited_for_and_never_oversleeps() -> None:
    clock = FakeClock()
    with pytest.raises(WaitTimeout, match=r"after 2\.5 s waiting for the guest"):
        wait_until(lambda: False, 2.5, what="the guest", interval=1, clock=clock, sleep=clock.sleep)
    assert clock.sleeps == [1, 1, 0.5]


def test_raises_the_callers_error() -> None:
    clock = FakeClock()
    with pytest.raises(ScanTimeout, match="no scan"):
        wait_until(
            lambda: False, 1, error=lambda: ScanTimeout("no scan"), clock=clock, sleep=clock.sleep
        )
