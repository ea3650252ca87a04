"""The two sides of a comparison, behind one small protocol.

A run (or the exporter's twin) holds a list of sides: the real kernel's KSM and the model fed
by shadow capture, or only one of them. The first side leads: it is the one whose ksmd really
runs (the kernel, or the model in a model-only run); the others follow it, full scan for full
scan. Nothing outside a side asks which side it is.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager
from typing import Protocol

from harness.ksm.backend import BackendBase
from harness.record import ScanPoint, Snapshot


class Side(Protocol):
    """One KSM under observation; see the package docstring."""

    source: str  # "kernel" or "model": record key and Prometheus `source` label
    page_size: int

    def watch(self, guests: Mapping[int, str]) -> None:
        """The processes to follow (real pid -> guest name)."""
        ...

    def hold(self) -> AbstractContextManager[int]:
        """A consistent instant: while inside, this side does not move. Yields the full scans
        it made since the previous hold (a leading kernel pauses ksmd; a model refreshes its
        capture of the guests and yields 0)."""
        ...

    def follow(self, scans: int) -> None:
        """Catch up with `scans` full scans of the leader (the model captures first)."""
        ...

    def counters(self) -> dict[str, int]:
        """Every counter this side has, now."""
        ...

    def snapshot(self) -> Snapshot:
        """Counters plus each watched guest's ksm_stat, by guest name."""
        ...

    def knobs(self) -> dict[str, int | str]:
        """Every tunable this side has, now."""
        ...

    def scanning(self) -> bool:
        """True while ksmd runs (run=1 and something to scan)."""
        ...

    def apply(self, values: Mapping[str, int | str]) -> None:
        """Write knobs. The kernel checks them (and may refuse); a model mirrors the kernel."""
        ...

    def wait_full_scans(self, n: int, timeout: float) -> None:
        """Leader only: return after n more full scans (ScanTimeout otherwise)."""
        ...

    def sleep(self, seconds: float) -> None:
        """Leader only: let time pass (wall clock, or the model's virtual clock)."""
        ...

    def clock(self) -> float:
        """Seconds on this side's clock (monotonic wall time, or the model's virtual time)."""
        ...

    def ksmd_cpu_seconds(self) -> float | None:
        """ksmd's CPU time so far (measured, or the model's estimate); None if unknown."""
        ...

    def drain_scans(self) -> list[ScanPoint]:
        """The end-of-scan records made since the last call (the model: every full scan it
        made; the kernel: frozen samples, when the run asked for them)."""
        ...

    def exported(self) -> tuple[BackendBase, Mapping[int, str]]:
        """What the Prometheus exporter reads: a backend safe to read from another thread,
        and its per-process series (pid in that backend -> guest name)."""
        ...
