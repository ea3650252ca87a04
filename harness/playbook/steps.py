"""One function per step kind; each records what happened in the phase's record.

Steps see the run only through StepContext (harness.playbook.context): the leading side for
waits and timing, sync points, knob writes, the fleet. They never ask which side leads.
"""

from __future__ import annotations

import time
from typing import Any

from harness.console import plural
from harness.errors import GuestError, HarnessError, ScanTimeout
from harness.playbook.context import StepContext
from harness.playbook.plan import (
    AgentStep,
    ExpectStep,
    ForecastStep,
    KsmStep,
    Step,
    SweepStep,
    WaitStep,
)


def run_step(ctx: StepContext, step: Step) -> None:
    if isinstance(step, AgentStep):
        agent_step(ctx, step)
    elif isinstance(step, KsmStep):
        ctx.say(f"line {step.line}: ksm " + " ".join(f"{k}={v}" for k, v in step.values.items()))
        ctx.write_knobs(dict(step.values))
    elif isinstance(step, WaitStep):
        wait_step(ctx, step)
    elif isinstance(step, ExpectStep):
        expect_step(ctx, step)
    elif isinstance(step, SweepStep):
        sweep_step(ctx, step)
    elif isinstance(step, ForecastStep):
        from harness.playbook.forecast_step import forecast_step

        forecast_step(ctx, step)
    else:  # pragma: no cover - the schema builds only the kinds above
        raise HarnessError(f"unknown step {step!r}")


def agent_step(ctx: StepContext, step: AgentStep) -> None:
    selection = ",".join(str(i) for i in step.guests)
    args = step.agent_args()
    ctx.say(f"line {step.line}: {step.command} {' '.join(args)} on guests {selection}")
    t0 = time.monotonic()
    result = ctx.fleet.run(step.command, *args, guests=selection)
    seconds = time.monotonic() - t0
    per_guest: dict[str, str] = {}
    failed: list[str] = []
    for name, res in result.items():
        if res.ok:
            per_guest[name] = res.value.text if res.value is not None else "ok"
            if step.command == "verify" and res.value is not None:
                ctx.phase_record["verify"][name] = res.value.int("mismatched")
        else:
            per_guest[name] = f"error: {res.error}"
            failed.append(f"{name}: {res.error}")
    ctx.phase_record["agent"].append(
        {
            "line": step.line,
            "command": step.command,
            "args": list(args),
            "seconds": round(seconds, 3),
            "guests": per_guest,
        }
    )
    if failed:
        raise GuestError(
            f"line {step.line}: {step.command} failed on {len(failed)} of "
            f"{plural(len(per_guest), 'guest')}: {'; '.join(failed)}"
        )
    ctx.say(f"  done in {seconds:.1f} s")


def _converge(ctx: StepContext, tolerance: float, timeout: float) -> tuple[bool, int, int | None]:
    """Scan until pages_sharing moves by at most `tolerance` over one full scan.

    Returns (converged, full scans waited, pages_sharing). tolerance < 1 is relative to
    pages_sharing, >= 1 is in pages. The timeout is in the leader's seconds (wall clock for
    the kernel, virtual time for the model).
    """
    lead = ctx.leader
    deadline = lead.clock() + timeout
    scans = 0

    def sharing() -> int:
        return lead.counters().get("pages_sharing", 0)

    def one_scan() -> None:
        nonlocal scans
        left = deadline - lead.clock()
        if left <= 0:
            raise ScanTimeout("converge deadline")
        lead.wait_full_scans(1, left)
        scans += 1

    try:
        one_scan()  # start at a scan boundary
        prev = sharing()
        while True:
            one_scan()
            cur = sharing()
            limit = tolerance * max(cur, prev, 1) if tolerance < 1 else tolerance
            if abs(cur - prev) <= limit:
                return True, scans, cur
            ctx.say(f"  scan {scans}: pages_sharing {cur} ({cur - prev:+d})")
            prev = cur
    except ScanTimeout:
        return False, scans, sharing()


def wait_step(ctx: StepContext, step: WaitStep) -> None:
    rec: dict[str, Any] = {"line": step.line}
    lead = ctx.leader
    t0 = time.monotonic()
    if step.full_scans is not None:
        rec["kind"] = "full_scans"
        ctx.say(f"line {step.line}: wait for {step.full_scans} full scans")
        lead.wait_full_scans(step.full_scans, step.timeout)
        rec["scans"] = step.full_scans
    elif step.seconds is not None:
        rec["kind"] = "seconds"
        ctx.say(f"line {step.line}: wait {step.seconds:g} s")
        lead.sleep(step.seconds)
    else:
        rec["kind"] = "converged"
        tol = step.converged_tolerance or 0.0
        ctx.say(
            f"line {step.line}: wait until converged "
            f"(tolerance {tol:g}, timeout {step.timeout:g} s)"
        )
        ok, scans, sharing = _converge(ctx, tol, step.timeout)
        rec.update(scans=scans, pages_sharing=sharing, timed_out=not ok)
        if not ok:
            text = f"line {step.line}: not converged within {step.timeout:g} s ({scans} scans)"
            ctx.fail(text)
            ctx.say("  " + text)
    rec["seconds"] = round(time.monotonic() - t0, 3)
    rec["t_end"] = round(ctx.elapsed(), 3)
    ctx.say(f"  waited {rec['seconds']:.1f} s")
    ctx.phase_record["waits"].append(rec)
    ctx.sync(f"after wait line {step.line}")


def expect_step(ctx: StepContext, step: ExpectStep) -> None:
    values = ctx.sync(f"expect line {step.line}")
    ectx = ctx.expectation_context(values)
    for e in step.expectations:
        v = e.evaluate(ectx)
        ctx.phase_record["expectations"].append(
            {"text": e.text, "line": e.line, "status": v.status, "detail": v.detail}
        )
        mark = {"passed": "ok  ", "failed": "FAIL", "skipped": "skip"}[v.status]
        ctx.say(f"  {mark} {e.text}  ({v.detail})")
        if v.failed:
            ctx.fail(f"line {e.line}: {e.text} ({v.detail})")


def sweep_step(ctx: StepContext, step: SweepStep) -> None:
    """Per value: unmerge (run=2), set the knob, run=1, time to converge, ksmd CPU used.

    Time and CPU come from the leading side: measured on the kernel, the model's virtual clock
    and CPU estimate in a model-only run.
    """
    points: list[dict[str, Any]] = []
    ctx.phase_record["sweeps"].append(
        {"tunable": step.tunable, "line": step.line, "points": points}
    )
    lead = ctx.leader
    for value in step.values:
        ctx.say(f"line {step.line}: sweep {step.tunable}={value}")
        ctx.write_knobs({"run": 2})
        ctx.write_knobs({step.tunable: value})
        cpu0, t0 = lead.ksmd_cpu_seconds(), lead.clock()
        ctx.write_knobs({"run": 1})
        ok, scans, sharing = _converge(ctx, step.tolerance, step.timeout)
        cpu1 = lead.ksmd_cpu_seconds()
        point: dict[str, Any] = {
            "value": value,
            "scans": scans,
            "pages_sharing": sharing,
            "converged": ok,
            "seconds": round(lead.clock() - t0, 3),
        }
        if cpu0 is not None and cpu1 is not None:
            point["ksmd_cpu_seconds"] = round(cpu1 - cpu0, 3)
        points.append(point)
        if not ok:
            ctx.fail(
                f"line {step.line}: {step.tunable}={value} did not converge in {step.timeout:g} s"
            )
        ctx.say(
            f"  {step.tunable}={value}: {point['seconds']} s, {scans} scans, "
            f"ksmd cpu {point.get('ksmd_cpu_seconds')} s"
        )
        ctx.sync(f"sweep {step.tunable}={value}")
