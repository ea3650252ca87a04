"""`ksmh compare A B`: what changed between two runs (the nightly use).

Phases are matched by name, expectations by text, waits by their line, sweep points by value.
Only differences are listed, so two identical runs print a short "no differences" report.
"""

from __future__ import annotations

from typing import Any

from harness.report.markdown import TABLE_COUNTERS
from harness.report.results import Results


def _pct(a: float, b: float) -> str:
    if a == 0:
        return "new" if b else "0%"
    return f"{(b - a) / abs(a) * 100:+.1f}%"


def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, int | float) and not isinstance(x, bool) else None


def _cell(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, int) and not isinstance(x, bool):
        return f"{x:,}"
    return str(x)


def _row(label: str, a: Any, b: Any) -> str | None:
    fa, fb = _num(a), _num(b)
    if a == b:
        return None
    if fa is not None and fb is not None:
        if isinstance(a, int) and isinstance(b, int):
            change = f"{b - a:+,}"  # counters are pages: whole numbers, never 1.2e+05
        else:
            change = f"{fb - fa:+.3f}".rstrip("0").rstrip(".")
        return f"| {label} | {_cell(a)} | {_cell(b)} | {change} ({_pct(fa, fb)}) |"
    return f"| {label} | {_cell(a)} | {_cell(b)} | |"


# Worse to the right: a nightly that went from passed to failed or error must fail its job.
VERDICT_RANK = {"passed": 0, "failed": 1, "error": 2}


def worse_verdict(a: Results, b: Results) -> bool:
    """True when B's verdict is worse than A's (passed < failed < error; unknown is worst)."""

    def rank(r: Results) -> int:
        return VERDICT_RANK.get(str(r.run.get("verdict", {}).get("status")), 3)

    return rank(b) > rank(a)


def compare(a: Results, b: Results, tolerance: float = 0.0) -> str:
    """A markdown report of the differences from run A to run B.

    Numeric changes whose relative size is at most `tolerance` are not listed.
    """
    ra, rb = a.run, b.run
    out = [f"# compare {ra.get('run_id')} -> {rb.get('run_id')}", ""]
    rows = ["| | A | B | change |", "|---|---|---|---|"]
    for label, (x, y) in _facts(ra, rb).items():
        rows.append(f"| {label} | {x} | {y} | {'' if x == y else 'changed'} |")
    out += rows
    diffs = 0
    phases_b = {p["name"]: p for p in rb.get("phases", [])}
    for pa in ra.get("phases", []):
        pb = phases_b.get(pa["name"])
        if pb is None:
            out += ["", f"## Phase {pa['name']}: only in A"]
            diffs += 1
            continue
        lines: list[str] = []
        for source in ("kernel", "model"):
            ca = pa.get("counters", {}).get(source, {}).get("end", {})
            cb = pb.get("counters", {}).get(source, {}).get("end", {})
            for name in TABLE_COUNTERS:
                if name == "full_scans":
                    continue  # depends on timing only
                x, y = ca.get(name), cb.get(name)
                fx, fy = _num(x), _num(y)
                if (
                    fx is not None
                    and fy is not None
                    and abs(fy - fx) <= tolerance * max(abs(fx), 1)
                ):
                    continue
                row = _row(f"{source}.{name}", x, y)
                if row:
                    lines.append(row)
        wb = {w.get("line"): w for w in pb.get("waits", [])}
        for w in pa.get("waits", []):
            other = wb.get(w.get("line"), {})
            row = _row(f"wait line {w.get('line')} ({w.get('kind')}) seconds",
                       _round(w.get("seconds")), _round(other.get("seconds")))  # fmt: skip
            if row and w.get("kind") == "converged":
                lines.append(row)
        eb = {e["text"]: e for e in pb.get("expectations", [])}
        for e in pa.get("expectations", []):
            status_b = eb.get(e["text"], {}).get("status", "absent")
            if e["status"] != status_b:
                lines.append(f"| `{e['text']}` | {e['status']} | {status_b} | verdict changed |")
        sb = {s["tunable"]: s for s in pb.get("sweeps", [])}
        for s in pa.get("sweeps", []):
            pts_b = {p["value"]: p for p in sb.get(s["tunable"], {}).get("points", [])}
            for p in s["points"]:
                q = pts_b.get(p["value"], {})
                for key in ("seconds", "ksmd_cpu_seconds"):
                    row = _row(f"{s['tunable']}={p['value']} {key}", _round(p.get(key)),
                               _round(q.get(key)))  # fmt: skip
                    if row:
                        lines.append(row)
        if lines:
            diffs += len(lines)
            out += ["", f"## Phase {pa['name']}", "", "| | A | B | change |", "|---|---|---|---|"]
            out += lines
    for name in phases_b:
        if name not in {p["name"] for p in ra.get("phases", [])}:
            out += ["", f"## Phase {name}: only in B"]
            diffs += 1
    sa, sb2 = ra.get("shadow") or {}, rb.get("shadow") or {}
    row = _row("shadow capture MiB/s", sa.get("capture_mib_per_s"), sb2.get("capture_mib_per_s"))
    if row:
        out += ["", "## Shadow capture", "", "| | A | B | change |", "|---|---|---|---|", row]
    if not diffs:
        out += ["", "No differences in counters, expectations, convergence times or sweeps."]
    return "\n".join(out) + "\n"


def _facts(ra: dict[str, Any], rb: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    def facts(r: dict[str, Any]) -> dict[str, Any]:
        return {
            "playbook": r.get("playbook", {}).get("name"),
            "kernel": r.get("host", {}).get("kernel_release"),
            "backend": r.get("backend"),
            "accelerator": r.get("accelerator"),
            "verdict": r.get("verdict", {}).get("status"),
            "duration s": _round(r.get("duration_seconds")),
        }

    fa, fb = facts(ra), facts(rb)
    return {k: (fa[k], fb[k]) for k in fa}


def _round(x: Any) -> Any:
    return round(x, 2) if isinstance(x, float) else x
