"""ksmd's batch: scan_get_next_rmap_item, cmp_and_merge_page and the unstable tree.

Per mm, ``rmap`` holds the rmap_items by address (rmap.py); ``rmap.fp`` is the kernel's
rmap_list cursor: the items below it have been passed in the current walk of that mm.

The unstable tree is a dict per NUMA node, content key -> the inserted item's chunk and scan
(unstable.py). That gives the kernel's
result whenever the pages inserted in the current scan are not modified or unmapped before
the scan ends (the unstable tree is rebuilt every scan): the rbtree path only matters when a
node on the path went away or changed mid-scan, which the model resolves at the matching node
only (documented deviation).
"""

from __future__ import annotations

from array import array
from bisect import bisect_right
from itertools import compress
from typing import TYPE_CHECKING, Any

from ksm_model import stable, thp
from ksm_model.content import ZERO
from ksm_model.pages import KZERO, Page
from ksm_model.rmap import (
    AGE_MAX,
    AGE_ONE,
    AGE_SHIFT,
    EXISTS,
    MASK,
    SEQ_MASK,
    SEQ_SHIFT,
    SHIFT,
    SIZE,
    SKIP_ONE,
    SKIP_SHIFT,
    TREE,
    UNSTABLE,
    Chunk,
    StableRef,
    ctag,
    unstable_bits,
)
from ksm_model.stable import StableNode

if TYPE_CHECKING:
    from ksm_model.kernel import Kernel
    from ksm_model.process import Process, Vma
    from ksm_model.unstable import TreeItem

_SKIP_AGE = [1] * 4 + [2] * 2 + [4] * 3 + [8] * 247  # skip_age(age) for age 0..255

# Kinds of page visit, counted in Kernel.visits for cost models (they change no behaviour):
# FIRST: the checksum changed (a new rmap_item, or new content): only checksummed;
# UNIQUE: searched the trees and stayed unmerged; MERGED: the page is already a KSM page;
# JOINED: merged now, into a plain stable node, with an unstable-tree partner or with the
#   zero page; CHAINED: merged now into a dup of a stable_node_chain (the search walked it).
V_FIRST, V_UNIQUE, V_MERGED, V_JOINED, V_CHAINED = range(5)
VISIT_KINDS = ("first", "unique", "merged", "joined", "chained")


def remove_from_tree(k: Kernel, mm: Process, c: Chunk, j: int) -> None:
    """remove_rmap_item_from_tree for the item at index j of chunk c (of mm)."""
    slot = c.ock[j]
    cls = slot.__class__
    if cls is StableNode or cls is StableRef:
        if cls is StableNode:
            node, old = slot, slot.key
        else:
            node, old = slot.node, slot.oldck
        if not node.dead and stable.get_folio(k, node):
            node.length -= 1
            stable.touched(node)
            if node.length:
                k.pages_sharing -= 1
            else:
                k.pages_shared -= 1
            mm.ksm_merging_pages -= 1
            n = node.mms[mm] - 1
            if n:
                node.mms[mm] = n
            else:
                del node.mms[mm]
        c.ock[j] = old  # oldchecksum is kept
        return
    x = c.st[j]
    if x & UNSTABLE:
        # UNSTABLE: physically erased only if inserted in this scan (older trees were reset).
        if not (k.seqnr - (x >> SEQ_SHIFT)) & SEQ_MASK:
            k.unstable.erase(mm, c, j, slot)  # slot: the content it was inserted under
        k.pages_unshared -= 1
        c.st[j] = x & ~TREE


def free_item(k: Kernel, mm: Process, c: Chunk, j: int) -> None:
    """remove_rmap_item_from_tree + free_rmap_item."""
    remove_from_tree(k, mm, c, j)
    c.ock[j] = None
    c.st[j] = 0
    c.n -= 1
    mm.rmap.count -= 1
    k.ksm_rmap_items -= 1
    mm.ksm_rmap_items -= 1


def free_range(k: Kernel, mm: Process, lo: int, hi: int) -> None:
    """Free mm's items at page numbers [lo, hi), in address order (the ones ksmd passes
    over in get_next_rmap_item, or remove_trailing_rmap_items)."""
    rm = mm.rmap
    if not rm.count:
        return
    for c in list(rm.span(lo, hi)):
        base = c.base
        j0, j1 = max(lo - base, 0), min(hi - base, SIZE)
        for j in compress(range(j0, j1), c.st[j0:j1]):
            free_item(k, mm, c, j)


def remove_all_items(k: Kernel, mm: Process) -> None:
    """Free every rmap_item of mm (remove_trailing_rmap_items from the list head)."""
    free_range(k, mm, 0, 1 << 62)
    mm.rmap.prune()
    mm.rmap.fp = 0


def _alloc(k: Kernel, mm: Process, pn: int) -> tuple[Chunk, int]:
    """get_next_rmap_item's second half: the item at pn, allocated if there is none."""
    c = mm.rmap.chunk(mm, pn)
    j = pn & MASK
    if not c.st[j]:
        c.st[j] = EXISTS  # all fields zero, oldchecksum 0
        c.ock[j] = None
        c.n += 1
        mm.rmap.count += 1
        k.ksm_rmap_items += 1
        mm.ksm_rmap_items += 1
    return c, j


def _should_skip(k: Kernel, mm: Process, c: Chunk, j: int, s: Any) -> bool:
    """should_skip_rmap_item (smart_scan=1)."""
    if s.__class__ is Page and s.node is not None:
        return False  # KSM pages are never skipped
    st = c.st
    x = st[j]
    age = (x >> AGE_SHIFT) & AGE_MAX
    skips = x >> SKIP_SHIFT
    if age != AGE_MAX:
        x += AGE_ONE
    if age < 3:
        st[j] = x
        return False
    if not skips:
        st[j] = x | _SKIP_AGE[age] << SKIP_SHIFT
        return False
    k.pages_skipped += 1
    st[j] = x - SKIP_ONE
    remove_from_tree(k, mm, c, j)
    return True


def _next_mm(k: Kernel, mm: Process) -> None:
    k.unstable.walked.append(mm)
    k.cursor = mm
    k.scan_addr = 0
    mm.rmap.fp = 0


_NO_OCK: list[Any] = [None] * SIZE  # stand-ins for a chunk that does not exist (read only)
_NO_ST = array("H", bytes(2 * SIZE))


def _walk(k: Kernel, mm: Process, budget: int) -> tuple[int, bool]:
    """Scan mm from k.scan_addr, merging up to `budget` pages.

    Returns (pages handed to cmp_and_merge_page, reached the end of mm's VMAs). The common
    cases (a new item's first visit, which only records the checksum; a KSM page already on
    its node; an unchanged unique page going back into the unstable tree) are handled
    inline; everything else goes through cmp_and_merge().
    """
    addr = k.scan_addr
    vmas = mm.vmas
    i = bisect_right(mm._starts, addr) - 1
    if i < 0 or vmas[i].end <= addr:
        i += 1
    smart = k.smart_scan and k.profile.smart_scan
    first_fast = k.profile.checksum_first  # (<= 6.10 searches the stable tree first)
    new_state = EXISTS | AGE_ONE if smart else EXISTS  # a new item after its first visit
    fast = first_fast and k.merge_across_nodes and not k.use_zero_pages
    merge = cmp_and_merge if first_fast else cmp_and_merge_old
    stable0 = k.stable_trees[0]
    unstable = k.unstable
    fast = fast and not unstable.slow
    udict0 = unstable.dicts[0]
    seqnr = k.seqnr
    cur = unstable_bits(seqnr)
    rm = mm.rmap
    chunks = rm.chunks
    kzero, page_cls, tree_bits, keep_bits, unstable_bit = KZERO, Page, TREE, ~TREE, UNSTABLE
    # The rmap_list cursor is `addr` while every address passed had a page; otherwise `hole`
    # is the first address passed without one (-1: none), whose items get freed later.
    hole = rm.fp if rm.fp != addr else -1
    n = 0
    # Fast-path counts, added to the kernel's on return: visits (first, unique; the merged
    # ones are the rest of n apart from the `ns` cmp_and_merge calls) and items allocated.
    nf = nu = ns = na = 0
    visits = k.visits
    c: Any = None
    for v in vmas[i:]:
        if not v.mergeable:
            continue
        if addr < v.start:
            if hole < 0:
                hole = addr
            addr = v.start
        if not v.anon:
            if hole < 0:
                hole = addr
            addr = v.end
            continue
        pages = v.pages
        base = v.start
        end = v.end
        while addr < end:
            # One chunk of rmap_items at a time.
            cbase = addr & ~MASK
            c = chunks.get(cbase >> SHIFT)
            if c is None:
                ock, st, tag = _NO_OCK, _NO_ST, None
            else:
                ock, st, tag = c.ock, c.st, c.tag
                if tag is not None and tag.seq != seqnr:
                    tag = None
            segend = cbase + SIZE
            if segend > end:
                segend = end
            while addr < segend:
                s = pages[addr - base]
                if s is None or s is kzero:
                    if hole < 0:
                        hole = addr
                    addr += 1
                    continue
                if hole >= 0:
                    # get_next_rmap_item frees the items it passes over.
                    free_range(k, mm, hole, addr)
                    hole = -1
                j = addr - cbase
                cls = s.__class__
                if cls is page_cls and (node := s.node) is not None:
                    if ock[j] is node:
                        n += 1  # steady state of a merged page: nothing to do
                        addr += 1
                        if n == budget:
                            break
                        continue
                    if not st[j]:
                        c, _ = _alloc(k, mm, addr)  # KSM pages are never skipped
                        ock, st = c.ock, c.st
                else:
                    x = st[j]
                    if not x:
                        # get_next_rmap_item allocates an item (all fields zero).
                        if c is None:
                            c = rm.chunk(mm, addr)
                            ock, st = c.ock, c.st
                        c.n += 1
                        rm.count += 1
                        na += 1
                        if first_fast:
                            # Its first visit (age 0: never skipped) records the checksum.
                            st[j] = new_state
                            ock[j] = s if cls is bytes else s.key
                            nf += 1
                            n += 1
                            addr += 1
                            if n == budget:
                                break
                            continue
                        x = st[j] = EXISTS
                    if smart:
                        if _should_skip(k, mm, c, j, s):
                            addr += 1
                            continue
                        x = st[j]
                    if fast and cls is bytes and ock[j] == s and x & tree_bits != cur:
                        # Not STABLE (the slot is the content), not inserted in this scan
                        # and unchanged since the last checksum.
                        t = udict0.get(s)
                        if stable0.root is None and (t is None or t.seq != seqnr):
                            # No stable tree and no entry of this scan under that content:
                            # back into the unstable tree (pages_unshared -1 +1, or +1 if it
                            # was volatile).
                            if tag is None:
                                tag = ctag(c, seqnr)
                                rm.useq = seqnr
                            udict0[s] = tag
                            unstable.count += 1
                            st[j] = x & keep_bits | cur
                            if not x & unstable_bit:
                                k.pages_unshared += 1
                            n += 1
                            nu += 1
                            addr += 1
                            if n == budget:
                                break
                            continue
                rm.fp = k.scan_addr = addr + 1
                k.ksm_rmap_items += na
                mm.ksm_rmap_items += na
                na = 0
                ns += 1
                merge(k, mm, v, addr - base, c, j)
                if unstable.slow:
                    fast = False  # a huge page split took pages from under the unstable tree
                tag = c.tag
                if tag is not None and tag.seq != seqnr:
                    tag = None
                n += 1
                addr += 1
                if n == budget:
                    break
            else:
                continue
            break  # the budget is used up
        else:
            continue
        break
    rm.fp = hole if hole >= 0 else addr
    k.scan_addr = addr
    k.ksm_rmap_items += na
    mm.ksm_rmap_items += na
    visits[V_FIRST] += nf
    visits[V_MERGED] += n - nf - nu - ns
    visits[V_UNIQUE] += nu
    return n, n != budget


def do_scan(k: Kernel, budget: int) -> int:
    """ksm_do_scan: one batch; returns the number of pages handed to cmp_and_merge_page.

    A full scan always ends the batch (scan_get_next_rmap_item returns NULL after seqnr++).
    """
    done = 0
    if not k.mm_list:
        return 0
    if budget <= 0:
        _account_scanned(k, budget, 0, False)
        return 0
    mm = k.cursor
    if mm is None:  # start of a full scan
        k.advisor.start_scan(k)
        k.lru.drain_all()  # lru_add_drain_all()
        k.unstable.reset(k.seqnr)
        mm = k.mm_list[0]
        _next_mm(k, mm)
    while True:
        if not mm.exiting:
            n, finished = _walk(k, mm, budget - done)
            done += n
            if not finished:
                break
        else:
            k.scan_addr = 0
        if mm.exiting:
            remove_all_items(k, mm)
        else:
            free_range(k, mm, mm.rmap.fp, 1 << 62)  # remove_trailing_rmap_items
            mm.rmap.fp = 0
            mm.rmap.prune()
        idx = k.mm_list.index(mm)
        nxt = k.mm_list[idx + 1] if idx + 1 < len(k.mm_list) else None
        if k.scan_addr == 0:
            # No VM_MERGEABLE VMA (or exiting): drop the mm_slot, as __ksm_exit would.
            del k.mm_list[idx]
            mm.registered = False
            mm.merge_any = False
        if nxt is None:
            k.cursor = None
            k.advisor.stop_scan(k)
            k.seqnr += 1
            _account_scanned(k, budget, done, True)
            return done
        mm = nxt
        _next_mm(k, mm)
    _account_scanned(k, budget, done, False)
    return done


def _account_scanned(k: Kernel, budget: int, done: int, ended_scan: bool) -> None:
    """pages_scanned after a batch. 6.6-6.9 (before 730cdc2c72c6) added
    `scan_npages - npages` after the loop `while (npages--)`: nothing for a batch that ended a
    full scan (it returned early), and pages_to_scan + 1 (u32 arithmetic) for a batch that
    used its whole budget, the counter having wrapped past 0."""
    if k.profile.pages_scanned_exact:
        k.pages_scanned += done
    elif not ended_scan:
        k.pages_scanned += (budget + 1) & 0xFFFFFFFF


def _release(k: Kernel, s: Any) -> None:
    """Drop this PTE's reference to the page it mapped before a merge."""
    if s.__class__ is Page:
        s.mapcount -= 1
        if s.node is not None:
            stable.touched(s.node)  # a KSM page may have gone stale


def _one_page(
    k: Kernel, mm: Process, v: Vma, i: int, s: Any, pinned: thp.Folio | None = None
) -> bool:
    """try_to_merge_one_page up to write_protect_page(): can page s at (mm, i) be merged?

    A page of a large folio needs split_huge_page first; that fails while ksmd holds a
    reference to another page of the same folio (`pinned`). A split may have mapped the page
    itself to the zero page (6.12+): then it is no longer mapped there and nothing merges.
    A page still in an LRU batch cannot be write-protected.
    """
    pn = v.start + i
    if mm.nlarge:
        folio = thp.folio_at(k, mm, pn)
        if folio is not None:
            if folio is pinned:
                return False
            thp.split(k, folio)
    if v.pages[i] is not s:
        return False
    return not k.merge_blocked(mm, pn)


def _merge_zero(k: Kernel, mm: Process, v: Vma, i: int, s: Any) -> bool:
    """try_to_merge_with_zero_page; False if the page could not be write-protected."""
    if (mm.nlarge or v.pages[i] is not s or k.lru.pending) and not _one_page(k, mm, v, i, s):
        return False
    v.pages[i] = KZERO
    _release(k, s)
    k.map_zero_page(mm)
    return True


def _merge_into(
    k: Kernel, mm: Process, v: Vma, i: int, s: Any, c: Chunk, j: int, dup: StableNode
) -> None:
    kp = dup.page
    assert kp is not None
    # (The common case, no huge page and nothing batched, needs no call.)
    if (mm.nlarge or v.pages[i] is not s or k.lru.pending) and not _one_page(k, mm, v, i, s):
        return  # try_to_merge_one_page failed: the item stays out of every tree (volatile)
    v.pages[i] = kp
    kp.mapcount += 1
    _release(k, s)
    stable.append(k, c, j, dup, mm)


def _unstable(
    k: Kernel, mm: Process, v: Vma, i: int, s: Any, c: Chunk, j: int, key: bytes, nid: int
) -> None:
    """unstable_tree_search_insert and, on a match, try_to_merge_two_pages + insert."""
    if v.pages[i] is not s:
        # A failed zero-page merge split its huge page and the page went to the zero page:
        # it is still inserted (ksmd holds it), and every later walk through it stops.
        k.unstable.go_exact(k)
    got = k.unstable.search_insert(k, mm, s, c, j, key, nid)
    if got is not None:
        _merge_two(k, mm, v, i, s, c, j, got)


def _merge_two(
    k: Kernel, mm: Process, v: Vma, i: int, s: Any, c: Chunk, j: int, t: TreeItem
) -> None:
    tc, tj, tv, ti, ts = t
    tmm: Process = tc.mm
    tfolio = thp.folio_at(k, tmm, tv.start + ti) if tmm.nlarge else None
    slow = mm.nlarge or tmm.nlarge or v.pages[i] is not s or k.lru.pending
    if slow and not _one_page(k, mm, v, i, s, tfolio):
        # No merge, the tree item stays. Both pages in one huge page: the split failed for
        # the reference ksmd holds on the tree page; split it now (the pair merges later).
        if tfolio is not None and thp.folio_at(k, mm, v.start + i) is tfolio:
            thp.split(k, tfolio)
        return
    if slow and not _one_page(k, tmm, tv, ti, ts):
        # The tree page cannot be replaced: break_cow() undoes the new KSM page, leaving
        # a fresh private copy (itself new, so in an LRU batch).
        k.new_page(mm, v.start + i)
        return
    if s.__class__ is bytes:
        kp = Page(s, 1, v.nid)
        v.pages[i] = kp
    else:
        kp = s  # a page shared with a fork becomes KSM for every mapper
    tv.pages[ti] = kp
    kp.mapcount += 1
    _release(k, ts)
    remove_from_tree(k, tmm, tc, tj)
    node = stable.insert(k, kp)
    stable.append(k, tc, tj, node, tmm)
    stable.append(k, c, j, node, mm)


def _on_node(slot: Any, node: StableNode) -> bool:
    """Does an item with this slot hang from `node`?"""
    return slot is node or (slot.__class__ is StableRef and slot.node is node)


def _stable_now(c: Chunk, j: int) -> bool:
    slot = c.ock[j]
    return slot.__class__ is StableNode or slot.__class__ is StableRef


def cmp_and_merge(k: Kernel, mm: Process, v: Vma, i: int, c: Chunk, j: int) -> None:
    """cmp_and_merge_page, 6.11+ order (checksum before the stable search)."""
    s = v.pages[i]
    if s.__class__ is Page and s.node is not None:
        node = s.node
        k.visits[V_MERGED] += 1
        if _on_node(c.ock[j], node):
            return
        # A KSM page reached by an rmap_item not on its node (fork, swap-in): append.
        remove_from_tree(k, mm, c, j)
        stable.append(k, c, j, node, mm)
        return
    remove_from_tree(k, mm, c, j)
    key = s if s.__class__ is bytes else s.key
    if c.ock[j] != key:
        c.ock[j] = key
        k.visits[V_FIRST] += 1
        return
    if k.use_zero_pages and key == ZERO and _merge_zero(k, mm, v, i, s):
        k.visits[V_JOINED] += 1
        return
    nid = 0 if k.merge_across_nodes else (s.nid if s.__class__ is Page else v.nid)
    if k.stable_trees[nid].root is not None:
        dup = stable.search(k, key, nid)
        if dup is not None:
            k.visits[V_JOINED if dup.in_chain is None else V_CHAINED] += 1
            _merge_into(k, mm, v, i, s, c, j, dup)
            return
    _unstable(k, mm, v, i, s, c, j, key, nid)
    k.visits[V_JOINED if _stable_now(c, j) else V_UNIQUE] += 1


def cmp_and_merge_old(k: Kernel, mm: Process, v: Vma, i: int, c: Chunk, j: int) -> None:
    """cmp_and_merge_page, <= 6.10 order (stable search first, on every visit)."""
    s = v.pages[i]
    if s.__class__ is Page and s.node is not None:
        node = s.node
        k.visits[V_MERGED] += 1
        if _on_node(c.ock[j], node):
            return
        remove_from_tree(k, mm, c, j)
        stable.append(k, c, j, node, mm)
        return
    key = s if s.__class__ is bytes else s.key
    nid = 0 if k.merge_across_nodes else (s.nid if s.__class__ is Page else v.nid)
    dup = stable.search(k, key, nid) if k.stable_trees[nid].root is not None else None
    remove_from_tree(k, mm, c, j)
    if dup is not None:
        k.visits[V_JOINED if dup.in_chain is None else V_CHAINED] += 1
        _merge_into(k, mm, v, i, s, c, j, dup)
        return
    if c.ock[j] != key:
        c.ock[j] = key
        k.visits[V_FIRST] += 1
        return
    if k.use_zero_pages and key == ZERO and _merge_zero(k, mm, v, i, s):
        k.visits[V_JOINED] += 1
        return
    _unstable(k, mm, v, i, s, c, j, key, nid)
    k.visits[V_JOINED if _stable_now(c, j) else V_UNIQUE] += 1
