"""Per-guest results of fleet operations, and the boot progress bar.

A FleetResult holds one GuestResult (value or error, and the accelerator used) per guest, so
a partial failure is never hidden; `raise_if_failed()` turns it into one GuestError.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

from harness.errors import GuestError, HarnessError
from harness.guests.agent import AgentReply


@dataclass(frozen=True)
class GuestResult:
    """The outcome of one operation on one guest."""

    name: str
    value: AgentReply | None = None
    error: HarnessError | None = None
    seconds: float = 0.0
    accel: str = ""

    @property
    def ok(self) -> bool:
        return self.error is None


class FleetResult(Mapping[str, GuestResult]):
    """Per-guest results of one fleet operation, in guest order."""

    def __init__(self, operation: str, results: Sequence[GuestResult]) -> None:
        self.operation = operation
        self._results = {r.name: r for r in results}

    def __getitem__(self, name: str) -> GuestResult:
        return self._results[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._results)

    def __len__(self) -> int:
        return len(self._results)

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self._results.values())

    @property
    def failed(self) -> list[GuestResult]:
        return [r for r in self._results.values() if not r.ok]

    @property
    def succeeded(self) -> list[GuestResult]:
        return [r for r in self._results.values() if r.ok]

    def field(self, key: str) -> dict[str, int]:
        """An integer reply field of every successful guest, e.g. field('mismatched')."""
        return {r.name: r.value.int(key) for r in self.succeeded if r.value is not None}

    def raise_if_failed(self) -> FleetResult:
        if self.failed:
            lines = "; ".join(f"{r.name}: {r.error}" for r in self.failed)
            raise GuestError(
                f"{self.operation} failed on {len(self.failed)} of {len(self)} guests: {lines}"
            )
        return self


class Progress:
    """A one-line progress bar on a terminal; silent otherwise."""

    def __init__(self, total: int, label: str, enabled: bool | None = None) -> None:
        self.total = total
        self.label = label
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.done = 0
        self.failed = 0
        self._lock = threading.Lock()

    def step(self, ok: bool) -> None:
        with self._lock:
            self.done += 1
            self.failed += 0 if ok else 1
            if self.enabled:
                width = 30
                fill = width * self.done // max(self.total, 1)
                bar = "#" * fill + "." * (width - fill)
                sys.stderr.write(
                    f"\r{self.label} [{bar}] {self.done}/{self.total}"
                    + (f", {self.failed} failed" if self.failed else "")
                )
                if self.done == self.total:
                    sys.stderr.write("\n")
                sys.stderr.flush()
