"""Transparent huge pages in mergeable memory: a split before merging, zero subpages lost."""

from __future__ import annotations

from harness.doctor.analysis import Analysis
from harness.doctor.catalog import Evidence, Finding
from harness.doctor.findings.common import pages, subject
from harness.doctor.findings.scan import full_scan_seconds

THP_PAGES = 512  # 4 KiB pages in one 2 MiB THP


def check(a: Analysis) -> list[Finding]:
    f = a.facts
    if not f.host.present:
        return []
    out = []
    scan = full_scan_seconds(f)
    enabled = f.host.thp.get("enabled", "?")
    for pid, s in sorted(a.summaries.items()):
        p = f.processes[pid]
        if s.thp_pages < THP_PAGES:
            continue
        zero = s.thp_zero or 0
        # A duplicate inside a THP merges one full scan late; zero subpages never do.
        late = min(s.could_merge or 0, s.thp_pages)
        if zero == 0 and late == 0:
            continue
        parts = []
        if zero:
            parts.append(f"{pages(zero)} of zero-filled THP subpages never merge")
        if late:
            delay = f" (~{scan:,.0f} s at the current knobs)" if scan is not None else ""
            parts.append(f"duplicates in THPs merge only after a split, a full scan later{delay}")
        ev = [
            Evidence(str(f.host.thp_root / "enabled"), enabled),
            Evidence(f"/proc/{pid}/smaps",
                     f"AnonHugePages: {s.thp_pages * 4} kB in mergeable VMAs"),
        ]  # fmt: skip
        if s.thp_zero is not None:
            ev.append(Evidence("/proc/kpageflags", f"{zero} zero-filled KPF_THP subpages"))
        out.append(
            Finding(
                "thp-cost",
                subject(p),
                f"{subject(p)}: {pages(s.thp_pages)} of its mergeable memory are transparent "
                "huge pages: " + "; ".join(parts),
                tuple(ev),
                "MADV_NOHUGEPAGE on the buffer, or start the VMM with THP disabled "
                "(prctl(PR_SET_THP_DISABLE); `ksmh fleet up` does it unless thp is wanted)",
                pid=pid,
                data={"thp_pages": s.thp_pages, "thp_zero": zero},
            )
        )
    return out
