"""Memory KSM cannot see that holds duplicates: shared, file-backed, hugetlb, unadvised."""

from __future__ import annotations

from harness.doctor.analysis import Analysis, VmaVerdict
from harness.doctor.catalog import Evidence, Finding
from harness.doctor.facts import ProcessFacts
from harness.doctor.findings.common import pages, subject
from harness.units import format_size

KIND = {
    "shared": "shared-mapping",
    "file": "file-mapping",
    "hugetlb": "hugetlb-mapping",
    "not-mergeable": "not-mergeable",
}
WHAT = {
    "shared": "shared mapping",
    "file": "file-backed mapping",
    "hugetlb": "hugetlbfs mapping",
    "not-mergeable": "private anonymous mapping without VM_MERGEABLE",
}
FIX = {
    "shared": "map it MAP_PRIVATE|MAP_ANONYMOUS before madvise(MADV_MERGEABLE): KSM ignores "
    "shared memory",
    "file": "back it with anonymous private memory: KSM never merges page cache",
    "hugetlb": "back it with anonymous memory (THP still works) and release vm.nr_hugepages: "
    "KSM never scans hugetlbfs",
    "not-mergeable": "madvise(MADV_MERGEABLE) on it, or prctl(PR_SET_MEMORY_MERGE, 1) for the "
    "whole process (6.4+)",
}
QEMU_FIX = {
    "shared": "QEMU: use -object memory-backend-ram (drop memory-backend-memfd / share=on "
    "unless vhost-user needs it); libvirt: remove <access mode='shared'/> and <source "
    "type='memfd'/>",
    "file": "QEMU: use -object memory-backend-ram instead of memory-backend-file",
    "hugetlb": "QEMU: drop mem-path=/dev/hugepages / hugetlb=on (libvirt: <hugepages/>) "
    "for guests that should merge",
    "not-mergeable": "QEMU: -machine mem-merge=on (libvirt: remove <nosharepages/>)",
}


def _is_qemu(p: ProcessFacts) -> bool:
    return p.comm.startswith("qemu") or "qemu-system" in p.cmdline.split(" ", 1)[0]


def _qemu_evidence(p: ProcessFacts, kind: str) -> list[Evidence]:
    """The QEMU arguments that chose this memory (mem-merge=off, memory backends)."""
    words = [w for w in p.cmdline.split() if "mem-merge" in w or "memory-backend" in w]
    if kind != "not-mergeable":
        words = [w for w in words if "mem-merge" not in w]
    return [Evidence(f"/proc/{p.pid}/cmdline", w) for w in words]


def _finding(a: Analysis, v: VmaVerdict) -> Finding:
    p = a.facts.processes[v.pid]
    vma = v.vma.vma
    kind = v.vma.kind or "not-mergeable"
    zero = f" ({v.zero:,} of them zero-filled)" if v.zero else ""
    where = f"{vma.start:x}-{vma.end:x}" + (f" {vma.name}" if vma.name else "")
    msg = (
        f"{subject(p)}: {format_size(vma.end - vma.start)} {WHAT[kind]} {where} holds "
        f"{pages(v.would_merge)} that would merge if it were mergeable{zero}"
    )
    ev = [
        Evidence(f"/proc/{p.pid}/smaps", f"{where} VmFlags: {' '.join(vma.flags)}"),
        Evidence(
            f"/proc/{p.pid}/mem",
            f"{v.would_merge} of {v.vma.present} present pages have a duplicate (content keys)",
        ),
    ]
    fix = FIX[kind]
    if _is_qemu(p):
        ev += _qemu_evidence(p, kind)
        fix = QEMU_FIX[kind]
    return Finding(
        KIND[kind],
        subject(p),
        msg,
        tuple(ev),
        fix,
        pid=p.pid,
        data={
            "start": vma.start,
            "end": vma.end,
            "name": vma.name,
            "flags": list(vma.flags),
            "would_merge": v.would_merge,
            "zero": v.zero,
            "present": v.vma.present,
        },
    )


def check(a: Analysis) -> list[Finding]:
    least = a.facts.options.min_duplicates
    return [_finding(a, v) for v in a.vmas if v.would_merge >= least]
