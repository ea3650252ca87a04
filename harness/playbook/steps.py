"""One function per step kind; each records what happened in the runner's phase record."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from harness.errors import GuestError, HarnessError, ScanTimeout
from harness.playbook import host
from harness.playbook.schema import AgentStep, ExpectStep, KsmStep, Step, SweepStep, WaitStep

if TYPE_CHECKING:
    from harness.playbook.runner import Runner


def run_step(r: Runner, step: Step) -> None:
    if isinstance(step, AgentStep):
        agent_step(r, step)
    elif isinstance(step, KsmStep):
        r.say(f"line {step.line}: ksm " + " ".join(f"{k}={v}" for k, v in step.values.items()))
        r._ksm_write(dict(step.values))
    elif isinstance(step, WaitStep):
        wait_step(r, step)
    elif isinstance(step, ExpectStep):
        expect_step(r, step)
    elif isinstance(step, SweepStep):
        sweep_step(r, step)
    else:  # pragma: no cover - the schema builds only the kinds above
        raise HarnessError(f"unknown step {step!r}")


def agent_step(r: Runner, step: AgentStep) -> None:
    assert r.fleet is not None
    selection = ",".join(str(i) for i in step.guests)
    args = step.agent_args()
    r.say(f"line {step.line}: {step.command} {' '.join(args)} on guests {selection}")
    t0 = time.monotonic()
    result = r.fleet.run(step.command, *args, guests=selection)
    seconds = time.monotonic() - t0
    per_guest: dict[str, str] = {}
    failed: list[str] = []
    for name, res in result.items():
        if res.ok:
            per_guest[name] = res.value.text if res.value is not None else "ok"
            if step.command == "verify" and res.value is not None:
                r.phase_rec["verify"][name] = res.value.int("mismatched")
        else:
            per_guest[name] = f"error: {res.error}"
            failed.append(f"{name}: {res.error}")
    r.phase_rec["agent"].append(
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
            f"line {step.line}: {step.command} failed on {len(failed)} of {len(per_guest)} "
            f"guests: {'; '.join(failed)}"
        )
    r.say(f"  done in {seconds:.1f} s")


def _converge(r: Runner, tolerance: float, timeout: float) -> tuple[bool, int, float, int | None]:
    """Scan until pages_sharing moves by at most `tolerance` over one full scan.

    Returns (converged, full scans waited, seconds, pages_sharing). tolerance < 1 is relative
    to pages_sharing, >= 1 is in pages.
    """
    t0 = time.monotonic()
    deadline = t0 + timeout
    scans = 0

    def sharing() -> int:
        if r.kernel is not None:
            return r.kernel.read_counters().pages_sharing or 0
        assert r.model is not None
        return int(r.model.counters().get("pages_sharing", 0))

    def one_scan() -> None:
        nonlocal scans
        left = deadline - time.monotonic()
        if left <= 0:
            raise ScanTimeout("converge deadline")
        if r.kernel is not None:
            r.kernel.wait_full_scans(1, left)
        else:
            assert r.model is not None
            r.model.sync(0)  # the guests keep running: look at them again each scan
            if r.model.step(1) == 0:
                raise ScanTimeout("the model's ksmd is not running (run=1 missing?)")
        scans += 1

    try:
        one_scan()  # start at a scan boundary
        prev = sharing()
        while True:
            one_scan()
            cur = sharing()
            limit = tolerance * max(cur, prev, 1) if tolerance < 1 else tolerance
            if abs(cur - prev) <= limit:
                return True, scans, time.monotonic() - t0, cur
            r.say(f"  scan {scans}: pages_sharing {cur} ({cur - prev:+d})")
            prev = cur
    except ScanTimeout:
        return False, scans, time.monotonic() - t0, sharing()


def wait_step(r: Runner, step: WaitStep) -> None:
    rec: dict[str, Any] = {"line": step.line}
    t0 = time.monotonic()
    if step.full_scans is not None:
        rec["kind"] = "full_scans"
        r.say(f"line {step.line}: wait for {step.full_scans} full scans")
        if r.kernel is not None:
            r.kernel.wait_full_scans(step.full_scans, step.timeout)
        else:
            assert r.model is not None
            r.model.sync(0)
            r.model.step(step.full_scans)
        rec["scans"] = step.full_scans
    elif step.seconds is not None:
        rec["kind"] = "seconds"
        r.say(f"line {step.line}: wait {step.seconds:g} s")
        if r.kernel is not None:
            time.sleep(step.seconds)
        else:
            assert r.model is not None
            r.model.sync(0)
            r.model.kernel.advance(step.seconds)  # the model's ksmd in virtual time
            r.model.publish()
    else:
        rec["kind"] = "converged"
        tol = step.converged_tolerance or 0.0
        r.say(
            f"line {step.line}: wait until converged "
            f"(tolerance {tol:g}, timeout {step.timeout:g} s)"
        )
        ok, scans, _seconds, sharing = _converge(r, tol, step.timeout)
        rec.update(scans=scans, pages_sharing=sharing, timed_out=not ok)
        if not ok:
            text = f"line {step.line}: not converged within {step.timeout:g} s ({scans} scans)"
            r.failed.append(text)
            r.say("  " + text)
    rec["seconds"] = round(time.monotonic() - t0, 3)
    rec["t_end"] = round(r.t(), 3)
    r.say(f"  waited {rec['seconds']:.1f} s")
    r.phase_rec["waits"].append(rec)
    r._sync(f"after wait line {step.line}")


def expect_step(r: Runner, step: ExpectStep) -> None:
    values = r._sync(f"expect line {step.line}")
    ctx = r.context(values)
    for e in step.expectations:
        v = e.evaluate(ctx)
        r.phase_rec["expectations"].append(
            {"text": e.text, "line": e.line, "status": v.status, "detail": v.detail}
        )
        mark = {"passed": "ok  ", "failed": "FAIL", "skipped": "skip"}[v.status]
        r.say(f"  {mark} {e.text}  ({v.detail})")
        if v.failed:
            r.failed.append(f"line {e.line}: {e.text} ({v.detail})")
    with r.state.lock:
        r.state.failed = len(r.failed)


def sweep_step(r: Runner, step: SweepStep) -> None:
    """Per value: unmerge (run=2), set the knob, run=1, time to converge, ksmd CPU used."""
    points: list[dict[str, Any]] = []
    r.phase_rec["sweeps"].append({"tunable": step.tunable, "line": step.line, "points": points})
    ksmd = host.ksmd_pid(r.opts.proc) if r.kernel is not None else None
    for value in step.values:
        r.say(f"line {step.line}: sweep {step.tunable}={value}")
        r._ksm_write({"run": 2})
        r._ksm_write({step.tunable: value})
        cpu0 = host.cpu_seconds(ksmd, r.opts.proc) if ksmd else None
        virt0 = r.model.kernel.now if r.kernel is None and r.model is not None else None
        ns0 = (
            getattr(r.model.kernel, "ksmd_runtime_ns", None)
            if r.kernel is None and r.model
            else None
        )
        r._ksm_write({"run": 1})
        ok, scans, seconds, sharing = _converge(r, step.tolerance, step.timeout)
        point: dict[str, Any] = {
            "value": value,
            "scans": scans,
            "pages_sharing": sharing,
            "converged": ok,
        }
        if r.kernel is not None:
            point["seconds"] = round(seconds, 3)
            if ksmd and cpu0 is not None:
                point["ksmd_cpu_seconds"] = round(host.cpu_seconds(ksmd, r.opts.proc) - cpu0, 3)
        elif r.model is not None and virt0 is not None:
            # Model-only: the model's virtual clock and ksmd CPU estimate.
            point["seconds"] = round(r.model.kernel.now - virt0, 3)
            ns1 = getattr(r.model.kernel, "ksmd_runtime_ns", None)
            if ns0 is not None and ns1 is not None:
                point["ksmd_cpu_seconds"] = round((ns1 - ns0) / 1e9, 3)
        points.append(point)
        if not ok:
            r.failed.append(
                f"line {step.line}: {step.tunable}={value} did not converge in {step.timeout:g} s"
            )
        r.say(
            f"  {step.tunable}={value}: {point.get('seconds')} s, {scans} scans, "
            f"ksmd cpu {point.get('ksmd_cpu_seconds')} s"
        )
        r._sync(f"sweep {step.tunable}={value}")
