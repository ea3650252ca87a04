"""The one record format and the one comparison engine, for runs and differential scenarios.

A Snapshot is every KSM counter plus every watched process's ksm_stat at one instant, on one
side (kernel or model). Differential scenarios keep one per full scan; playbook runs keep one
per sync point (and per full scan where asked). `diff_snapshots` says where two snapshots
differ, exactly or within a tolerance; scenario comparisons, run expectations
(`kernel ~= model within 2%: ...`) and reports all use it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from harness.ksm.types import COUNTER_NAMES, KsmStat

# /proc/PID/ksm_stat fields, with the kernel's names (the model's ksm_stat() uses them too).
STAT_FIELDS = (
    "ksm_rmap_items",
    "ksm_zero_pages",
    "ksm_merging_pages",
    "ksm_process_profit",
    "ksm_merge_any",
    "ksm_mergeable",
)
StatValue = int | bool | None


def stat_record(s: KsmStat) -> dict[str, StatValue]:
    """A KsmStat with the kernel's field names, as a Snapshot keeps it."""
    return {
        "ksm_rmap_items": s.rmap_items,
        "ksm_zero_pages": s.zero_pages,
        "ksm_merging_pages": s.merging_pages,
        "ksm_process_profit": s.process_profit,
        "ksm_merge_any": s.merge_any,
        "ksm_mergeable": s.mergeable,
    }


@dataclass(frozen=True)
class Snapshot:
    """Every sysfs counter and every watched process's ksm_stat at one instant."""

    counters: Mapping[str, int | None]
    processes: Mapping[str, Mapping[str, StatValue]]

    def as_dict(self) -> dict[str, Any]:
        return {
            "counters": dict(self.counters),
            "processes": {k: dict(v) for k, v in self.processes.items()},
        }


@dataclass(frozen=True)
class ScanPoint:
    """One side's counters at the end of a full scan.

    `scan` counts full scans since the run began on that side (monotonic, unlike full_scans,
    which run=2 resets), so a model that follows the kernel scan for scan has the same numbers.
    `seconds` is the run's clock when it was measured (None for the model, whose scans are
    computed at sync points, not observed when they happen).
    """

    scan: int
    counters: Mapping[str, int | None]
    seconds: float | None = None


@dataclass(frozen=True)
class Difference:
    """One value that differs: where (F and phase), what, and both values."""

    scan: int  # full scan F; 0 for a snapshot taken before run=1
    phase: str  # "initial", "end" (of scan F), "after actions", "outcome", or a sync label
    field: str  # a counter name, "<process>.<ksm_stat field>", "processes", "samples"
    kernel: object
    model: object

    def __str__(self) -> str:
        return (
            f"F={self.scan} {self.phase}: {self.field} kernel={self.kernel!r} model={self.model!r}"
        )

    @property
    def relative(self) -> float | None:
        """|kernel - model| / max(|kernel|, |model|), None for non-numbers."""
        k, m = self.kernel, self.model
        if not isinstance(k, int | float) or not isinstance(m, int | float):
            return None
        if isinstance(k, bool) or isinstance(m, bool):
            return None
        top = max(abs(k), abs(m))
        return 0.0 if top == 0 else abs(k - m) / top


def within(kernel: object, model: object, tolerance: float) -> bool:
    """Equal, or both numbers whose relative difference is at most `tolerance` (0.02 = 2%)."""
    if kernel == model:
        return True
    if tolerance <= 0:
        return False
    rel = Difference(0, "", "", kernel, model).relative
    return rel is not None and rel <= tolerance


def diff_snapshots(
    kernel: Snapshot,
    model: Snapshot,
    *,
    scan: int = 0,
    phase: str = "end",
    tolerance: float = 0.0,
    counters: Iterable[str] | None = None,
    processes: bool = True,
) -> list[Difference]:
    """Every field where two snapshots differ by more than `tolerance`, counters first.

    `counters` limits the counters compared (default: every counter either side has);
    processes=False leaves ksm_stat out (e.g. a run's pair expectation on counters only).
    """
    out: list[Difference] = []
    if counters is None:
        extra = sorted((set(kernel.counters) | set(model.counters)) - set(COUNTER_NAMES))
        names: list[str] = [*COUNTER_NAMES, *extra]
    else:
        names = list(counters)
    for name in names:
        kv, mv = kernel.counters.get(name), model.counters.get(name)
        if not within(kv, mv, tolerance):
            out.append(Difference(scan, phase, name, kv, mv))
    if not processes:
        return out
    if set(kernel.processes) != set(model.processes):
        out.append(
            Difference(scan, phase, "processes", sorted(kernel.processes), sorted(model.processes))
        )
    for proc, kstat in kernel.processes.items():
        mstat = model.processes.get(proc)
        if mstat is None:
            continue
        for f in STAT_FIELDS:
            kv, mv = kstat.get(f), mstat.get(f)
            if not within(kv, mv, tolerance):
                out.append(Difference(scan, phase, f"{proc}.{f}", kv, mv))
    return out
