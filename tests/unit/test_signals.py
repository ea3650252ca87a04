"""SIGTERM/SIGHUP end a run like Ctrl-C; a signal during teardown waits until it is done."""

from __future__ import annotations

import os
import signal

import pytest

from harness.signals import shielded, signals_as_interrupt


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_ending_signals_raise_keyboard_interrupt_and_handlers_come_back(sig: int) -> None:
    before = signal.getsignal(sig)
    with pytest.raises(KeyboardInterrupt, match=signal.Signals(sig).name), signals_as_interrupt():
        os.kill(os.getpid(), sig)
    assert signal.getsignal(sig) is before


def test_a_signal_during_teardown_is_held_until_the_teardown_is_done() -> None:
    done: list[str] = []
    with pytest.raises(KeyboardInterrupt, match="SIGTERM during teardown"), shielded() as got:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)
        done.append("restored")
    assert done == ["restored"]
    assert got == [signal.SIGTERM, signal.SIGINT]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_an_exception_in_teardown_wins_over_held_signals() -> None:
    with pytest.raises(ValueError), shielded() as got:
        os.kill(os.getpid(), signal.SIGHUP)
        raise ValueError("restore failed")
    assert got == [signal.SIGHUP]
