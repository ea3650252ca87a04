"""The playbook's `forecast` step: forecast KSM from the guests (with KSM off), then, with
`apply: true`, turn it on with the recommended knobs and measure what the forecast predicted.

    - forecast:
        knobs: ["pages_to_scan=100", "pages_to_scan=1000"]   # default: the host's + a ladder
        target: 95%          # share of the savings whose time and CPU are forecast
        within: 10m          # time budget, and
        cpu: 10%             # ksmd CPU budget (share of one core) of the recommendation
        apply: true          # then run=1 with the recommendation, measured until converged
        timeout: 1800        # seconds the measurement may take
        check: {saved_bytes: 1%, seconds_to_target: 20%, cpu_seconds_to_target: 25%}

The phase record gets `forecasts`: the forecast (every knob set), and with `apply` the
measured figures and the relative errors; a `check` beyond its tolerance fails the run.
"""

from __future__ import annotations

from typing import Any

from harness.errors import HarnessError
from harness.playbook.context import StepContext
from harness.playbook.plan import ForecastStep
from harness.twin import calibration
from harness.twin.forecast import capture, default_knob_sets, forecast
from harness.twin.knobs import show
from harness.twin.measure import compare, measure


def forecast_step(ctx: StepContext, step: ForecastStep) -> None:
    lead = ctx.leader
    now = lead.knobs()
    if now.get("run", 0) != 0:
        raise HarnessError(
            f"line {step.line}: forecast needs KSM off (run={now.get('run')}): it predicts "
            "what turning it on does",
            hint="put the forecast step before `ksm: {run: 1}`",
        )
    base = {k: v for k, v in now.items() if k != "run"}
    guests = {pid: name for name, pid in ctx.fleet.pids().items() if pid}
    cal = calibration.load()
    ctx.say(
        f"line {step.line}: forecast for {len(guests)} guests "
        + ("(calibration of " + cal.measured + ")" if cal else "(NOT calibrated: rough times)")
    )
    caps, seconds = capture(guests, ctx.proc, fallback_hugepage=lead.source != "kernel")
    f = forecast(
        caps,
        step.knob_sets or default_knob_sets(base),
        cal or calibration.DEFAULT,
        calibrated=cal is not None,
        base=base,
        target=step.target,
        within=step.within,
        cpu=step.cpu,
        targets=guests,
        capture_seconds=seconds,
    )
    rec: dict[str, Any] = {"line": step.line, "forecast": f.as_dict()}
    ctx.phase_record.setdefault("forecasts", []).append(rec)
    for r in rec["forecast"]["results"]:
        ctx.say(
            f"  {r['name']}: saves {r['saved_bytes']} B, {r['seconds_to_target']} s and "
            f"{r['cpu_seconds_to_target']} s of ksmd CPU to {100 * step.target:g}%, "
            f"{r['full_scans_to_target']} full scans"
        )
    if f.recommended is None:
        ctx.say(f"  no recommendation: {f.why_none}")
        if step.apply:
            ctx.fail(f"line {step.line}: forecast: {f.why_none}")
        return
    ctx.say(f"  recommended: {f.recommended.name}")
    if step.apply:
        _apply_and_measure(ctx, step, rec, f.recommended.knobs)


def _apply_and_measure(
    ctx: StepContext, step: ForecastStep, rec: dict[str, Any], knobs: dict[str, int | str]
) -> None:
    lead = ctx.leader
    if knobs:
        ctx.write_knobs(knobs)
    ctx.say(f"line {step.line}: run=1 with {show(knobs)}; measuring until converged")
    ctx.write_knobs({"run": 1})

    def read() -> tuple[float, float | None, dict[str, int]]:
        return lead.clock(), lead.ksmd_cpu_seconds(), lead.counters()

    m = measure(read, step.timeout, sleep=lead.sleep, page_size=lead.page_size)
    forecast_row = next(
        r for r in rec["forecast"]["results"] if r["name"] == rec["forecast"]["recommended"]
    )
    cmp = compare(forecast_row, m, step.target)
    rec["applied"] = {"knobs": knobs, **cmp}
    if not m.converged:
        ctx.fail(f"line {step.line}: KSM did not converge within {step.timeout:g} s")
    checks = rec["applied"]["checks"] = {}
    for figure, tol in step.checks.items():
        err = cmp["error"].get(figure)
        ok = err is not None and abs(err) <= tol
        checks[figure] = {"tolerance": tol, "error": err, "status": "passed" if ok else "failed"}
        mark = "ok  " if ok else "FAIL"
        ctx.say(
            f"  {mark} {figure}: forecast {cmp['forecast'].get(figure)}, measured "
            f"{cmp['measured'].get(figure)}, error {_pct(err)} (tolerance {_pct(tol)})"
        )
        if not ok:
            ctx.fail(
                f"line {step.line}: forecast {figure} off by {_pct(err)} (tolerance {_pct(tol)})"
            )
    ctx.sync(f"after forecast line {step.line}")


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:+.1f}%"
