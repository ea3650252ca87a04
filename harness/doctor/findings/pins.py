"""Pinned pages (VFIO, io_uring fixed buffers, RDMA): KSM cannot write-protect them."""

from __future__ import annotations

from harness.doctor.analysis import Analysis
from harness.doctor.catalog import Evidence, Finding
from harness.doctor.findings.common import subject
from harness.units import format_size


def check(a: Analysis) -> list[Finding]:
    out = []
    for pid, p in sorted(a.facts.processes.items()):
        pinned = p.status.get("VmPin", 0)
        vfio = [(fd, t) for fd, t in p.pin_fds if t.startswith("/dev/vfio/")]
        if not pinned and not p.pin_fds:
            continue
        if not p.mergeable_vmas and not (p.content and p.content.candidates()):
            continue  # nothing KSM could merge in this process anyway
        ev = [Evidence(f"/proc/{pid}/status", f"VmPin: {pinned} kB")]
        if vfio:
            ev.append(Evidence(f"/proc/{pid}/status", f"VmLck: {p.status.get('VmLck', 0)} kB"))
        ev += [Evidence(f"/proc/{pid}/fd/{fd}", target) for fd, target in p.pin_fds]
        what = []
        if pinned:
            what.append(f"{format_size(pinned * 1024)} pinned")
        if vfio:
            what.append("a VFIO device (all guest RAM is pinned for DMA)")
        if any("io_uring" in t for _, t in p.pin_fds):
            what.append("io_uring (fixed buffers are pinned)")
        s = a.summaries[pid]
        stuck = ""
        if s.could_merge is not None and s.merged is not None and s.could_merge > s.merged:
            stuck = f"; {s.could_merge - s.merged:,} pages with duplicates are not merged"
        out.append(
            Finding(
                "pinned-pages",
                subject(p),
                f"{subject(p)} has {', '.join(what)}: pinned pages never merge{stuck}",
                tuple(ev),
                "do not pin memory that should merge: register io_uring buffers outside "
                "the mergeable range; a guest with an assigned (VFIO) device cannot use KSM",
                pid=pid,
                data={"vmpin_kib": pinned, "vfio": bool(vfio)},
            )
        )
    return out
