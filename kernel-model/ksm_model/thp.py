"""Transparent huge pages (PMD-sized anonymous folios) as KSM meets them.

Per process, ``mm.blocks`` says, for each huge-page-sized, aligned block of addresses that
was ever faulted, what its PMD holds:

* ``PTE``: a page table of small pages (so no huge page fault can happen there any more);
* ``HZP``: the huge zero page (a read fault with transparent_hugepage/use_zero_page=1);
* ``FAIL``: nothing yet, and the next huge page fault there fails (the model was told the
  kernel could not allocate one): it falls back to a small page;
* a ``HugeMap``: a large folio is mapped here, by the PMD (``pmd``: AnonHugePages counts it)
  or by page table entries after a PMD split; ``mask`` has a bit per subpage still mapping it.

A block absent from ``mm.blocks`` has an empty PMD: the first fault there in a THP-eligible
VMA (mode always, or madvise with MADV_HUGEPAGE; not MADV_NOHUGEPAGE or PR_SET_THP_DISABLE;
the whole aligned block inside the VMA) maps a new huge page, whose other subpages are
present, zero-filled anonymous pages that ksmd scans one by one.

KSM splits a large folio (split_huge_page) before it write-protects a subpage to merge it.
The split fails while ksmd also holds a reference to another subpage of the same folio (the
unstable-tree page it matched); cmp_and_merge_page then splits it afterwards, and that pair
merges at a later visit. On 6.12+ (the profile's thp_split_remaps_zero) the split maps every
zero-filled subpage to the shared zero page (remap_page with RMP_USE_SHARED_ZEROPAGE), so such
pages vanish from KSM's view, including the page being merged.

khugepaged (collapsing small pages back into huge pages) is not modelled: pin it (a long
scan_sleep_millisecs) while comparing with a real kernel. mTHP sizes below PMD size and the
deferred-split shrinker (thp "underused") are not modelled either.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ksm_model.content import ZERO
from ksm_model.pages import Page

if TYPE_CHECKING:
    from ksm_model.kernel import Kernel
    from ksm_model.process import Process, Vma

MODES = ("always", "madvise", "never")
HUGE = 1  # VM_HUGEPAGE (MADV_HUGEPAGE)
NOHUGE = 2  # VM_NOHUGEPAGE (MADV_NOHUGEPAGE)


class _State:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


PTE: Any = _State("PTE")
HZP: Any = _State("HZP")
FAIL: Any = _State("FAIL")


class Folio:
    """A large anonymous folio covering block ``block``; ``mms`` map it (fork shares it)."""

    __slots__ = ("block", "mms")

    def __init__(self, block: int, mm: Process) -> None:
        self.block = block
        self.mms: list[Process] = [mm]


class HugeMap:
    """One process's mapping of a large folio."""

    __slots__ = ("folio", "mask", "pmd")

    def __init__(self, folio: Folio, pmd: bool, mask: int) -> None:
        self.folio = folio
        self.pmd = pmd
        self.mask = mask


def allowed(k: Kernel, mm: Process, v: Vma) -> bool:
    """thp_vma_allowable_order for an anonymous VMA (PMD order)."""
    mode = k.thp_enabled
    if mode == "never" or mm.thp_disable or v.thp == NOHUGE:
        return False
    return mode == "always" or v.thp == HUGE


def fault(k: Kernel, mm: Process, v: Vma, i: int, write: bool) -> bool:
    """A fault at page ``v.start + i`` where nothing is mapped.

    True when the block is now covered by its PMD (a new huge page, or the huge zero page
    for a read); False when a small page (or the zero page) is to be mapped there instead.
    """
    shift = k.hp_shift
    b = (v.start + i) >> shift
    blocks = mm.blocks
    st = blocks.get(b)
    if st is None:
        base = b << shift
        if base >= v.start and base + (1 << shift) <= v.end and allowed(k, mm, v):
            if not write and k.thp_use_zero_page:
                blocks[b] = HZP
                return True
            _huge_fault(k, mm, v, b)
            return True
        blocks[b] = PTE
        return False
    if st is FAIL:
        blocks[b] = PTE
    elif st is HZP:
        if not write:
            return True
        if k.profile.thp_wp_zero_alloc:  # 6.13+: do_huge_zero_wp_pmd maps a new huge page
            del blocks[b]
            _huge_fault(k, mm, v, b)
            return True
        blocks[b] = PTE  # before: the write splits the zero PMD, then faults a small page
    return False


def _huge_fault(k: Kernel, mm: Process, v: Vma, b: int) -> None:
    """do_huge_pmd_anonymous_page: a zeroed huge page mapped by the PMD."""
    shift = k.hp_shift
    lo = (b << shift) - v.start
    n = 1 << shift
    v.pages[lo : lo + n] = [ZERO] * n
    v.anon = True
    mm.blocks[b] = HugeMap(Folio(b, mm), True, (1 << n) - 1)
    mm.nlarge += 1
    k.lru.drain(mm.cpu)  # a large folio moves the CPU's whole LRU batch at once


def folio_at(k: Kernel, mm: Process, pn: int) -> Folio | None:
    """The large folio page ``pn`` of mm belongs to, if any."""
    st = mm.blocks.get(pn >> k.hp_shift)
    if st.__class__ is HugeMap and st.mask >> (pn & k.hp_mask) & 1:
        folio: Folio = st.folio
        return folio
    return None


def _drop(mm: Process, b: int, hm: HugeMap, state: Any) -> None:
    """mm no longer maps hm's folio at block b."""
    hm.folio.mms.remove(mm)
    mm.nlarge -= 1
    if state is None:
        del mm.blocks[b]
    else:
        mm.blocks[b] = state


def unmap_subpage(k: Kernel, mm: Process, pn: int) -> None:
    """A subpage of a large folio stopped being mapped at pn (copy-on-write, zap).

    The PMD is split first (__split_huge_pmd), so the folio stays large, mapped by PTEs.
    """
    b = pn >> k.hp_shift
    hm = mm.blocks.get(b)
    if hm.__class__ is not HugeMap:
        return
    hm.pmd = False
    hm.mask &= ~(1 << (pn & k.hp_mask))
    if not hm.mask:
        _drop(mm, b, hm, PTE)


def split_pmd(k: Kernel, mm: Process, pn: int) -> None:
    """__split_huge_pmd at a VMA boundary inside a block (vma_adjust_trans_huge)."""
    if pn & k.hp_mask == 0:
        return
    b = pn >> k.hp_shift
    st = mm.blocks.get(b)
    if st.__class__ is HugeMap:
        st.pmd = False
    elif st is HZP:
        mm.blocks[b] = PTE


def zap(k: Kernel, mm: Process, v: Vma, i0: int, i1: int, reclaim: bool = False) -> None:
    """Before pages [v.start+i0, v.start+i1) are zapped: update the blocks they touch.

    A whole PMD-mapped block goes with zap_huge_pmd (its PMD is empty again); a part of one
    splits the PMD first. With `reclaim` (MADV_DONTNEED on a CONFIG_PT_RECLAIM kernel, 6.14+)
    a page table whose whole block was zapped is freed too, so the next fault there can map
    a huge page again.
    """
    shift = k.hp_shift
    n = 1 << shift
    lo, hi = v.start + i0, v.start + i1
    for b in range(lo >> shift, ((hi - 1) >> shift) + 1):
        st = mm.blocks.get(b)
        base = b << shift
        whole = lo <= base and base + n <= hi
        if st is None or st is FAIL:
            continue
        if st is PTE:
            if whole and reclaim:
                del mm.blocks[b]
            continue
        if st is HZP:
            if whole:
                del mm.blocks[b]
            else:
                mm.blocks[b] = PTE
            continue
        if whole and (st.pmd or reclaim):
            _drop(mm, b, st, None)
            continue
        st.pmd = False
        for pn in range(max(lo, base), min(hi, base + n)):
            st.mask &= ~(1 << (pn & k.hp_mask))
        if not st.mask:
            _drop(mm, b, st, PTE)


def unmapped(k: Kernel, mm: Process, lo: int, hi: int) -> None:
    """After munmap of [lo, hi): blocks no VMA touches any more lose their page table."""
    shift = k.hp_shift
    for b in range(lo >> shift, ((hi - 1) >> shift) + 1):
        if b not in mm.blocks:
            continue
        base = b << shift
        if any(v.start < base + (1 << shift) and v.end > base for v in mm.vmas):
            continue
        st = mm.blocks[b]
        if st.__class__ is HugeMap:
            _drop(mm, b, st, None)
        else:
            del mm.blocks[b]


def split(k: Kernel, folio: Folio) -> None:
    """split_huge_page: the folio becomes small pages in every process mapping it.

    6.12+: zero-filled subpages are mapped to the shared zero page instead (not a KSM zero
    page: nothing counts them). A page taken away like this from this scan's unstable tree
    changes its walk, so the unstable tree goes exact.
    """
    remap = k.profile.thp_split_remaps_zero
    shift = k.hp_shift
    base = folio.block << shift
    for mm in list(folio.mms):
        hm = mm.blocks[folio.block]
        mask = hm.mask
        _drop(mm, folio.block, hm, PTE)
        if not remap:
            continue
        touched = False
        for v in mm.vmas:
            if v.end <= base or v.start >= base + (1 << shift):
                continue
            pages = v.pages
            for pn in range(max(base, v.start), min(base + (1 << shift), v.end)):
                if not mask >> (pn - base) & 1:
                    continue
                s = pages[pn - v.start]
                if s.__class__ is bytes and s == ZERO:
                    pages[pn - v.start] = None
                    touched = True
                elif s.__class__ is Page and s.node is None and s.key == ZERO:
                    s.mapcount -= 1
                    pages[pn - v.start] = None
                    touched = True
        if touched:
            k.unstable.touched(k, mm)


def forked(k: Kernel, parent: Process, child: Process) -> None:
    """fork(): the child maps the same large folios, by PMD where the parent does."""
    for b, st in parent.blocks.items():
        if st.__class__ is HugeMap:
            child.blocks[b] = HugeMap(st.folio, st.pmd, st.mask)
            st.folio.mms.append(child)
            child.nlarge += 1
        else:
            child.blocks[b] = st


def exited(mm: Process) -> None:
    """exit(): every mapping of the process is gone."""
    for st in mm.blocks.values():
        if st.__class__ is HugeMap:
            st.folio.mms.remove(mm)
    mm.blocks = {}
    mm.nlarge = 0


def anon_huge_bytes(k: Kernel, mm: Process, lo: int, hi: int) -> int:
    """AnonHugePages of smaps for pages [lo, hi): PMD-mapped large folios inside it."""
    shift = k.hp_shift
    total = 0
    for b, st in mm.blocks.items():
        base = b << shift
        if st.__class__ is HugeMap and st.pmd and lo <= base and base + (1 << shift) <= hi:
            total += 1
    return (total << shift) * k.page_size
