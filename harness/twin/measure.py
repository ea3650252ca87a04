"""Measure what a forecast predicts: from run=1 to convergence on the real kernel.

`measure()` polls a reader (wall clock, ksmd CPU seconds, counters) without pausing ksmd,
until a full scan changes no counter; then the time and CPU to reach a share of the final
savings are read off the polled series (interpolated between polls), as the forecast reads
them off the model's batches. `compare()` puts a forecast and a measurement side by side.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from harness.errors import HarnessError
from harness.twin.timeline import COMPARED

# (seconds on the reader's clock, ksmd CPU seconds or None, counters)
Reading = tuple[float, float | None, Mapping[str, int]]


@dataclass
class Measured:
    """A measured run from run=1: samples as (t, cpu, full_scans, saved bytes)."""

    samples: list[tuple[float, float | None, int, int]] = field(default_factory=list)
    converged: bool = False
    counters: dict[str, int] = field(default_factory=dict)

    @property
    def saved(self) -> int:
        return self.samples[-1][3] if self.samples else 0

    def by_scan(self) -> list[tuple[int, float, float | None, int]]:
        """(full scans, seconds, ksmd CPU seconds, saved bytes) at the first sample after each
        full scan ended: the measured curve, scan by scan."""
        out = []
        last = -1
        for t, cpu, scans, saved in self.samples:
            if scans != last:
                out.append((scans, round(t, 3), None if cpu is None else round(cpu, 4), saved))
                last = scans
        return out

    def reach(self, share: float) -> tuple[float, float | None, int] | None:
        """(seconds, ksmd CPU seconds, full scans) when the savings first reached `share` of
        the final savings, linearly interpolated between the two samples around it."""
        goal = share * self.saved
        if self.saved <= 0:
            return None
        prev = self.samples[0]
        for s in self.samples:
            if s[3] >= goal:
                if s is prev or s[3] == prev[3]:
                    return s[0], s[1], s[2]
                f = (goal - prev[3]) / (s[3] - prev[3])
                t = prev[0] + f * (s[0] - prev[0])
                cpu = None
                if s[1] is not None and prev[1] is not None:
                    cpu = prev[1] + f * (s[1] - prev[1])
                return t, cpu, s[2]
            prev = s
        return None


def saved_bytes(c: Mapping[str, int], page_size: int = 4096) -> int:
    return (int(c.get("pages_sharing", 0)) + int(c.get("ksm_zero_pages", 0))) * page_size


def measure(
    read: Callable[[], Reading],
    timeout: float,
    *,
    poll: float = 0.05,
    page_size: int = 4096,
    sleep: Callable[[float], None] = time.sleep,
) -> Measured:
    """Poll from now (just after run=1) until a full scan (after the second) changes no
    counter, or `timeout` seconds; the reader's clock and CPU are taken relative to the
    first reading."""
    t0, c0, first = read()
    out = Measured()
    scans0 = int(first.get("full_scans", 0))

    def add(r: Reading) -> int:
        t, c, counters = r
        scans = int(counters.get("full_scans", 0)) - scans0
        cpu = None if c is None or c0 is None else c - c0
        out.samples.append((t - t0, cpu, scans, saved_bytes(counters, page_size)))
        return scans

    add((t0, c0, first))
    last_scan, last_state = 0, tuple(int(first.get(n, 0)) for n in COMPARED)
    while True:
        sleep(poll)
        r = read()
        scans = add(r)
        if scans < 0:
            raise HarnessError("full_scans went backwards while measuring (run=2 elsewhere?)")
        if scans != last_scan:
            state = tuple(int(r[2].get(n, 0)) for n in COMPARED)
            if state == last_state and scans >= 2:
                out.converged = True
                out.counters = dict(r[2])
                return out
            last_scan, last_state = scans, state
        if r[0] - t0 > timeout:
            out.counters = dict(r[2])
            return out


def compare(forecast: Mapping[str, Any], measured: Measured, target: float) -> dict[str, Any]:
    """Forecast against measurement: values and relative errors (forecast / measured - 1)."""
    reach = measured.reach(target)

    def err(f: float | None, m: float | None) -> float | None:
        if f is None or m is None or m == 0:
            return None
        return round(f / m - 1, 4)

    m = {
        "saved_bytes": measured.saved,
        "seconds_to_target": None if reach is None else round(reach[0], 3),
        "cpu_seconds_to_target": None if reach is None or reach[1] is None else round(reach[1], 3),
        "full_scans_to_target": None if reach is None else reach[2],
        "converged": measured.converged,
        "general_profit": measured.counters.get("general_profit"),
    }
    return {
        "measured_by_scan": measured.by_scan(),
        "forecast": {
            k: forecast.get(k)
            for k in (
                "saved_bytes",
                "seconds_to_target",
                "cpu_seconds_to_target",
                "full_scans_to_target",
                "general_profit",
            )
        },
        "measured": m,
        "error": {
            k: err(forecast.get(k), m[k])
            for k in ("saved_bytes", "seconds_to_target", "cpu_seconds_to_target")
        },
    }
