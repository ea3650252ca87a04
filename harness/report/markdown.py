"""report.md: the run's verdict, facts, per-phase counters (kernel, model, delta), every
expectation's verdict, sweeps, and the plots embedded as images."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from harness.console import plural
from harness.report.forecast import forecast_lines
from harness.report.results import Results
from harness.units import format_size

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
BYTE_COUNTERS = {"general_profit"}  # the others count pages
MARK = {"passed": "PASS", "failed": "FAIL", "skipped": "skip"}
CAPTIONS = {
    "counters": "KSM counters over time: the kernel as sampled, the model at sync points",
    "scans": "KSM counters at the end of each full scan: model (line), kernel frozen (dots)",
    "convergence": "Time to converge",
    "guests": "Merging pages per guest",
    "heatmap": "Guest-by-guest pages of identical content (shadow capture)",
}


# Why some counters of a fleet run agree to the page and others cannot, for the reader of the
# per-phase tables (issue 18: "counter-exact" next to pages_unshared 3,809 vs 0 needs this).
READING = [
    "The per-phase tables read both sides at sync points: ksmd is paused wherever it is in a",
    "full scan, and the model, fed a capture of the guests' memory, is stepped through as many",
    "full scans as ksmd made. So:",
    "",
    "- `pages_shared`, `pages_sharing`, `stable_node_chains`, `stable_node_dups`,",
    "  `ksm_zero_pages` and `general_profit` describe merged memory, which changes little",
    "  within a scan once the fleet has converged: these are the counters to compare (the",
    "  expectations do).",
    "- `pages_unshared` and `pages_volatile` describe where each page is in the current scan",
    "  (inserted into this scan's unstable tree or not yet revisited): a kernel paused mid-scan",
    "  and a model at the end of a scan differ by the pages between the two positions, so a",
    "  difference there is expected, not a model error.",
    "- `full_scans` and `pages_scanned` are cumulative; compare them as deltas.",
    "- Guests keep writing between captures (their kernels' own memory), which the model sees",
    "  only at the next capture: expect differences of a few pages per guest.",
    "",
    "The exact comparison is per full scan: `scans.csv` and the per-scan plot hold the model's",
    "counters at the end of every scan and, with `scan_samples: true`, the kernel's frozen",
    "end-of-scan samples.",
]


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
        show = _size if name in BYTE_COUNTERS else _v  # pages as numbers, bytes as sizes
        cells = []
        ends = []
        for s in sources:
            end = counters[s].get("end", {}).get(name)
            delta = counters[s].get("delta", {}).get(name)
            ends.append(end)
            cells += [show(end), show(delta)]
        if all(c == "-" for c in cells):
            continue
        if len(sources) == 2:
            k, m = ends
            cells.append("-" if k is None or m is None else show(k - m))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _size(x: Any) -> str:
    return format_size(x) if isinstance(x, int | float) else _v(x)


def render_markdown(res: Results, plots: Mapping[str, str]) -> str:
    run = res.run
    pb = run.get("playbook", {})
    verdict = run.get("verdict", {})
    out = [f"# ksm-harness run {run.get('run_id', '?')}: {pb.get('name', '?')}", ""]
    status = verdict.get("status", "unknown")
    out.append(f"**Verdict: {status.upper()}** (exit status {verdict.get('exit_status', '?')})")
    counts = verdict.get("expectations")
    if counts:
        held = f"{counts.get('passed', 0)} held"
        rest = [f"{counts[k]} {k}" for k in ("failed", "skipped") if counts.get(k)]
        out.append(f"\nExpectations: {', '.join([held, *rest])}.")
    if verdict.get("error"):
        out.append(f"\nError: {verdict['error']}")
    if verdict.get("failed"):
        out += ["", "Failed expectations:"] + [f"- {t}" for t in verdict["failed"]]
    if run.get("banner"):
        out += ["", f"> {run['banner']}"]
    if run.get("unguarded"):
        out += ["", f"> {run['unguarded']}"]
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
            + (
                f", {plural(sh['pages_vanished'], 'page')} vanished"
                if sh.get("pages_vanished")
                else ""
            )
        )
    if run.get("backend") == "kernel" and run.get("shadow"):
        out += ["", "## Reading kernel against model", "", *READING]
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
    out += _exposure_section(run.get("sharing_exposure"))
    if plots:
        out += ["", "## Plots"]
        for kind in ("counters", "scans", "convergence", "guests", "heatmap"):
            if kind in plots:
                out += ["", f"### {CAPTIONS[kind]}", "", f"![{CAPTIONS[kind]}]({plots[kind]})"]
    return "\n".join(out) + "\n"


def _exposure_section(e: Mapping[str, Any] | None) -> list[str]:
    """Which guests share merged pages: distinct KSM pages mapped by both (the diagonal: by
    each), read from the guests' page tables at the end of the named phase."""
    if not e:
        return []
    out = ["", "## Sharing exposure", ""]
    if e.get("error"):
        return [*out, f"Not measured: {e['error']}"]
    out.append(
        f"Distinct KSM pages mapped by both guests (diagonal: by the guest), from pagemap and "
        f"/proc/kpageflags at the end of phase {e.get('phase', '?')}:"
    )
    groups = list(e.get("groups", []))
    out += ["", "| | " + " | ".join(groups) + " |", "|---" * (len(groups) + 1) + "|"]
    for g, row in zip(groups, e.get("pages", []), strict=False):
        out.append(f"| {g} | " + " | ".join(str(v) for v in row) + " |")
    return out
