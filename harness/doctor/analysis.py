"""Figures derived from the facts: per process what KSM scans, what could merge, what does,
and per candidate VMA what would merge if KSM could see it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from harness.doctor import content as ct
from harness.doctor.exposure import Exposure, matrix
from harness.doctor.facts import Facts, ProcessFacts


@dataclass(frozen=True)
class VmaVerdict:
    """A VMA KSM ignores, and its pages that would merge if it were mergeable."""

    pid: int
    vma: ct.VmaContent
    would_merge: int
    zero: int  # zero-filled pages among would_merge


@dataclass
class ProcessSummary:
    pid: int
    name: str
    scanned_pages: int | None  # present pages of mergeable VMAs KSM visits (None: unknown)
    could_merge: int | None  # of those, pages with a duplicate (or already KSM pages)
    merged: int | None  # ksm_stat merging_pages + zero_pages
    rmap_items: int | None
    profit: int | None
    thp_pages: int  # AnonHugePages of mergeable VMAs, in 4 KiB pages
    thp_zero: int | None  # zero-filled THP subpages left out (never merge)
    ksm_pages: int | None  # distinct KSM frames mapped

    def as_dict(self) -> dict[str, int | str | None]:
        return dict(self.__dict__)


@dataclass
class Analysis:
    facts: Facts
    summaries: dict[int, ProcessSummary] = field(default_factory=dict)
    vmas: list[VmaVerdict] = field(default_factory=list)
    exposure: Exposure | None = None


def _summary(p: ProcessFacts, pool: ct.KeyPool | None, page_kib: int) -> ProcessSummary:
    st = p.stat
    merged = None
    if st is not None and st.merging_pages is not None:
        merged = st.merging_pages + (st.zero_pages or 0)
    thp = sum(v.anon_huge_kib for v in p.mergeable_vmas) // page_kib
    scanned = could = thp_zero = ksm_pages = None
    if p.content is not None and pool is not None:
        mergeable = p.content.mergeable()
        scanned = sum(v.present for v in mergeable)
        could = sum(ct.duplicates(v, pool, include_ksm=True).pages for v in mergeable)
        could += (st.zero_pages or 0) if st is not None else 0
        thp_zero = sum(v.cap.thp_zero for v in mergeable)
        ksm_pages = len(p.content.ksm_pfns)
    elif not p.error:
        scanned = p.mergeable_rss_pages
    return ProcessSummary(
        p.pid,
        p.name,
        scanned,
        could,
        merged,
        st.rmap_items if st is not None else None,
        st.process_profit if st is not None else None,
        thp,
        thp_zero,
        ksm_pages,
    )


def analyse(facts: Facts, group_of: Mapping[int, str] | None = None) -> Analysis:
    """Pools of content keys, per-process summaries, VMA verdicts and the sharing matrix."""
    a = Analysis(facts)
    captured = [p.content for p in facts.processes.values() if p.content is not None]
    pool = full = None
    if captured:
        pool = ct.KeyPool(v for c in captured for v in c.mergeable())
        full = ct.KeyPool(v for c in captured for v in c.vmas)
    page_kib = facts.host.page_size // 1024
    for pid, p in facts.processes.items():
        a.summaries[pid] = _summary(p, pool, page_kib)
        if p.content is None or full is None:
            continue
        for v in p.content.candidates():
            d = ct.duplicates(v, full)
            a.vmas.append(VmaVerdict(pid, v, d.pages, d.zero))
    if captured:
        pfns = {c.pid: c.ksm_pfns for c in captured}
        groups = dict(group_of or {})
        names = {pid: groups.get(pid, facts.processes[pid].name) for pid in pfns}
        a.exposure = matrix(pfns, names)
    return a
