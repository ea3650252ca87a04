"""ksmd's batch: scan_get_next_rmap_item, cmp_and_merge_page and the unstable tree.

Per mm, ``items`` is the rmap_item list sorted by address. While ksmd is inside an mm, items
it has passed are in ``new`` and the rest is ``items[r:]`` (the kernel's rmap_list cursor).

The unstable tree is a dict per NUMA node, content key -> rmap_item. That gives the kernel's
result whenever the pages inserted in the current scan are not modified or unmapped before
the scan ends (the unstable tree is rebuilt every scan): the rbtree path only matters when a
node on the path went away or changed mid-scan, which the model resolves at the matching node
only (documented deviation).
"""

from __future__ import annotations

from bisect import bisect_right
from typing import TYPE_CHECKING, Any

from ksm_model import stable, thp
from ksm_model.content import ZERO
from ksm_model.pages import ASK, KZERO, SEQNR_MASK, Page, RmapItem, UTag
from ksm_model.stable import StableNode

if TYPE_CHECKING:
    from ksm_model.kernel import Kernel
    from ksm_model.process import Process, Vma

_SKIP_AGE = [1] * 4 + [2] * 2 + [4] * 3 + [8] * 247  # skip_age(age) for age 0..255

# Kinds of page visit, counted in Kernel.visits for cost models (they change no behaviour):
# FIRST: the checksum changed (a new rmap_item, or new content): only checksummed;
# UNIQUE: searched the trees and stayed unmerged; MERGED: the page is already a KSM page;
# JOINED: merged now, into a plain stable node, with an unstable-tree partner or with the
#   zero page; CHAINED: merged now into a dup of a stable_node_chain (the search walked it).
V_FIRST, V_UNIQUE, V_MERGED, V_JOINED, V_CHAINED = range(5)
VISIT_KINDS = ("first", "unique", "merged", "joined", "chained")


def remove_from_tree(k: Kernel, it: RmapItem, mm: Process) -> None:
    """remove_rmap_item_from_tree."""
    ref = it.ref
    if ref is None:
        return
    if ref.__class__ is StableNode:
        if not ref.dead and stable.get_folio(k, ref):
            ref.length -= 1
            if ref.length:
                k.pages_sharing -= 1
            else:
                k.pages_shared -= 1
            mm.ksm_merging_pages -= 1
            n = ref.mms[mm] - 1
            if n:
                ref.mms[mm] = n
            else:
                del ref.mms[mm]
    else:
        # UNSTABLE: physically erased only if inserted in this scan (older trees were reset).
        if not (k.seqnr - ref.seq) & SEQNR_MASK:
            key = it.oldck  # the content it was inserted under (unchanged while in the tree)
            assert key is not None
            k.unstable.erase(it, key)
        k.pages_unshared -= 1
    it.ref = None


def utag(k: Kernel, mm: Process) -> UTag:
    """The UNSTABLE tag for items mm inserts in the current scan."""
    tag: UTag = mm.utag
    if tag is None or tag.seq != k.seqnr:
        tag = mm.utag = UTag(mm, k.seqnr)
    return tag


def free_item(k: Kernel, it: RmapItem, mm: Process) -> None:
    """remove_rmap_item_from_tree + free_rmap_item."""
    if it.ref is not None:
        remove_from_tree(k, it, mm)
    k.ksm_rmap_items -= 1
    mm.ksm_rmap_items -= 1


def remove_all_items(k: Kernel, mm: Process) -> None:
    """Free every rmap_item of mm (remove_trailing_rmap_items from the list head)."""
    passed = mm.new if mm.new is not None else mm.items[: mm.r]
    for it in passed:
        free_item(k, it, mm)
    for it in mm.items[mm.r :]:
        free_item(k, it, mm)
    mm.items, mm.new, mm.r = [], None, 0


def _get_next_rmap_item(k: Kernel, mm: Process, addr: int) -> RmapItem:
    """get_next_rmap_item: reuse the item at addr, freeing the ones passed over, or allocate.

    ``mm.new`` stays None while the walk has neither freed nor allocated an item (then the
    passed items are exactly ``items[:r]``), so steady-state scans copy no list.
    """
    items = mm.items
    r = mm.r
    n = len(items)
    while r < n:
        it = items[r]
        if it.addr == addr:
            mm.r = r + 1
            if mm.new is not None:
                mm.new.append(it)
            return it
        if it.addr > addr:
            break
        if mm.new is None:
            mm.new = items[:r]
        r += 1
        free_item(k, it, mm)
    mm.r = r
    if mm.new is None:
        mm.new = items[:r]
    it = RmapItem(addr)
    k.ksm_rmap_items += 1
    mm.ksm_rmap_items += 1
    mm.new.append(it)
    return it


def _should_skip(k: Kernel, s: Any, it: RmapItem, mm: Process) -> bool:
    """should_skip_rmap_item (smart_scan=1)."""
    if s.__class__ is Page and s.node is not None:
        return False  # KSM pages are never skipped
    ask = it.ask
    age = ask & 255
    skips = ask >> 8
    if age != 255:
        it.ask = ASK[ask + 1]
    if age < 3:
        return False
    if not skips:
        it.ask = ASK[(it.ask & 255) | _SKIP_AGE[age] << 8]
        return False
    k.pages_skipped += 1
    it.ask = ASK[it.ask - 256]
    remove_from_tree(k, it, mm)
    return True


def _next_mm(k: Kernel, mm: Process) -> None:
    k.unstable.walked.append(mm)
    k.cursor = mm
    k.scan_addr = 0
    mm.new = None
    mm.r = 0


def _walk(k: Kernel, mm: Process, budget: int) -> tuple[int, bool]:
    """Scan mm from k.scan_addr, merging up to `budget` pages.

    Returns (pages handed to cmp_and_merge_page, reached the end of mm's VMAs). The common
    cases (a KSM page already on its node; an unchanged unique page going back into the
    unstable tree) are handled inline; everything else goes through cmp_and_merge().
    """
    addr = k.scan_addr
    vmas = mm.vmas
    i = bisect_right(mm._starts, addr) - 1
    if i < 0 or vmas[i].end <= addr:
        i += 1
    smart = k.smart_scan and k.profile.smart_scan
    fast = k.profile.checksum_first and k.merge_across_nodes and not k.use_zero_pages
    merge = cmp_and_merge if k.profile.checksum_first else cmp_and_merge_old
    stable0 = k.stable_trees[0]
    fast = fast and not k.unstable.slow
    unstable = k.unstable
    udict0 = unstable.dicts[0]
    ulive = unstable.live
    tag = utag(k, mm)
    seqnr = k.seqnr
    items = mm.items
    nitems = len(items)
    r = mm.r
    new = mm.new
    n = 0
    nm = nu = 0  # fast-path visits (merged, unique), added to k.visits on return
    visits = k.visits
    for v in vmas[i:]:
        if not v.mergeable:
            continue
        if addr < v.start:
            addr = v.start
        if not v.anon:
            addr = v.end
            continue
        pages = v.pages
        base = v.start
        end = v.end
        while addr < end:
            s = pages[addr - base]
            if s is None or s is KZERO:
                addr += 1
                continue
            # get_next_rmap_item
            if r < nitems and items[r].addr == addr:
                it = items[r]
                r += 1
                if new is not None:
                    new.append(it)
            else:
                mm.r = r
                it = _get_next_rmap_item(k, mm, addr)
                r = mm.r
                new = mm.new
            cls = s.__class__
            if cls is Page and s.node is not None:
                if it.ref is s.node:
                    n += 1  # steady state of a merged page: nothing to do
                    nm += 1
                    addr += 1
                    if n == budget:
                        mm.r = r
                        k.scan_addr = addr
                        visits[V_MERGED] += nm
                        visits[V_UNIQUE] += nu
                        return n, False
                    continue
            else:
                if smart and _should_skip(k, s, it, mm):
                    addr += 1
                    continue
                if fast and cls is bytes and it.oldck == s and stable0.root is None:
                    ref = it.ref
                    t = udict0.get(s)
                    # Volatile, or unshared from an earlier scan; and no live partner in this
                    # scan's tree (an entry of an earlier scan, usually this very item, is void).
                    if (
                        ref is None or (ref.__class__ is UTag and (seqnr - ref.seq) & SEQNR_MASK)
                    ) and (t is None or t is it or not ulive(t, s)):
                        # Unchanged page, no stable tree, no partner: back into the
                        # unstable tree (pages_unshared -1 +1, or +1 if it was volatile).
                        udict0[s] = it
                        unstable.count += 1
                        it.ref = tag
                        if ref is None:
                            k.pages_unshared += 1
                        n += 1
                        nu += 1
                        addr += 1
                        if n == budget:
                            mm.r = r
                            k.scan_addr = addr
                            visits[V_MERGED] += nm
                            visits[V_UNIQUE] += nu
                            return n, False
                        continue
            mm.r = r
            k.scan_addr = addr + 1
            merge(k, mm, v, addr - base, it)
            if unstable.slow:
                fast = False  # a huge page split took pages from under the unstable tree
            n += 1
            addr += 1
            if n == budget:
                visits[V_MERGED] += nm
                visits[V_UNIQUE] += nu
                return n, False
    mm.r = r
    k.scan_addr = addr
    visits[V_MERGED] += nm
    visits[V_UNIQUE] += nu
    return n, True


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
            for it in mm.items[mm.r :]:
                free_item(k, it, mm)
            if mm.new is not None:
                mm.items = mm.new
            elif mm.r < len(mm.items):
                del mm.items[mm.r :]
            mm.new, mm.r = None, 0
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


def _release(s: Any) -> None:
    """Drop this PTE's reference to the page it mapped before a merge."""
    if s.__class__ is Page:
        s.mapcount -= 1


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
    _release(s)
    k.map_zero_page(mm)
    return True


def _merge_into(
    k: Kernel, mm: Process, v: Vma, i: int, s: Any, it: RmapItem, dup: stable.StableNode
) -> None:
    kp = dup.page
    assert kp is not None
    # (The common case, no huge page and nothing batched, needs no call.)
    if (mm.nlarge or v.pages[i] is not s or k.lru.pending) and not _one_page(k, mm, v, i, s):
        return  # try_to_merge_one_page failed: the item stays out of every tree (volatile)
    v.pages[i] = kp
    kp.mapcount += 1
    _release(s)
    stable.append(k, it, dup, mm)


def _unstable(
    k: Kernel, mm: Process, v: Vma, i: int, s: Any, it: RmapItem, key: bytes, nid: int
) -> None:
    """unstable_tree_search_insert and, on a match, try_to_merge_two_pages + insert."""
    if v.pages[i] is not s:
        # A failed zero-page merge split its huge page and the page went to the zero page:
        # it is still inserted (ksmd holds it), and every later walk through it stops.
        k.unstable.go_exact(k)
    got = k.unstable.search_insert(k, mm, s, it, key, nid)
    if got is not None:
        t, (tmm, tv, ti, ts) = got
        _merge_two(k, mm, v, i, s, it, tmm, tv, ti, ts, t)


def _merge_two(
    k: Kernel,
    mm: Process,
    v: Vma,
    i: int,
    s: Any,
    it: RmapItem,
    tmm: Process,
    tv: Vma,
    ti: int,
    ts: Any,
    t: RmapItem,
) -> None:
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
    _release(ts)
    remove_from_tree(k, t, tmm)
    node = stable.insert(k, kp)
    stable.append(k, t, node, tmm)
    stable.append(k, it, node, mm)


def cmp_and_merge(k: Kernel, mm: Process, v: Vma, i: int, it: RmapItem) -> None:
    """cmp_and_merge_page, 6.11+ order (checksum before the stable search)."""
    s = v.pages[i]
    if s.__class__ is Page and s.node is not None:
        node = s.node
        k.visits[V_MERGED] += 1
        if it.ref is node:
            return
        # A KSM page reached by an rmap_item not on its node (fork, swap-in): append.
        remove_from_tree(k, it, mm)
        stable.append(k, it, node, mm)
        return
    if it.ref is not None:
        remove_from_tree(k, it, mm)
    key = s if s.__class__ is bytes else s.key
    if it.oldck != key:
        it.oldck = key
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
            _merge_into(k, mm, v, i, s, it, dup)
            return
    _unstable(k, mm, v, i, s, it, key, nid)
    k.visits[V_JOINED if it.ref.__class__ is StableNode else V_UNIQUE] += 1


def cmp_and_merge_old(k: Kernel, mm: Process, v: Vma, i: int, it: RmapItem) -> None:
    """cmp_and_merge_page, <= 6.10 order (stable search first, on every visit)."""
    s = v.pages[i]
    if s.__class__ is Page and s.node is not None:
        node = s.node
        k.visits[V_MERGED] += 1
        if it.ref is node:
            return
        remove_from_tree(k, it, mm)
        stable.append(k, it, node, mm)
        return
    key = s if s.__class__ is bytes else s.key
    nid = 0 if k.merge_across_nodes else (s.nid if s.__class__ is Page else v.nid)
    dup = stable.search(k, key, nid) if k.stable_trees[nid].root is not None else None
    if it.ref is not None:
        remove_from_tree(k, it, mm)
    if dup is not None:
        k.visits[V_JOINED if dup.in_chain is None else V_CHAINED] += 1
        _merge_into(k, mm, v, i, s, it, dup)
        return
    if it.oldck != key:
        it.oldck = key
        k.visits[V_FIRST] += 1
        return
    if k.use_zero_pages and key == ZERO and _merge_zero(k, mm, v, i, s):
        k.visits[V_JOINED] += 1
        return
    _unstable(k, mm, v, i, s, it, key, nid)
    k.visits[V_JOINED if it.ref.__class__ is StableNode else V_UNIQUE] += 1
