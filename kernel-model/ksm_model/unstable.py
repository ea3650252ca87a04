"""The unstable tree: a dict per NUMA node while that is exact, a real rbtree when it is not.

The kernel's unstable tree is an rbtree of this scan's rmap_items ordered by the *current*
content of their pages (it is emptied at the start of every full scan). While no page
inserted in this scan has changed, a dict keyed by content gives exactly the kernel's result:
the walk meets no gone or modified page, and equal content is found wherever it sits.

The dicts persist across scans: an entry counts only if its item was inserted in the current
scan under that key (its tag's seqnr is the current one and its oldchecksum is the key), so a
steady scan overwrites last scan's entries in place instead of rebuilding a table.

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
from ksm_model.pages import KZERO, Page, RmapItem, UTag
from ksm_model.rbtree import RBTree

if TYPE_CHECKING:
    from ksm_model.kernel import Kernel
    from ksm_model.process import Process, Vma


class _Node:
    __slots__ = ("item", "l", "p", "r", "red")

    def __init__(self, item: RmapItem) -> None:
        self.item = item
        self.p: Any = None
        self.l: Any = None
        self.r: Any = None
        self.red = False


TreePage = tuple["Process", "Vma", int, Any]


def tree_page(t: RmapItem) -> TreePage | None:
    """get_mergeable_page: (mm, vma, index, page) of a tree item, or None if it is gone."""
    tmm: Process = t.ref.mm
    if tmm.exiting:
        return None
    tv = tmm.find_vma(t.addr)
    if tv is None or not tv.mergeable or not tv.anon:
        return None
    ti = t.addr - tv.start
    ts = tv.pages[ti]
    if ts is None or ts is KZERO:
        return None
    return tmm, tv, ti, ts


class Unstable:
    """All unstable trees of a kernel (one per NUMA node)."""

    def __init__(self, nodes: int) -> None:
        self.dicts: list[dict[bytes, RmapItem]] = [{} for _ in range(nodes)]
        self.seqnr = 0  # the scan the current entries belong to
        self.count = 0  # inserts in this scan
        self.walked: list[Process] = []  # mms in the order ksmd walked them this scan
        self.erased: list[tuple[RmapItem, Process, int, int]] = []  # item, mm, nid, count
        self.slow = False
        self.trees: list[RBTree] = []
        self.nodes: dict[RmapItem, _Node] = {}

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

    def live(self, t: RmapItem | None, key: bytes) -> bool:
        """Is dict entry `t` (under `key`) in the current scan's tree?"""
        if t is None:
            return False
        ref = t.ref
        return ref.__class__ is UTag and ref.seq == self.seqnr and t.oldck == key

    # -- dict mode ----------------------------------------------------------------------------
    def erase(self, it: RmapItem, key: bytes) -> None:
        """rb_erase of an item inserted in this scan."""
        if self.slow:
            node = self.nodes.pop(it, None)
            if node is not None:
                for tree in self.trees:
                    if _root_of(node) is tree.root:
                        tree.erase(node)
                        break
            return
        for nid, d in enumerate(self.dicts):
            if d.get(key) is it:
                del d[key]
                self.erased.append((it, it.ref.mm, nid, self.count))
                return

    def touched(self, k: Kernel, mm: Process) -> None:
        """A user operation may have changed pages mm inserted in this scan: go exact."""
        if self.slow or k.cursor is None:
            return
        tag = mm.utag
        if tag is not None and tag.seq == k.seqnr:
            self._go_slow(k)

    def go_exact(self, k: Kernel) -> None:
        """Switch to the exact rbtree for the rest of this scan (a page is going into the
        tree that is not mapped where its item says)."""
        if not self.slow and k.cursor is not None:
            self._go_slow(k)

    def _history(self) -> list[tuple[RmapItem, int]]:
        """This scan's inserts in order, as (item, nid): the walk order."""
        erased: dict[Process, list[tuple[RmapItem, int]]] = {}
        for it, mm, nid, _ in self.erased:
            erased.setdefault(mm, []).append((it, nid))
        out: list[tuple[RmapItem, int]] = []
        seen: set[Process] = set()
        for mm in self.walked:
            if mm in seen:
                continue
            seen.add(mm)
            mine = list(erased.get(mm, ()))
            tag = mm.utag
            if tag is not None and tag.seq == self.seqnr:
                passed = mm.new if mm.new is not None else mm.items[: mm.r]
                for it in (*passed, *mm.items[mm.r :]):
                    if it.ref is tag:
                        mine.append((it, self._nid_of(it)))
            mine.sort(key=lambda e: e[0].addr)
            out += mine
        return out

    def _nid_of(self, it: RmapItem) -> int:
        key = it.oldck
        for nid, d in enumerate(self.dicts):
            if key is not None and d.get(key) is it:
                return nid
        raise AssertionError("an UNSTABLE item of this scan is in no tree")

    def _go_slow(self, k: Kernel) -> None:
        ps = k.page_size
        self.trees = [RBTree() for _ in self.dicts]
        self.nodes = {}
        history: list[tuple[RmapItem | None, int]] = [*self._history(), (None, -1)]
        erases = sorted(self.erased, key=lambda e: e[3])
        pos = 0
        for index, (it, nid) in enumerate(history):
            while pos < len(erases) and erases[pos][3] <= index:
                gone = erases[pos][0]
                self.trees[erases[pos][2]].erase(self.nodes.pop(gone))
                pos += 1
            if it is None:
                break
            # Replay with the content each item had when inserted (its oldchecksum).
            key = it.oldck
            assert key is not None
            tree = self.trees[nid]
            parent = None
            left = False
            node = tree.root
            while node is not None:
                parent = node
                left = compare(key, node.item.oldck, ps) < 0
                node = node.l if left else node.r
            new = _Node(it)
            self.nodes[it] = new
            tree.link(new, parent, left)
        for d in self.dicts:
            d.clear()
        self.slow = True

    # -- search / insert ------------------------------------------------------------------------
    def search_insert(
        self, k: Kernel, mm: Process, s: Any, it: RmapItem, key: bytes, nid: int
    ) -> tuple[RmapItem, TreePage] | None:
        """unstable_tree_search_insert: the matching tree item and its page, else insert it."""
        if not self.slow:
            d = self.dicts[nid]
            t = d.get(key)
            if t is not None and self.live(t, key):
                tp = tree_page(t)
                if tp is None:
                    return None
                ts = tp[3]
                if ts.__class__ is Page and ts is s:
                    return None  # the very same page (shared with a fork)
                if not k.merge_across_nodes and _nid(tp) != nid:
                    return None
                return t, tp
            d[key] = it
        else:
            tree = self.trees[nid]
            ps = k.page_size
            parent = None
            left = False
            node = tree.root
            while node is not None:
                t = node.item
                tp = tree_page(t)
                if tp is None:
                    return None  # a page gone from under the tree: stop, no insert
                ts = tp[3]
                if ts.__class__ is Page and ts is s:
                    return None
                c = compare(key, ts if ts.__class__ is bytes else ts.key, ps)
                parent = node
                if c < 0:
                    left = True
                    node = node.l
                elif c > 0:
                    left = False
                    node = node.r
                else:
                    if not k.merge_across_nodes and _nid(tp) != nid:
                        return None
                    return t, tp
            new = _Node(it)
            self.nodes[it] = new
            tree.link(new, parent, left)
        self.count += 1
        it.ref = k.utag(mm)
        k.pages_unshared += 1
        return None


def _nid(tp: TreePage) -> int:
    ts = tp[3]
    nid: int = ts.nid if ts.__class__ is Page else tp[1].nid
    return nid


def _root_of(node: Any) -> Any:
    while node.p is not None:
        node = node.p
    return node
