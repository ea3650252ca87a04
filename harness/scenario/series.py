"""The result of running a scenario on one side: a series of counter snapshots.

Snapshot (harness.record) is the one record format of runs and scenarios alike.

Both runners return exactly this shape, so compare() needs no knowledge of where it came from.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from harness.ksm.types import COUNTER_NAMES
from harness.record import Snapshot
from harness.scenario.spec import Scenario

# Cumulative counters that run=2 does not reset; reported relative to the start of the run.
DELTA_COUNTERS = ("pages_scanned", "pages_skipped")


@dataclass(frozen=True)
class ScanSample:
    """The state right after full scan `scan` (1-based, counted since the start).

    `after_actions` is a second snapshot taken once the actions scheduled after this scan
    were applied (ksmd still paused), None when there were none; `outcomes` says per action
    "ok" or the errno name a tunable write was refused with.
    """

    scan: int
    end: Snapshot
    after_actions: Snapshot | None = None
    outcomes: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {
            "scan": self.scan,
            "end": self.end.as_dict(),
            "after_actions": None if self.after_actions is None else self.after_actions.as_dict(),
            "outcomes": list(self.outcomes),
        }


@dataclass(frozen=True)
class Series:
    """All samples of one run: `initial` is taken just before run=1."""

    source: str  # "kernel" or "model"
    scenario: Scenario
    initial: Snapshot
    samples: tuple[ScanSample, ...]

    def at(self, scan: int) -> ScanSample:
        """The sample after full scan `scan` (1-based)."""
        return self.samples[scan - 1]

    def counter(self, name: str) -> list[int | None]:
        """One counter across all end-of-scan samples, F=1 first."""
        return [s.end.counters.get(name) for s in self.samples]

    def as_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "scenario": self.scenario.to_mapping(),
            "initial": self.initial.as_dict(),
            "samples": [s.as_dict() for s in self.samples],
        }


def relative(
    counters: Mapping[str, int | None], base: Mapping[str, int | None]
) -> dict[str, int | None]:
    """Counters in COUNTER_NAMES order, DELTA_COUNTERS made relative to `base`."""
    out: dict[str, int | None] = {}
    for name in COUNTER_NAMES:
        value = counters.get(name)
        start = base.get(name)
        if name in DELTA_COUNTERS and value is not None and start is not None:
            value -= start
        out[name] = value
    return out
