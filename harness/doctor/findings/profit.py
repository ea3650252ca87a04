"""Cost and risk: negative profit, and what unmerging everything would need."""

from __future__ import annotations

from harness.doctor.analysis import Analysis
from harness.doctor.catalog import Evidence, Finding
from harness.doctor.findings.common import knob, subject
from harness.units import format_size

MIN_LOSS = 64 << 10  # bytes: a smaller per-process loss is noise (1024 rmap_items)


def _negative(a: Analysis) -> list[Finding]:
    f = a.facts
    out = []
    profit = f.host.counters.get("general_profit")
    losers = sorted(
        (s for s in a.summaries.values() if s.profit is not None and s.profit <= -MIN_LOSS),
        key=lambda s: s.profit or 0,
    )
    if profit is not None and profit < 0:
        ev = [knob(f.host, "general_profit")]
        ev += [
            Evidence(f"/proc/{s.pid}/ksm_stat", f"ksm_process_profit {s.profit}")
            for s in losers[:5]
        ]
        out.append(
            Finding(
                "negative-profit",
                "host",
                f"general_profit is {profit} bytes: KSM's metadata costs "
                f"{format_size(-profit)} more than merging saves",
                tuple(ev),
                "exclude processes with few duplicates (MADV_UNMERGEABLE, "
                "prctl(PR_SET_MEMORY_MERGE, 0)), or stop KSM: ksmh set run=2",
                data={"general_profit": profit},
            )
        )
        return out
    for s in losers:
        p = f.processes[s.pid]
        out.append(
            Finding(
                "negative-profit",
                subject(p),
                f"{subject(p)}: ksm_process_profit is {s.profit} bytes: its "
                f"{s.rmap_items} rmap_items cost more than its {s.merged} merged pages save",
                (Evidence(f"/proc/{s.pid}/ksm_stat", f"ksm_process_profit {s.profit}"),),
                "MADV_UNMERGEABLE on its unique memory, or prctl(PR_SET_MEMORY_MERGE, 0)",
                pid=s.pid,
                data={"process_profit": s.profit},
            )
        )
    return out


def _unmerge(a: Analysis) -> list[Finding]:
    h = a.facts.host
    sharing = h.counters.get("pages_sharing")
    avail = h.meminfo.get("MemAvailable")
    if sharing is None or avail is None:
        return []
    need = sharing * h.page_size
    if need <= avail:
        return []
    return [
        Finding(
            "unmerge-memory",
            "host",
            f"unmerging (run=2, MADV_UNMERGEABLE, KSM switched off) could need "
            f"{format_size(need)} of new memory at once but MemAvailable is {format_size(avail)}",
            (
                knob(h, "pages_sharing"),
                Evidence("/proc/meminfo", f"MemAvailable: {avail // 1024} kB"),
            ),
            "free memory before any unmerge; keep tuners from switching KSM to run=2 here",
            data={"need": need, "available": avail},
        )
    ]


def check(a: Analysis) -> list[Finding]:
    if not a.facts.host.present:
        return []
    return _negative(a) + _unmerge(a)
