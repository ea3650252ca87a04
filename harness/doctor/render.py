"""The doctor's report as text (for people) and as JSON (for tools)."""

from __future__ import annotations

from typing import Any

from harness.console import plural
from harness.doctor.analysis import Analysis, ProcessSummary
from harness.doctor.catalog import Finding, Severity
from harness.doctor.exposure import format_matrix
from harness.units import format_size

PAGE = 4096


def exit_status(findings: list[Finding]) -> int:
    """0 when nothing needs action, 1 when a warning or critical finding does."""
    return 1 if any(f.needs_action for f in findings) else 0


def _size(pages: int | None) -> str:
    return "-" if pages is None else format_size(pages * PAGE)


def _row(s: ProcessSummary) -> str:
    profit = "-" if s.profit is None else format_size(s.profit)
    name = f"{s.pid} {s.name}"
    name = name if len(name) <= 34 else name[:33] + "~"
    return (
        f"{name:<35}{_size(s.scanned_pages):>11}{_size(s.could_merge):>13}"
        f"{_size(s.merged):>11}{_size(s.thp_pages):>11}{profit:>11}"
    )


def render_text(a: Analysis, findings: list[Finding]) -> str:
    f = a.facts
    h = f.host
    rate = ""
    if f.bytes_keyed:
        rate = f", {format_size(f.bytes_keyed)} keyed"
    out = [
        f"ksmh doctor: {plural(len(f.processes), 'process')} ({f.selection}){rate}, "
        f"{f.seconds:.1f} s (window {f.watch.seconds if f.watch else 0:.1f} s)"
    ]
    if h.present:
        knobs = ("run", "pages_to_scan", "sleep_millisecs", "merge_across_nodes", "use_zero_pages")
        out.append("KSM: " + " ".join(f"{k}={h.knobs[k]}" for k in knobs if k in h.knobs)
                   + f" advisor={h.advisor or '-'}")  # fmt: skip
        counters = ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile",
                    "full_scans", "general_profit")  # fmt: skip
        out.append("     " + " ".join(f"{k}={h.counters[k]}" for k in counters if k in h.counters))
    else:
        out.append(f"KSM: absent ({h.ksm_root})")
    avail = h.meminfo.get("MemAvailable")
    out.append(
        f"THP: enabled {h.thp.get('enabled', '-')}; MemAvailable {format_size(avail)}; "
        f"NUMA nodes {','.join(map(str, h.nodes)) or '-'}; "
        f"{plural(len(f.users), 'process')} registered with KSM"
    )
    out += ["", f"{'PROCESS':<35}{'SCANNED':>11}{'COULD MERGE':>13}{'MERGED':>11}"
                f"{'IN THP':>11}{'PROFIT':>11}"]  # fmt: skip
    out += [_row(s) for _, s in sorted(a.summaries.items())]
    acting = sum(1 for x in findings if x.needs_action)
    out += ["", f"findings: {len(findings)} ({acting} need action)"]
    for x in findings:
        out.append(f"[{x.severity}] {x.kind}: {x.message}")
        out += [f"    evidence: {e}" for e in x.evidence]
        out.append(f"    fix: {x.fix}")
    if a.exposure is not None and len(a.exposure.groups) > 1:
        out += ["", "sharing exposure (distinct KSM pages mapped by both; diagonal: by each):"]
        out += ["  " + line for line in format_matrix(a.exposure)]
    for line in f.not_checked:
        out.append(f"not checked: {line}")
    return "\n".join(out)


def as_json(a: Analysis, findings: list[Finding]) -> dict[str, Any]:
    f = a.facts
    h = f.host
    return {
        "selection": f.selection,
        "exit_status": exit_status(findings),
        "seconds": round(f.seconds, 3),
        "bytes_keyed": f.bytes_keyed,
        "host": {
            "ksm": str(h.ksm_root) if h.present else None,
            "knobs": h.knobs,
            "counters": h.counters,
            "thp": h.thp,
            "mem_available": h.meminfo.get("MemAvailable"),
            "numa_nodes": h.nodes,
            "root": h.root,
        },
        "processes": [s.as_dict() for _, s in sorted(a.summaries.items())],
        "ksm_users": [u.__dict__ for u in f.users],
        "window": None
        if f.watch is None
        else {
            "seconds": round(f.watch.seconds, 3),
            "values": f.watch.values,
            "writers_named": f.watch.fanotify,
            "counters_start": f.watch.counters_start,
            "counters_end": f.watch.counters_end,
        },
        "findings": [x.as_dict() for x in findings],
        "exposure": a.exposure.as_dict() if a.exposure is not None else None,
        "not_checked": f.not_checked,
        "severities": [str(s) for s in Severity],
    }
