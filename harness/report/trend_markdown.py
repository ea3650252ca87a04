"""trend.md: what is flagged (and since which night), then per series its nights, each metric's
latest value against its baseline, past excursions and the plots."""

from __future__ import annotations

from typing import Any

from harness.console import plural
from harness.report.trend import FAMILIES, Group, Metric, Trend, latest_baseline
from harness.units import human_bytes

CAPTIONS = {f.name: f.title for f in FAMILIES}


def fmt(value: float | None, unit: str, signed: bool = False) -> str:
    """A value in its unit, for tables."""
    if value is None:
        return "-"
    if unit == "bytes":
        text = human_bytes(int(abs(value)))
        return ("+" if value >= 0 else "-") + text if signed else text
    if unit == "seconds":
        return f"{value:+.2f} s" if signed else f"{value:.2f} s"
    if unit == "pages":
        return f"{value:+.0f}"
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def _short(text: Any, n: int = 12) -> str:
    if text is None:
        return "-"
    s = str(text)
    return s.split(":", 1)[-1][:n] if s.startswith("sha256:") else s[:n]


def _flags_table(doc: dict[str, Any]) -> list[str]:
    rows = []
    for g in doc["groups"]:
        series = f"{g['playbook']} / {g['host']} / {g['kernel_release']}"
        for f in g["flags"]:
            changed = ", ".join(
                f"{k} {_short(a)} -> {_short(b)}" for k, (a, b) in f["changed_at_start"].items()
            )
            ratio = f" ({f['change_ratio']:+.1%})" if f["change_ratio"] is not None else ""
            rows.append(
                f"| {series} | `{f['metric']}` | {f['since']} | {f['nights']} | "
                f"{fmt(f['baseline_median'], f['unit'])} | {fmt(f['latest'], f['unit'])} | "
                f"{fmt(f['change'], f['unit'], signed=True)}{ratio} | {f['direction']} | "
                f"{changed or '-'} |"
            )
    if not rows:
        return ["Nothing flagged: every metric's latest night lies within the spread of the "
                "nights before it (or has too few nights before it to judge)."]  # fmt: skip
    return [
        "| series | metric | since night | nights | baseline median | latest | change | "
        "| what changed that night |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
    ]


def _nights_table(g: Group) -> list[str]:
    out = [
        "| # | run | started | verdict | seconds | harness | qemu | libvirt | model | playbook |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, n in enumerate(g.nights):
        p = n.provenance
        rev = _short(p.get("harness_revision"), 10) + ("+" if p.get("harness_dirty") else "")
        started = n.started.strftime("%Y-%m-%d %H:%M") if n.started else "-"
        seconds = f"{n.duration_seconds:.0f}" if n.duration_seconds is not None else "-"
        out.append(
            f"| {i + 1} | {n.run_id} | {started} | {n.status} | {seconds} | {rev} | "
            f"{p.get('qemu') or '-'} | {p.get('libvirt') or '-'} | "
            f"{p.get('model_profile') or '-'} | {_short(p.get('playbook_digest'))} |"
        )
    return out


def _state(g: Group, m: Metric, trend: Trend) -> str:
    if m.flagged is not None:
        return f"**flagged** since {g.nights[m.flagged.start].run_id}"
    if m.values[-1] is None:
        return "not in the latest night"
    have = sum(1 for v in m.values[:-1] if v is not None)
    if have < trend.rule.min_nights:
        return f"too few nights to judge ({have} of {trend.rule.min_nights})"
    return "within spread"


def _metrics_table(g: Group, trend: Trend) -> list[str]:
    out = [
        "| metric | latest | baseline median | threshold | state |",
        "|---|---|---|---|---|",
    ]
    for m in g.metrics:
        unit = m.family.unit
        b = latest_baseline(m, trend.rule)
        out.append(
            f"| `{m.name}` | {fmt(m.values[-1], unit)} | "
            f"{fmt(b['median'], unit) if b else '-'} | {fmt(b['threshold'], unit) if b else '-'} "
            f"| {_state(g, m, trend)} |"
        )
    return out


def _past(g: Group) -> list[str]:
    lines = []
    for m in g.metrics:
        for e in m.excursions:
            if e.kind == "open":
                continue
            lines.append(
                f"- `{m.name}`: {e.kind} {'up' if e.direction > 0 else 'down'} from "
                f"{g.nights[e.start].run_id} to {g.nights[e.end].run_id} (baseline "
                f"{fmt(e.baseline.median, m.family.unit)})"
            )
    return lines


def render_markdown(trend: Trend, doc: dict[str, Any], plots: dict[str, str]) -> str:
    rule = trend.rule
    out = [
        "# Nightly trend",
        "",
        f"{plural(trend.runs_read, 'run')} from {', '.join(doc['inputs'])}, "
        f"{len(trend.groups)} series (playbook, host, kernel release); generated "
        f"{doc['generated']}.",
        "",
        f"Rule: the latest night is flagged when it differs from the median of the previous "
        f"{rule.window} nights by more than max({rule.k:g} x 1.4826 x MAD, the metric's floors), "
        f"with at least {rule.min_nights} nights before it; the flag names the night the step "
        'started (see README, "Nightly series").',
        "",
        f"## Flagged: {trend.flagged}",
        "",
        *_flags_table(doc),
    ]
    for g in trend.groups:
        out += ["", f"## {g.title}", "", *_nights_table(g), "", *_metrics_table(g, trend)]
        past = _past(g)
        if past:
            out += ["", "Earlier excursions (ended):", "", *past]
    if plots:
        out += ["", "## Plots"]
        for fam, name in plots.items():
            out += ["", f"### {CAPTIONS.get(fam, fam)}", "", f"![{fam}]({name})"]
    out += ["", "## Floors", "", "| metric | relative | absolute |", "|---|---|---|"]
    for f in trend.families:
        out.append(f"| {f.name} | {f.floors.rel:g} x median | {fmt(f.floors.abs, f.unit)} |")
    if trend.skipped:
        out += ["", "## Skipped files", ""]
        out += [f"- {f}: {why}" for f, why in trend.skipped]
    return "\n".join(out) + "\n"
