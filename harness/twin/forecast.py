"""What KSM would do on this host, before it does it: `ksmh forecast` and the playbook's
`forecast` step.

Capture the memory KSM would scan once (harness.shadow; with KSM absent, QEMU's guest RAM:
its anonymous MADV_HUGEPAGE mappings), then, per knob set, replay it into a fresh model with
those knobs and run the model's ksmd to convergence on the host's calibration
(harness.twin.timeline): saved bytes, general_profit, full scans, wall time and ksmd CPU to
reach the target share of the savings, and ksmd's CPU share once converged. The
recommendation is the cheapest knob set (lowest steady CPU share, then fastest) that reaches
the target within the time budget without using more than the CPU budget, converging or
steady.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import procfs
from harness.errors import HarnessError
from harness.ksm.tunables import WRITE_ORDER
from harness.shadow import ProcessCapture, Shadow
from harness.twin.calibration import Calibration
from harness.twin.knobs import show
from harness.twin.timeline import RunResult, Timeline

# pages_to_scan ladder tried when no knob set is given (at the host's sleep_millisecs).
LADDER = (100, 250, 500, 1000, 2000, 4000)
MODEL_DEFAULTS: dict[str, int | str] = {"pages_to_scan": 100, "sleep_millisecs": 20}


def qemu_pids(proc: Path = procfs.PROC) -> dict[int, str]:
    """Every QEMU process (command qemu-system-*, or a comm QEMU's -name process= set)."""
    out = {}
    for pid in procfs.pids(proc):
        comm = procfs.comm(pid, proc) or ""
        argv0 = procfs.cmdline(pid, proc).split(" ", 1)[0].rsplit("/", 1)[-1]
        if argv0.startswith("qemu-system") or comm.startswith("qemu-"):
            out[pid] = f"{comm}-{pid}"
    return out


def targets(
    proc: Path = procfs.PROC, pids: Sequence[int] = (), qemu: bool = False, ksm: bool = True
) -> dict[int, str]:
    """The processes to forecast: `pids`, or every QEMU (`qemu`), or else every process
    registered with KSM (and, without KSM, every QEMU)."""
    if pids:
        out = {}
        for pid in pids:
            name = procfs.comm(pid, proc)
            if name is None:
                raise HarnessError(f"--pid {pid}: no such process")
            out[pid] = f"{name}-{pid}"
        return out
    if qemu or not ksm:
        found = qemu_pids(proc)
        if not found:
            raise HarnessError("no QEMU process to forecast", hint="start the guests, or --pid")
        return found
    found = {u.pid: f"{u.comm}-{u.pid}" for u in procfs.ksm_users(proc)}
    if not found:
        raise HarnessError(
            "no process has mergeable memory (MADV_MERGEABLE) to forecast",
            hint="--qemu forecasts every QEMU's guest RAM, --pid a given process",
        )
    return found


@dataclass
class KnobResult:
    """One knob set's forecast (times in seconds from run=1, CPU in ksmd seconds)."""

    name: str
    knobs: dict[str, int | str]
    run: RunResult
    target: float

    def as_dict(self) -> dict[str, Any]:
        reach = self.run.reach(self.target)
        final = self.run.final
        return {
            "name": self.name,
            "knobs": self.knobs,
            "converged": self.run.converged,
            "saved_bytes": final.saved,
            "general_profit": final.profit,
            "full_scans": final.scans,
            "seconds_to_converge": final.t,
            "cpu_seconds_to_converge": final.cpu,
            "target_share": self.target,
            "full_scans_to_target": reach.scans if reach else None,
            "seconds_to_target": reach.t if reach else None,
            "cpu_seconds_to_target": reach.cpu if reach else None,
            "steady_cpu_share": _round(self.run.steady_cpu_share, 5),
            "steady_seconds": _round(self.run.steady_scan_seconds, 3),
            "counters": self.run.counters,
            "by_scan": self.run.by_scan(),
            "terms_by_scan": self.run.terms_by_scan,
        }

    def cpu_share(self) -> float | None:
        """The larger of ksmd's CPU share while reaching the target and once steady."""
        reach = self.run.reach(self.target)
        shares = [s for s in (self.run.steady_cpu_share,) if s is not None]
        if reach is not None and reach.t > 0:
            shares.append(reach.cpu / reach.t)
        return max(shares) if shares else None


def _round(v: float | None, digits: int) -> float | None:
    return None if v is None else round(v, digits)


@dataclass
class Forecast:
    targets: dict[int, str]
    captured_pages: int
    captured_bytes: int
    capture_seconds: float
    calibration: Calibration
    calibrated: bool
    target: float
    within: float | None
    cpu: float | None
    results: list[KnobResult] = field(default_factory=list)
    recommended: KnobResult | None = None
    why_none: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "targets": {str(p): n for p, n in self.targets.items()},
            "captured_pages": self.captured_pages,
            "captured_bytes": self.captured_bytes,
            "capture_seconds": round(self.capture_seconds, 3),
            "calibration": self.calibration.summary() if self.calibrated else None,
            "target_share": self.target,
            "within_seconds": self.within,
            "cpu_share_budget": self.cpu,
            "results": [r.as_dict() for r in self.results],
            "recommended": self.recommended.name if self.recommended else None,
            "recommended_knobs": self.recommended.knobs if self.recommended else None,
            "no_recommendation": self.why_none or None,
        }


def default_knob_sets(base: Mapping[str, int | str]) -> list[dict[str, int | str]]:
    """The host's knobs as they are, then the pages_to_scan ladder at its sleep_millisecs."""
    sets: list[dict[str, int | str]] = [{}]
    sleep = int(base.get("sleep_millisecs", 20))
    for n in LADDER:
        if n != base.get("pages_to_scan"):
            sets.append({"pages_to_scan": n, "sleep_millisecs": sleep})
    return sets


def capture(
    targets: Mapping[int, str], proc: Path = procfs.PROC, fallback_hugepage: bool = False
) -> tuple[list[ProcessCapture], float]:
    """One capture of the targets' mergeable memory (and how long it took). A process that
    cannot be read is an error here: a forecast without it would be wrong."""
    from harness.twin.capture import IncrementalCapture

    t0 = time.perf_counter()
    cap = IncrementalCapture(proc, fallback_hugepage=fallback_hugepage)
    caps = cap.capture(targets)
    if cap.failures:
        raise HarnessError(f"cannot capture: {cap.failures[0]}", hint="run as root")
    return caps, time.perf_counter() - t0


def run_knobs(
    caps: Sequence[ProcessCapture],
    base: Mapping[str, int | str],
    knobs: Mapping[str, int | str],
    cal: Calibration,
    *,
    profile: str = "host",
    max_scans: int = 40,
) -> RunResult:
    """A fresh model with the host's knobs overridden by `knobs`, the capture replayed into
    it, its ksmd run from run=1 to convergence on the calibration."""
    from harness.ksm.model import ModelBackend

    # profile "host": the running kernel as set up (THP mode, CONFIG_HZ, ...), as the twin's.
    model = ModelBackend(profile=profile).kernel
    configure(model, base, knobs)
    Shadow(model).replay(caps)
    model.sysfs.write("run", "1")
    return Timeline(model, cal).run(dict(knobs), max_scans=max_scans)


def configure(model: Any, base: Mapping[str, int | str], knobs: Mapping[str, int | str]) -> None:
    """The host's knobs (`base`) with `knobs` over them, written into a fresh model in the
    kernel's safe order; run stays 0. A knob set that names pages_to_scan takes it from the
    scan-time advisor (advisor_mode none), as `ksmh set` would have to."""
    have = set(model.profile.files)
    values = {k: v for k, v in {**base, **knobs}.items() if k != "run" and k in have}
    if "pages_to_scan" in knobs and "advisor_mode" in values:
        values["advisor_mode"] = "none"
    for name in WRITE_ORDER:
        if name not in values or name == "run":
            continue
        if name == "pages_to_scan" and values.get("advisor_mode") == "scan-time":
            continue
        model.sysfs.write(name, str(values[name]))


def forecast(
    caps: Sequence[ProcessCapture],
    knob_sets: Sequence[Mapping[str, int | str]],
    cal: Calibration,
    *,
    calibrated: bool,
    base: Mapping[str, int | str],
    target: float = 0.95,
    within: float | None = None,
    cpu: float | None = None,
    targets: Mapping[int, str] | None = None,
    capture_seconds: float = 0.0,
) -> Forecast:
    """Run every knob set and pick the recommendation; see the module docstring."""
    out = Forecast(
        targets=dict(targets or {c.pid: c.name for c in caps}),
        captured_pages=sum(c.present for c in caps),
        captured_bytes=sum(c.present for c in caps) * 4096,
        capture_seconds=capture_seconds,
        calibration=cal,
        calibrated=calibrated,
        target=target,
        within=within,
        cpu=cpu,
    )
    for knobs in knob_sets:
        run = run_knobs(caps, base, knobs, cal)
        out.results.append(KnobResult(show(dict(knobs)), dict(knobs), run, target))
    recommend(out)
    return out


def recommend(f: Forecast) -> None:
    """The cheapest knob set within the budgets (see the module docstring), or why none."""
    ok: list[KnobResult] = []
    reasons: list[str] = []
    for r in f.results:
        reach = r.run.reach(f.target)
        share = r.cpu_share()
        if not r.run.converged or reach is None:
            reasons.append(f"{r.name}: no savings reached")
        elif f.within is not None and reach.t > f.within:
            reasons.append(f"{r.name}: {reach.t:.0f} s to the target")
        elif f.cpu is not None and share is not None and share > f.cpu:
            reasons.append(f"{r.name}: {100 * share:.1f}% of a core")
        else:
            ok.append(r)
    if not ok:
        f.why_none = "no knob set meets the budgets (" + "; ".join(reasons) + ")"
        return
    f.recommended = min(
        ok,
        key=lambda r: (r.run.steady_cpu_share or 0.0, r.run.reach(f.target).t),  # type: ignore[union-attr]
    )
