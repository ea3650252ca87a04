"""Processes whose mergeable pages change faster than ksmd can compare them."""

from __future__ import annotations

from harness.doctor.analysis import Analysis
from harness.doctor.catalog import Evidence, Finding
from harness.doctor.findings.common import subject, window

MIN_SAMPLE = 32  # pages: fewer say nothing about a process


def check(a: Analysis) -> list[Finding]:
    f = a.facts
    out = []
    for pid, p in sorted(f.processes.items()):
        if p.volatile is None:
            continue
        sampled, changed = p.volatile
        if sampled < MIN_SAMPLE or changed < f.options.volatile_fraction * sampled:
            continue
        s = a.summaries[pid]
        merged = s.merged if s.merged is not None else "?"
        ev = [
            Evidence(
                f"/proc/{pid}/mem",
                f"{changed} of {sampled} sampled mergeable pages changed within "
                f"{window(f):.1f} s (content keys)",
            ),
            Evidence(f"/proc/{pid}/ksm_stat", f"ksm_merging_pages {merged}, ksm_rmap_items "
                     f"{s.rmap_items if s.rmap_items is not None else '?'}"),
        ]  # fmt: skip
        if "pages_volatile" in f.host.counters:
            ev.append(
                Evidence(
                    str(f.host.ksm_root / "pages_volatile"),
                    str(f.host.counters["pages_volatile"]),
                )
            )
        out.append(
            Finding(
                "volatile-process",
                subject(p),
                f"{subject(p)}: {100 * changed / sampled:.0f}% of its mergeable pages changed "
                f"within {window(f):.1f} s: KSM cannot merge them and spends CPU and rmap_items "
                "on them",
                tuple(ev),
                "MADV_UNMERGEABLE on the rewritten buffer (or prctl(PR_SET_MEMORY_MERGE, 0); "
                "QEMU: -machine mem-merge=off for this guest)",
                pid=pid,
                data={"sampled": sampled, "changed": changed},
            )
        )
    return out
