"""Signals during runs: SIGTERM and SIGHUP end a run as Ctrl-C does; teardown is shielded.

A run turns SIGTERM/SIGHUP into KeyboardInterrupt so its `finally` clauses (guests down, knobs
restored) run for them exactly as for Ctrl-C. Once teardown has begun, a second SIGINT/SIGTERM
(an impatient user, a supervisor's escalation) must not cut the restore short: `shielded()`
records such signals instead of raising, and re-raises one KeyboardInterrupt afterwards.
Handlers can only be set from the main thread; elsewhere both helpers do nothing.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

ENDING = (signal.SIGTERM, signal.SIGHUP)
ALL_ENDING = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def raise_interrupt(signum: int, frame: FrameType | None) -> None:
    """A signal handler that raises KeyboardInterrupt naming the signal."""
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextmanager
def _handlers(signums: tuple[int, ...], handler: Any) -> Iterator[None]:
    if not _main_thread():
        yield
        return
    previous = {s: signal.signal(s, handler) for s in signums}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextmanager
def signals_as_interrupt(signums: tuple[int, ...] = ENDING) -> Iterator[None]:
    """Inside, SIGTERM and SIGHUP raise KeyboardInterrupt (SIGINT already does)."""
    with _handlers(signums, raise_interrupt):
        yield


@contextmanager
def shielded(reraise: bool = True) -> Iterator[list[int]]:
    """Inside, SIGINT/SIGTERM/SIGHUP are recorded (the yielded list), not raised.

    On a normal exit, if any arrived and `reraise`, one KeyboardInterrupt is raised then; if an
    exception is already propagating, it wins and the recorded signals are only in the list.
    """
    got: list[int] = []

    def record(signum: int, frame: FrameType | None) -> None:
        got.append(signum)

    with _handlers(ALL_ENDING, record):
        yield got
    if got and reraise:
        raise KeyboardInterrupt(f"signal {signal.Signals(got[0]).name} during teardown")
