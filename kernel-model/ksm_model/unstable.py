"""The unstable tree: a dict per NUMA node while that is exact, a real rbtree when it is not.

The kernel's unstable tree is an rbtree of this scan's rmap_items ordered by the *current*
content of their pages (it is emptied at the start of every full scan). While no page
inserted in this scan has changed, a dict keyed by content gives exactly the kernel's result:
the walk meets no gone or modified page, and equal content is found wherever it sits.

A dict maps a content key to a CTag (rmap.py): the chunk of rmap_items the inserted item is
in and the full scan it was inserted in; rmap.locate() finds the item itself on a match. The
dicts persist across scans: an entry counts only if its tag's seqnr is the current one (an
entry is deleted when its item leaves the tree), so a steady scan overwrites last scan's
entries in place instead of rebuilding a table.

When a user operation may change a page inserted in this scan (write, munmap,
MADV_DONTNEED/UNMERGEABLE, exit of an mm that inserted pages in this scan), the model switches
to a real rbtree for the rest of the scan. It rebuilds the kernel's exact tree shape by
replaying this scan's inserts in order (the walk order: mm by mm as ksmd visited them, each by
address) and its erases (logged with the insert count at the time), then walks it like
unstable_tree_search_insert: comparing current contents, stopping at a page that is gone or
is the very same page, or on a NUMA mismatch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ksm_model.content import compare
from ksm_model.pages import KZERO, Page
from ksm_model.rbtree import RBTree
from ksm_model.rmap import MASK, SHIFT, TREE, Chunk, CTag, ctag, locate, unstable_bits

if TYPE_CHECKING:
    from ksm_model.kernel import Kernel
    from ksm_model.process import Process, Vma

ItemAt = tuple["Process", int]  # (mm, page number) of an rmap_item
# A tree item that matched: (its chunk, its index there, and its page: vma, index, page).
TreeItem = tuple[Chunk, int, "Vma", int, Any]


class _Node:
    __slots__ = ("key", "l", "mm", "p", "pn", "r", "red")

    def __init__(self, mm: Process, pn: int, key: bytes) -> None:
        self.mm = mm
        self.pn = pn
        self.key = key  # the content it was inserted under (its oldchecksum)
        self.p: Any = None
        self.l: Any = None
        self.r: Any = None
        self.red = False


def tree_page(tmm: Process, pn: int) -> tuple[Vma, int, Any] | None:
    """get_mergeable_page: (vma, index, page) of a tree item at (tmm, pn), None if gone."""
    if tmm.exiting:
        return None
    tv = tmm.find_vma(pn)
    if tv is None or not tv.mergeable or not tv.anon:
        return None
    ti = pn - tv.start
    ts = tv.pages[ti]
    if ts is None or ts is KZERO:
        return None
    return tv, ti, ts


def _chunk_of(mm: Process, pn: int) -> Chunk:
    return mm.rmap.chunks[pn >> SHIFT]


class Unstable:
    """All unstable trees of a kernel (one per NUMA node)."""

    def __init__(self, nodes: int) -> None:
        self.dicts: list[dict[bytes, CTag]] = [{} for _ in range(nodes)]
        self.seqnr = 0  # the scan the current entries belong to
        self.count = 0  # inserts in this scan
        self.walked: list[Process] = []  # mms in the order ksmd walked them this scan
        # Erased this scan: (mm, page number, key, nid, inserts before the erase).
        self.erased: list[tuple[Process, int, bytes, int, int]] = []
        self.slow = False
        self.trees: list[RBTree] = []
        self.nodes: dict[ItemAt, _Node] = {}

    def reset(self, seqnr: int, hard: bool = False) -> None:
        """root_unstable_tree[nid] = RB_ROOT: a new scan (entries of older scans are void)."""
        for d in self.dicts:
            # Drop the table when stale entries would dominate (content that went away).
            if hard or len(d) > 2 * self.count + 1024:
                d.clear()
        self.seqnr = seqnr
        self.count = 0
        self.walked = []
        self.erased = []
        self.slow = False
        self.trees = []
        self.nodes = {}

    def live(self, t: CTag | None) -> bool:
        """Is dict entry `t` in the current scan's tree?"""
        return t is not None and t.seq == self.seqnr

    # -- dict mode ----------------------------------------------------------------------------
    def erase(self, mm: Process, c: Chunk, j: int, key: bytes) -> None:
        """rb_erase of the item at index j of chunk c, inserted in this scan under `key`."""
        pn = c.base + j
        if self.slow:
            node = self.nodes.pop((mm, pn), None)
            if node is not None:
                for tree in self.trees:
                    if _root_of(node) is tree.root:
                        tree.erase(node)
                        break
            return
        for nid, d in enumerate(self.dicts):
            t = d.get(key)
            if t is not None and t.chunk is c and t.seq == self.seqnr:
                del d[key]
                self.erased.append((mm, pn, key, nid, self.count))
                return

    def touched(self, k: Kernel, mm: Process) -> None:
        """A user operation may have changed pages mm inserted in this scan: go exact."""
        if self.slow or k.cursor is None:
            return
        if mm.rmap.useq == k.seqnr:
            self._go_slow(k)

    def go_exact(self, k: Kernel) -> None:
        """Switch to the exact rbtree for the rest of this scan (a page is going into the
        tree that is not mapped where its item says)."""
        if not self.slow and k.cursor is not None:
            self._go_slow(k)

    def _history(self) -> list[tuple[Process, int, bytes, int]]:
        """This scan's inserts in order, as (mm, page number, key, nid): the walk order."""
        erased: dict[Process, list[tuple[Process, int, bytes, int]]] = {}
        for mm, pn, key, nid, _ in self.erased:
            erased.setdefault(mm, []).append((mm, pn, key, nid))
        out: list[tuple[Process, int, bytes, int]] = []
        seen: set[Process] = set()
        want = unstable_bits(self.seqnr)
        for mm in self.walked:
            if mm in seen:
                continue
            seen.add(mm)
            mine = list(erased.get(mm, ()))
            if mm.rmap.useq == self.seqnr:
                for c, j in mm.rmap.items():
                    if c.st[j] & TREE == want:
                        key = c.ock[j]
                        mine.append((mm, c.base + j, key, self._nid_of(c, key)))
            mine.sort(key=lambda e: e[1])
            out += mine
        return out

    def _nid_of(self, c: Chunk, key: bytes) -> int:
        for nid, d in enumerate(self.dicts):
            t = d.get(key)
            if t is not None and t.chunk is c and t.seq == self.seqnr:
                return nid
        raise AssertionError("an UNSTABLE item of this scan is in no tree")

    def _go_slow(self, k: Kernel) -> None:
        ps = k.page_size
        self.trees = [RBTree() for _ in self.dicts]
        self.nodes = {}
        history: list[tuple[Process | None, int, bytes, int]] = [
            *self._history(),
            (None, -1, b"", -1),
        ]
        erases = sorted(self.erased, key=lambda e: e[4])
        pos = 0
        for index, (mm, pn, key, nid) in enumerate(history):
            while pos < len(erases) and erases[pos][4] <= index:
                gone = erases[pos]
                self.trees[gone[3]].erase(self.nodes.pop((gone[0], gone[1])))
                pos += 1
            if mm is None:
                break
            # Replay with the content each item had when inserted (its oldchecksum).
            tree = self.trees[nid]
            parent = None
            left = False
            node = tree.root
            while node is not None:
                parent = node
                left = compare(key, node.key, ps) < 0
                node = node.l if left else node.r
            new = _Node(mm, pn, key)
            self.nodes[(mm, pn)] = new
            tree.link(new, parent, left)
        for d in self.dicts:
            d.clear()
        self.slow = True

    # -- search / insert ------------------------------------------------------------------------
    def search_insert(
        self, k: Kernel, mm: Process, s: Any, c: Chunk, j: int, key: bytes, nid: int
    ) -> TreeItem | None:
        """unstable_tree_search_insert: the matching tree item and its page, else insert the
        item at index j of chunk c (of mm)."""
        if not self.slow:
            d = self.dicts[nid]
            t = d.get(key)
            if t is not None and t.seq == self.seqnr:
                tc = t.chunk
                tj = locate(t, key)
                tp = tree_page(tc.mm, tc.base + tj)
                if tp is None:
                    return None
                ts = tp[2]
                if ts.__class__ is Page and ts is s:
                    return None  # the very same page (shared with a fork)
                if not k.merge_across_nodes and _nid(tp) != nid:
                    return None
                return tc, tj, tp[0], tp[1], ts
            d[key] = ctag(c, k.seqnr)
        else:
            tree = self.trees[nid]
            ps = k.page_size
            parent = None
            left = False
            node = tree.root
            while node is not None:
                tp = tree_page(node.mm, node.pn)
                if tp is None:
                    return None  # a page gone from under the tree: stop, no insert
                ts = tp[2]
                if ts.__class__ is Page and ts is s:
                    return None
                cmp = compare(key, ts if ts.__class__ is bytes else ts.key, ps)
                parent = node
                if cmp < 0:
                    left = True
                    node = node.l
                elif cmp > 0:
                    left = False
                    node = node.r
                else:
                    if not k.merge_across_nodes and _nid(tp) != nid:
                        return None
                    return _chunk_of(node.mm, node.pn), node.pn & MASK, tp[0], tp[1], ts
            new = _Node(mm, c.base + j, key)
            self.nodes[(mm, c.base + j)] = new
            tree.link(new, parent, left)
        self.count += 1
        c.st[j] = c.st[j] & ~TREE | unstable_bits(k.seqnr)
        mm.rmap.useq = k.seqnr
        k.pages_unshared += 1
        return None


def _nid(tp: tuple[Vma, int, Any]) -> int:
    ts = tp[2]
    nid: int = ts.nid if ts.__class__ is Page else tp[0].nid
    return nid


def _root_of(node: Any) -> Any:
    while node.p is not None:
        node = node.p
    return node
