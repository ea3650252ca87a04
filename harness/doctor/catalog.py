"""Every finding `ksmh doctor` can report: what it means and how to fix it.

The catalogue is the single source of the README's "Why nothing merges" section
(harness.doctor.readme renders it; a test checks that the README says exactly this), so a
finding cannot be added, renamed or reworded without the documentation following.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any


class Severity(IntEnum):
    """info: a fact worth knowing; warning and critical need action (exit status 1)."""

    INFO = 0
    WARNING = 1
    CRITICAL = 2

    def __str__(self) -> str:
        return self.name.lower()


@dataclass(frozen=True)
class Kind:
    """One kind of finding: its id, severity, a title, why it matters, and the usual fix."""

    id: str
    severity: Severity
    title: str
    why: str
    fix: str
    family: str


@dataclass(frozen=True)
class Evidence:
    """What a finding rests on: a file (or pseudo-file) and the value read there."""

    file: str
    value: str

    def __str__(self) -> str:
        return f"{self.file}: {self.value}"


@dataclass(frozen=True)
class Finding:
    """One finding about the host or one process: kind, message, evidence and a concrete fix."""

    kind: str
    subject: str  # "host", or "pid 1234 (qemu-...)"
    message: str
    evidence: tuple[Evidence, ...]
    fix: str
    pid: int | None = None
    data: dict[str, Any] = field(default_factory=dict)  # figures the message was built from

    @property
    def severity(self) -> Severity:
        return KINDS[self.kind].severity

    @property
    def needs_action(self) -> bool:
        return self.severity >= Severity.WARNING

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "severity": str(self.severity),
            "title": KINDS[self.kind].title,
            "subject": self.subject,
            "pid": self.pid,
            "message": self.message,
            "evidence": [{"file": e.file, "value": e.value} for e in self.evidence],
            "fix": self.fix,
            "data": self.data,
        }


W, C, INFO = Severity.WARNING, Severity.CRITICAL, Severity.INFO

CATALOG: tuple[Kind, ...] = (
    # -- KSM itself (harness.doctor.ksm_state) -------------------------------------------------
    Kind("ksm-absent", C, "The kernel has no KSM",
         "/sys/kernel/mm/ksm does not exist: the kernel was built without CONFIG_KSM, so "
         "MADV_MERGEABLE fails with EINVAL and nothing is ever scanned.",
         "Boot a kernel built with CONFIG_KSM=y.", "ksm_state"),
    Kind("ksm-stopped", W, "ksmd is stopped (run=0)",
         "With run=0 ksmd scans nothing: pages already merged stay merged, new duplicates "
         "never merge.",
         "`ksmh set run=1` (and find out who stopped it: see knob-writer).", "ksm_state"),
    Kind("ksm-unmerging", W, "KSM is unmerging (run=2)",
         "run=2 stops ksmd and breaks every merged page apart; nothing merges until run=1.",
         "`ksmh set run=1` once the unmerge is wanted no longer.", "ksm_state"),
    Kind("pages-to-scan-zero", W, "pages_to_scan is 0",
         "ksmd wakes up, scans zero pages and sleeps again: nothing merges.",
         "`ksmh set pages_to_scan=N` (see slow-full-scan for N).", "ksm_state"),
    # -- who changes the knobs (harness.doctor.tuners) ---------------------------------------
    Kind("knob-writer", W, "Another process rewrites KSM knobs",
         "Something other than you writes /sys/kernel/mm/ksm while the doctor watches: it "
         "can stop ksmd, slow it down or undo your settings at any time.",
         "Stop or reconfigure the named process (e.g. `systemctl disable --now ksmtuned`), "
         "or let it alone own KSM.", "tuners"),
    Kind("known-tuner", W, "A KSM tuning daemon is running",
         "ksmtuned, MOM (oVirt/vdsm) and similar agents switch run and rewrite pages_to_scan "
         "and sleep_millisecs from their own rules, periodically, even when no write was "
         "seen in the sampling window.",
         "Stop it (`systemctl disable --now ksmtuned`) or make your settings in its "
         "configuration (/etc/ksmtuned.conf, MOM policy).", "tuners"),
    Kind("advisor-active", INFO, "The kernel's advisor sets pages_to_scan",
         "advisor_mode is scan-time: the kernel itself rewrites pages_to_scan after every "
         "full scan to reach advisor_target_scan_time; writes of pages_to_scan are refused.",
         "Nothing to fix; `ksmh set advisor_mode=none` to set pages_to_scan yourself.",
         "tuners"),
    # -- memory KSM cannot see (harness.doctor.vmas) -----------------------------------------
    Kind("shared-mapping", W, "Duplicate pages in a shared mapping",
         "KSM merges only private anonymous pages. madvise(MADV_MERGEABLE) on a MAP_SHARED "
         "mapping (shared anonymous memory, shmem, memfd, QEMU share=on or "
         "memory-backend-memfd) succeeds and is silently ignored: VM_MERGEABLE is never set.",
         "Map the buffer MAP_PRIVATE|MAP_ANONYMOUS; for QEMU use memory-backend-ram (drop "
         "share=on / memory-backend-memfd unless vhost-user or virtiofs needs it).", "vmas"),
    Kind("file-mapping", W, "Duplicate pages in a file-backed mapping",
         "Pages of a file mapping (QEMU memory-backend-file, pmem/DAX, a mapped image) are "
         "page cache, not anonymous memory: KSM never merges them.",
         "Back the memory with anonymous private memory (QEMU memory-backend-ram).", "vmas"),
    Kind("hugetlb-mapping", W, "Duplicate pages in hugetlbfs memory",
         "hugetlbfs pages (QEMU mem-path=/dev/hugepages, memory-backend-memfd hugetlb=on) "
         "are never scanned by KSM.",
         "Choose: hugetlbfs or KSM. For merging, back the guest with anonymous memory "
         "(transparent huge pages still work) and release vm.nr_hugepages.", "vmas"),
    Kind("not-mergeable", W, "Duplicate pages in memory never marked mergeable",
         "Private anonymous memory is scanned only after madvise(MADV_MERGEABLE) or "
         "prctl(PR_SET_MEMORY_MERGE): a VMM started with mem-merge=off, or a program that "
         "never asked, keeps its duplicates.",
         "QEMU: -machine mem-merge=on (libvirt: remove <nosharepages/>); other programs: "
         "madvise(MADV_MERGEABLE) on the buffer, or prctl(PR_SET_MEMORY_MERGE, 1) (6.4+).",
         "vmas"),
    # -- transparent huge pages (harness.doctor.thp) -----------------------------------------
    Kind("thp-cost", W, "Transparent huge pages delay or prevent merging",
         "A THP must be split before its 4 KiB subpages can merge, which costs a full scan; "
         "zero-filled subpages of a THP never merge (a split maps them to the zero page "
         "instead; measured on 6.18).",
         "Accept the cost, or exclude the memory from THP: MADV_NOHUGEPAGE, "
         "prctl(PR_SET_THP_DISABLE) before starting the VMM, or "
         "/sys/kernel/mm/transparent_hugepage/enabled=madvise.", "thp"),
    # -- pinned pages (harness.doctor.pins) ---------------------------------------------------
    Kind("pinned-pages", W, "Pinned pages cannot merge",
         "Pages pinned for DMA (VFIO device assignment, io_uring fixed buffers, RDMA) hold an "
         "extra reference: write_protect_page() fails and KSM skips them on every scan.",
         "Do not pin memory you want merged (VFIO pins all guest RAM: no KSM for assigned "
         "devices; register io_uring buffers outside the mergeable range).", "pins"),
    # -- scanning (harness.doctor.scan) -------------------------------------------------------
    Kind("slow-full-scan", W, "A full scan takes too long at the current knobs",
         "ksmd visits pages_to_scan pages per batch and sleeps sleep_millisecs between "
         "batches; a page merges only after two visits, so with much mergeable memory and "
         "few pages per batch nothing seems to merge for hours.",
         "Raise pages_to_scan (the doctor computes a value for a 60 s scan) or let the "
         "advisor tune it: `ksmh set advisor_mode=scan-time`.", "scan"),
    Kind("foreign-ksm-user", W, "Another process's memory is in every scan",
         "KSM scans every registered process: memory outside the processes you examined "
         "lengthens each full scan and changes the global counters.",
         "Stop it, exclude it (MADV_UNMERGEABLE, prctl(PR_SET_MEMORY_MERGE, 0)), or examine "
         "it too (`--all`).", "scan"),
    Kind("volatile-process", W, "A process's pages change faster than KSM scans",
         "KSM merges a page only if its content did not change between two visits; memory "
         "that is rewritten all the time only costs ksmd CPU and rmap_items.",
         "Exclude the volatile memory (MADV_UNMERGEABLE on that buffer, prctl("
         "PR_SET_MEMORY_MERGE, 0), QEMU mem-merge=off for that guest).", "volatile"),
    # -- cost and risk (harness.doctor.profit) ------------------------------------------------
    Kind("negative-profit", W, "KSM costs more memory than it saves",
         "general_profit (or a process's ksm_process_profit) is negative: the rmap_items of "
         "unique pages cost more than the merged pages save.",
         "Exclude processes with few duplicates (listed with their profit), or stop KSM.",
         "profit"),
    Kind("unmerge-memory", C, "Unmerging would need more memory than is available",
         "run=2, MADV_UNMERGEABLE or a tuner switching KSM off gives every merged page its "
         "own copy again: up to pages_sharing x page size of new memory at once.",
         "Free memory before unmerging, or keep KSM running; never let a tuner switch it "
         "to run=2 on this host.", "profit"),
    # -- NUMA (harness.doctor.numa) -----------------------------------------------------------
    Kind("numa-cross-node", INFO, "Pages merge across NUMA nodes",
         "With merge_across_nodes=1 on a multi-node host a merged page lives on one node: "
         "processes on the other nodes then read it remotely.",
         "If latency matters, pin each guest to a node and set merge_across_nodes=0 "
         "(`ksmh set run=2`, then merge_across_nodes=0, then run=1).", "numa"),
    Kind("numa-split", W, "Duplicates on different NUMA nodes do not merge",
         "With merge_across_nodes=0 KSM keeps one tree per node: identical pages on "
         "different nodes never merge.",
         "Pin processes with the same content to one node, or set merge_across_nodes=1 "
         "(`ksmh set run=2`, then merge_across_nodes=1, then run=1).", "numa"),
)  # fmt: skip

KINDS: dict[str, Kind] = {k.id: k for k in CATALOG}
