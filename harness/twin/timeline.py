"""A model's ksmd, batch by batch, on the host's measured costs (harness.twin.calibration).

The model says what every batch does (page visits by kind, ksm_model.scanner.VISIT_KINDS);
the calibration says what that costs the real ksmd in CPU and how long ksmd then sleeps. A
Timeline runs a model Kernel one batch at a time and keeps the wall time, the CPU time and
the savings after each batch, which is what forecasts (time to a share of the savings, CPU to
get there) and the twin's CPU estimate are made of.

A unique visit searches the unstable tree, whose depth grows with the pages inserted in this
scan: its cost is `unique + unique_depth2 x log2(2 + pages in the tree)^2` (see calibration),
the tree's size taken in the middle of the batch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from harness.twin.calibration import Calibration

# What "converged" looks at: the merged state. (pages_unshared and pages_volatile keep
# changing with smart_scan's skipping, scan after scan, long after the savings are final.)
COMPARED = (
    "pages_shared",
    "pages_sharing",
    "ksm_zero_pages",
    "stable_node_chains",
    "stable_node_dups",
)
STEADY_SCANS = 3  # scans averaged for the steady CPU share (smart_scan skips every other)


def unstable_size(kernel: Any) -> int:
    """Pages in the model's unstable tree of the scan in progress (or just ended): inserted
    in that scan minus those merged away."""
    u = getattr(kernel, "unstable", None)
    return max(0, int(getattr(u, "count", 0)) - len(getattr(u, "erased", ())))


class Meter:
    """Reads the cost terms of each batch a model Kernel makes."""

    def __init__(self, kernel: Any) -> None:
        self.k = kernel
        self.visits = list(kernel.visits)
        self.skipped = int(kernel.pages_skipped)
        self.dups = int(getattr(kernel, "dups_walked", 0))

    def batch(self, pages: int) -> tuple[int, list[float]]:
        """One ksmd batch of at most `pages` pages: (pages visited, cost terms). A unique
        visit walks the unstable tree as it is at that moment: the batch's middle is taken."""
        k = self.k
        u0 = 0 if k.cursor is None else unstable_size(k)  # between scans: a new, empty tree
        done = int(k.scan_pages(pages))
        u1 = unstable_size(k)
        return done, self.terms(math.log2(2 + (u0 + u1) / 2), batches=1)

    def terms(self, depth: float, batches: int) -> list[float]:
        """Cost terms since the last call (calibration.TERMS order); unique visits are
        weighed once more by the unstable tree's `depth` squared (see calibration)."""
        v = [a - b for a, b in zip(self.k.visits, self.visits, strict=False)]
        skipped = int(self.k.pages_skipped) - self.skipped
        dups = int(getattr(self.k, "dups_walked", 0)) - self.dups
        self.visits, self.skipped = list(self.k.visits), int(self.k.pages_skipped)
        self.dups += dups
        v += [0] * (5 - len(v))
        first, unique, merged, joined, chained = v[:5]
        return [first, unique, unique * depth**2, merged + skipped, joined, chained, dups, batches]


@dataclass
class Point:
    """The state after one batch: seconds since run=1, ksmd CPU seconds, full scans, savings."""

    t: float
    cpu: float
    scans: int
    saved: int
    profit: int


@dataclass
class RunResult:
    """A model run to convergence under one knob set."""

    knobs: dict[str, int | str]
    points: list[Point] = field(default_factory=list)
    converged: bool = False
    counters: dict[str, int] = field(default_factory=dict)
    steady_scan_seconds: float | None = None  # wall time of STEADY_SCANS scans once converged
    steady_cpu_seconds: float | None = None  # ksmd CPU of those scans
    terms_by_scan: list[list[float]] = field(default_factory=list)  # cost terms, scan by scan

    def by_scan(self) -> list[tuple[int, float, float, int]]:
        """(full scans, seconds, ksmd CPU seconds, saved bytes) at each full scan's end."""
        out = []
        last = -1
        for p in self.points:
            if p.scans != last:
                out.append((p.scans, p.t, p.cpu, p.saved))
                last = p.scans
        return out

    @property
    def final(self) -> Point:
        return self.points[-1]

    def reach(self, share: float) -> Point | None:
        """The first point whose savings are at least `share` of the final savings."""
        goal = share * self.final.saved
        if self.final.saved <= 0:
            return None
        return next(p for p in self.points if p.saved >= goal)

    @property
    def steady_cpu_share(self) -> float | None:
        """ksmd's CPU share of one core once converged (it keeps scanning for ever)."""
        if not self.steady_scan_seconds or self.steady_cpu_seconds is None:
            return None
        return self.steady_cpu_seconds / self.steady_scan_seconds


class Timeline:
    """Runs a model Kernel batch by batch on a calibration; see the module docstring."""

    def __init__(self, kernel: Any, cal: Calibration) -> None:
        self.k = kernel
        self.cal = cal
        self.meter = Meter(kernel)
        self.t_ns = 0.0
        self.cpu_ns = 0.0
        self.scan_terms: list[list[float]] = []  # cost terms of each full scan (last: current)
        self._terms_scan = -1

    def saved(self) -> int:
        k = self.k
        return (int(k.pages_sharing) + int(getattr(k, "ksm_zero_pages", 0))) * int(k.page_size)

    def point(self) -> Point:
        return Point(
            round(self.t_ns / 1e9, 4),
            round(self.cpu_ns / 1e9, 5),
            int(self.k.full_scans),
            self.saved(),
            int(self.k.general_profit),
        )

    def batch(self) -> int:
        """One ksmd batch and the sleep after it; returns the pages it visited."""
        k = self.k
        scans = k.full_scans
        done, terms = self.meter.batch(int(k.pages_to_scan))
        cpu = self.cal.cost_ns(terms)
        if not self.scan_terms or scans != self._terms_scan:
            self.scan_terms.append([0.0] * len(terms))
            self._terms_scan = scans
        self.scan_terms[-1] = [a + b for a, b in zip(self.scan_terms[-1], terms, strict=True)]
        self.cpu_ns += cpu
        self.t_ns += cpu + self.cal.sleep_ns(int(k.sleep_millisecs))
        # The model's own clock follows this timeline: chain pruning and the advisor use it.
        k.now_ns = int(self.t_ns)
        k.ksmd_runtime_ns = int(self.cpu_ns)
        return done

    def state(self) -> tuple[int, ...]:
        c = self.k.counters()
        return tuple(int(c.get(n, 0)) for n in COMPARED)

    def run(
        self,
        knobs: Mapping[str, int | str],
        *,
        max_scans: int = 40,
        max_seconds: float = 7 * 86400.0,
        max_batches: int = 2_000_000,
    ) -> RunResult:
        """From run=1 to a full scan that changes no counter (converged), or a limit."""
        out = RunResult(dict(knobs))
        k = self.k
        if not k.ksmd_should_run() or int(k.pages_to_scan) == 0:
            out.points.append(self.point())
            out.counters = k.counters()
            out.converged = True  # nothing to scan: nothing will change
            return out
        last = self.state()
        scan_start = (self.t_ns, self.cpu_ns)
        steady_from: tuple[float, float, int] | None = None
        batches = 0
        out.points.append(self.point())
        while batches < max_batches and self.t_ns < max_seconds * 1e9:
            before = k.full_scans
            before_saved = self.saved()
            self.batch()
            batches += 1
            if k.full_scans == before:
                if steady_from is None and self.saved() != before_saved:
                    out.points.append(self.point())
                continue
            if steady_from is not None:
                if k.full_scans - steady_from[2] >= STEADY_SCANS:
                    out.steady_scan_seconds = (self.t_ns - steady_from[0]) / 1e9
                    out.steady_cpu_seconds = (self.cpu_ns - steady_from[1]) / 1e9
                    break
                continue
            out.points.append(self.point())
            now = self.state()
            if now == last and k.full_scans >= 2:
                out.converged = True
                # ksmd keeps scanning: its steady cost is the average of a few more scans.
                steady_from = (*scan_start, k.full_scans - 1)
                continue
            last = now
            scan_start = (self.t_ns, self.cpu_ns)
            if k.full_scans >= max_scans:
                break
        out.counters = k.counters()
        out.terms_by_scan = [[round(x, 1) for x in t] for t in self.scan_terms]
        return out


class CpuEstimate:
    """ksmd CPU time of a model that is stepped whole scans at a time (the twin), on a
    calibration: the cost terms come from the model's counters since the last update; unique
    visits take the unstable tree's depth at half its size at the end of the scan (it grows
    from empty during a scan), batches are visits over pages_to_scan."""

    def __init__(self, kernel: Any, cal: Calibration) -> None:
        self.k = kernel
        self.cal = cal
        self.meter = Meter(kernel)
        self.ns = 0.0

    def update(self) -> float:
        """Add what the model did since the last call; returns the estimate so far (s)."""
        k = self.k
        visited = sum(k.visits) - sum(self.meter.visits)
        if visited > 0:
            per = max(1, int(k.pages_to_scan))
            depth = math.log2(2 + unstable_size(k) / 2)
            self.ns += self.cal.cost_ns(self.meter.terms(depth, batches=-(-visited // per)))
        return self.ns / 1e9
