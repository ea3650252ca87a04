"""One run as a night of a series: the figures a trend plots and a Pushgateway push carries.

Pure functions over a run.json document, so `ksmh trend` and `ksmh run --push` read the same
numbers from the same place. `boot_record` is the one piece the runner calls while it runs
(the guests' boot times are not in run.json otherwise).
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from harness.report.fleet import _last_end
from harness.report.provenance import of_run

# Counters compared kernel - model, per phase (full_scans is the model's by construction).
DELTA_COUNTERS = (
    "pages_shared",
    "pages_sharing",
    "pages_unshared",
    "pages_volatile",
    "stable_node_chains",
    "stable_node_dups",
    "ksm_zero_pages",
)
# The kernel's split of its unmerged pages between pages_unshared and pages_volatile depends on
# where in a scan ksmd was paused (measured: kernel - model pages_unshared from +3,809 to +6,699
# over four identical quickstart runs, pages_volatile the opposite), while their sum (tracked
# pages not merged) agreed within 9 pages every time: the sum is compared as one more counter.
UNMERGED = "pages_unshared+pages_volatile"
STARTED_FORMAT = "%Y-%m-%dT%H:%M:%S%z"


def boot_record(result: object) -> dict[str, Any] | None:
    """{"seconds": {guest: s}, "median": s, "max": s} from a fleet's boot FleetResult (a mapping
    of guest name -> GuestResult with .ok and .seconds); None for anything else."""
    if not isinstance(result, Mapping):
        return None
    seconds = {
        str(name): round(float(r.seconds), 3)
        for name, r in result.items()
        if getattr(r, "ok", False) and isinstance(getattr(r, "seconds", None), int | float)
    }
    if not seconds:
        return None
    values = list(seconds.values())
    return {
        "seconds": seconds,
        "median": round(statistics.median(values), 3),
        "max": max(values),
    }


def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, int | float) and not isinstance(x, bool) else None


@dataclass(frozen=True)
class SweepPoint:
    phase: str
    tunable: str
    value: int
    seconds: float | None
    ksmd_cpu_seconds: float | None
    converged: bool


@dataclass(frozen=True)
class ConvergedWait:
    phase: str
    line: int
    seconds: float | None
    timed_out: bool


@dataclass
class Night:
    """The figures of one run.json (see summarize)."""

    run_id: str
    started: datetime | None
    playbook: str
    host: str
    kernel_release: str
    backend: str
    status: str  # passed | failed | error
    exit_status: int | None
    duration_seconds: float | None
    provenance: dict[str, Any]
    saved_bytes: dict[str, float] = field(default_factory=dict)  # source -> end of the run
    phase_end: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    kernel_minus_model: dict[tuple[str, str], float] = field(default_factory=dict)
    sweeps: list[SweepPoint] = field(default_factory=list)
    waits: list[ConvergedWait] = field(default_factory=list)
    boot_median: float | None = None
    boot_max: float | None = None
    expectations: dict[str, int] = field(default_factory=dict)  # status -> count
    directory: str | None = None

    @property
    def pass_rate(self) -> float | None:
        """passed / (passed + failed); skipped expectations do not count. None without any."""
        passed, failed = self.expectations.get("passed", 0), self.expectations.get("failed", 0)
        return passed / (passed + failed) if passed + failed else None

    @property
    def key(self) -> tuple[str, str, str, str]:
        """The series a night belongs to: playbook, host, kernel release, backend."""
        return (self.playbook, self.host, self.kernel_release, self.backend)


def parse_started(text: object) -> datetime | None:
    if not isinstance(text, str):
        return None
    try:
        return datetime.strptime(text, STARTED_FORMAT)
    except ValueError:
        return None


def summarize(run: Mapping[str, Any], directory: str | None = None) -> Night:
    """The figures of a run.json document (older run.json files give what they have)."""
    prov = of_run(run)
    verdict = run.get("verdict") or {}
    backend = str(run.get("backend") or "kernel")
    night = Night(
        run_id=str(run.get("run_id") or directory or "?"),
        started=parse_started(run.get("started")),
        playbook=str((run.get("playbook") or {}).get("name") or "?"),
        host=str(prov.get("host") or "?"),
        kernel_release=str(prov.get("kernel_release") or "?"),
        backend=backend,
        status=str(verdict.get("status") or "error"),
        exit_status=verdict.get("exit_status"),
        duration_seconds=_num(run.get("duration_seconds")),
        provenance=prov,
        directory=directory,
    )
    for source in ("kernel", "model"):
        saved = _num(_last_end(run, source).get("saved_bytes"))
        if saved is not None:
            night.saved_bytes[source] = saved
    for phase in run.get("phases") or []:
        _phase(night, phase)
    boot = run.get("boot") or {}
    night.boot_median, night.boot_max = _num(boot.get("median")), _num(boot.get("max"))
    return night


def _phase(night: Night, phase: Mapping[str, Any]) -> None:
    name = str(phase.get("name"))
    ends: dict[str, dict[str, float]] = {}
    for source, c in (phase.get("counters") or {}).items():
        end = {k: v for k, v in (c.get("end") or {}).items() if _num(v) is not None}
        if end:
            ends[source] = {k: float(v) for k, v in end.items()}
    night.phase_end[name] = ends
    k, m = ends.get("kernel"), ends.get("model")
    if k and m:
        for counter in DELTA_COUNTERS:
            if counter in k and counter in m:
                night.kernel_minus_model[(name, counter)] = k[counter] - m[counter]
        parts = UNMERGED.split("+")
        if all(c in k and c in m for c in parts):
            night.kernel_minus_model[(name, UNMERGED)] = sum(k[c] - m[c] for c in parts)
    for s in phase.get("sweeps") or []:
        for p in s.get("points") or []:
            night.sweeps.append(
                SweepPoint(
                    phase=name,
                    tunable=str(s.get("tunable")),
                    value=int(p.get("value", 0)),
                    seconds=_num(p.get("seconds")),
                    ksmd_cpu_seconds=_num(p.get("ksmd_cpu_seconds")),
                    converged=bool(p.get("converged")),
                )
            )
    for w in phase.get("waits") or []:
        if w.get("kind") == "converged":
            night.waits.append(
                ConvergedWait(
                    phase=name,
                    line=int(w.get("line", 0)),
                    seconds=_num(w.get("seconds")),
                    timed_out=bool(w.get("timed_out")),
                )
            )
    for e in phase.get("expectations") or []:
        status = str(e.get("status", "?"))
        night.expectations[status] = night.expectations.get(status, 0) + 1
