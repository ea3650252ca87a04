"""report.md: the run's verdict, facts, per-phase counters (kernel, model, delta), every
expectation's verdict, sweeps, and the plots embedded as images."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from harness.report.forecast import forecast_lines
from harness.report.results import Results

TABLE_COUNTERS = (
    "pages_shared",
    "pages_sharing",
    "pages_unshared",
    "pages_volatile",
    "full_scans",
    "stable_node_chains",
    "stable_node_dups",
    "ksm_zero_pages",
    "general_profit",
)
MARK = {"passed": "PASS", "failed": "FAIL", "skipped": "skip"}
CAPTIONS = {
    "counters": "KSM counters over time, kernel (solid) and model (dashed)",
    "convergence": "Time to converge",
    "guests": "Merging pages per guest",
    "heatmap": "Guest-by-guest pages of identical content (shadow capture)",
}


def _v(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.3g}"
    return str(x)


def _counter_table(counters: Mapping[str, Any]) -> list[str]:
    sources = [s for s in ("kernel", "model") if s in counters]
    if not sources:
        return ["(no counters recorded)"]
    head = "| counter | " + " | ".join(f"{s} end | {s} delta" for s in sources)
    if len(sources) == 2:
        head += " | kernel - model"
    lines = [head + " |", "|---" * (1 + 2 * len(sources) + (len(sources) == 2)) + "|"]
    for name in TABLE_COUNTERS:
        cells = []
        ends = []
        for s in sources:
            end = counters[s].get("end", {}).get(name)
            delta = counters[s].get("delta", {}).get(name)
            ends.append(end)
            cells += [_v(end), _v(delta)]
        if all(c == "-" for c in cells):
            continue
        if len(sources) == 2:
            k, m = ends
            cells.append("-" if k is None or m is None else _v(k - m))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def render_markdown(res: Results, plots: Mapping[str, str]) -> str:
    run = res.run
    pb = run.get("playbook", {})
    verdict = run.get("verdict", {})
    out = [f"# ksm-harness run {run.get('run_id', '?')}: {pb.get('name', '?')}", ""]
    status = verdict.get("status", "unknown")
    out.append(f"**Verdict: {status.upper()}** (exit status {verdict.get('exit_status', '?')})")
    if verdict.get("error"):
        out.append(f"\nError: {verdict['error']}")
    if verdict.get("failed"):
        out += ["", "Failed expectations:"] + [f"- {t}" for t in verdict["failed"]]
    if run.get("banner"):
        out += ["", f"> {run['banner']}"]
    host = run.get("host", {})
    out += [
        "",
        "## Run",
        "",
        f"- playbook: `{pb.get('file', '?')}`: {pb.get('description', '')}",
        f"- KSM backend: {run.get('backend', '?')}; accelerator: {run.get('accelerator', '?')}",
        f"- host: {host.get('hostname', '?')}, kernel {host.get('kernel_release', '?')}, "
        f"{host.get('cpus', '?')} CPUs, {_v(host.get('mem_total_mib'))} MiB RAM",
        f"- started {run.get('started', '?')}, took {_v(run.get('duration_seconds'))} s",
        f"- guests: {len(run.get('guests', []))}",
    ]
    tun = run.get("tunables", {})
    if tun.get("run"):
        out.append(
            "- tunables for the run: " + ", ".join(f"{k}={v}" for k, v in tun["run"].items())
        )
    sh = run.get("shadow")
    if sh:
        out.append(
            f"- shadow capture: {sh.get('captures', 0)} captures, "
            f"{_v(sh.get('mib_hashed'))} MiB hashed at {_v(sh.get('capture_mib_per_s'))} MiB/s, "
            f"model scans {_v(sh.get('model_scans'))} in {_v(sh.get('model_seconds'))} s"
            + (f", {sh['pages_vanished']} pages vanished" if sh.get("pages_vanished") else "")
        )
    for phase in run.get("phases", []):
        out += ["", f"## Phase {phase['name']}", ""]
        out += _counter_table(phase.get("counters", {}))
        for w in phase.get("waits", []):
            out.append(
                f"\n- wait ({w.get('kind')}, line {w.get('line')}): {_v(w.get('seconds'))} s, "
                f"{_v(w.get('scans'))} full scans" + (" (timed out)" if w.get("timed_out") else "")
            )
        if phase.get("verify"):
            bad = {g: n for g, n in phase["verify"].items() if n != 0}
            out.append(f"\n- verify: {bad if bad else 'clean'}")
        for s in phase.get("sweeps", []):
            out += ["", f"Sweep of {s['tunable']}:", "",
                    "| value | seconds to converge | full scans | ksmd CPU s | pages_sharing |",
                    "|---|---|---|---|---|"]  # fmt: skip
            for p in s["points"]:
                out.append(
                    f"| {p['value']} | {_v(p.get('seconds'))} | {_v(p.get('scans'))} | "
                    f"{_v(p.get('ksmd_cpu_seconds'))} | {_v(p.get('pages_sharing'))} |"
                )
        for rec in phase.get("forecasts", []):
            out += forecast_lines(rec)
        if phase.get("expectations"):
            out += ["", "| | expectation | line | detail |", "|---|---|---|---|"]
            for e in phase["expectations"]:
                out.append(
                    f"| {MARK.get(e['status'], e['status'])} | `{e['text']}` | {e.get('line')} "
                    f"| {e.get('detail', '')} |"
                )
    if plots:
        out += ["", "## Plots"]
        for kind in ("counters", "convergence", "guests", "heatmap"):
            if kind in plots:
                out += ["", f"### {CAPTIONS[kind]}", "", f"![{CAPTIONS[kind]}]({plots[kind]})"]
    return "\n".join(out) + "\n"
