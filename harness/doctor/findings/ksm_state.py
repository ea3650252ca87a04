"""KSM itself: absent, stopped, unmerging, or scanning zero pages per batch."""

from __future__ import annotations

from harness.doctor.analysis import Analysis
from harness.doctor.catalog import Evidence, Finding
from harness.doctor.findings.common import knob, pages


def check(a: Analysis) -> list[Finding]:
    h = a.facts.host
    if not h.present:
        return [
            Finding(
                "ksm-absent",
                "host",
                f"{h.ksm_root} does not exist: this kernel has no KSM",
                (Evidence(str(h.ksm_root / "run"), "missing"),),
                "boot a kernel built with CONFIG_KSM=y",
            )
        ]
    users = a.facts.users
    scanned = sum(u.mergeable_pages for u in users)
    n = len(users)
    who = f"{n} process{'es' if n != 1 else ''} {'have' if n != 1 else 'has'} {pages(scanned)} of "
    who += "mergeable memory"
    run = h.knob("run")
    out: list[Finding] = []
    if run == 0 and scanned:  # stopped with nothing to merge is a choice, not a problem
        out.append(
            Finding(
                "ksm-stopped",
                "host",
                f"ksmd is stopped (run=0) while {who}: nothing new merges",
                (knob(h, "run"),),
                "ksmh set run=1",
                data={"mergeable_pages": scanned, "users": len(users)},
            )
        )
    elif run == 2:
        out.append(
            Finding(
                "ksm-unmerging",
                "host",
                f"KSM is unmerging (run=2): every merged page is being broken apart; {who}",
                (knob(h, "run"), knob(h, "pages_sharing")),
                "ksmh set run=1 (when the unmerge is no longer wanted)",
            )
        )
    elif run == 1 and h.knob("pages_to_scan") == 0 and scanned:
        out.append(
            Finding(
                "pages-to-scan-zero",
                "host",
                f"pages_to_scan is 0: ksmd scans nothing while {who}",
                (knob(h, "pages_to_scan"),),
                "ksmh set pages_to_scan=1000",
            )
        )
    return out
