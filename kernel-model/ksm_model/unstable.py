"""The unstable tree: a dict per NUMA node while that is exact, a real rbtree when it is not.

The kernel's unstable tree is an rbtree of this scan's rmap_items ordered by the *current*
content of their pages (it is rebuilt every full scan). While no page inserted in this scan
has changed, a dict keyed by content gives exactly the kernel's result (the walk meets no gone
or modified page, and equal content is found wherever it sits). When a user operation may
change such a page mid-scan (write, munmap, MADV_DONTNEED/UNMERGEABLE, exit of an mm that
inserted pages in this scan), the model switches to a real rbtree for the rest of the scan:
it replays this scan's inserts and erases (logged in order) to rebuild the kernel's exact tree
shape, then walks it like unstable_tree_search_insert: comparing current contents, stopping at
a page that is gone or is the very same page, or on a NUMA mismatch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ksm_model.content import compare
from ksm_model.pages import KZERO, Page, RmapItem
from ksm_model.rbtree import RBTree

if TYPE_CHECKING:
    from ksm_model.kernel import Kernel
    from ksm_model.process import Process, Vma


class _Del:
    """A logged erase (inserts are logged as the rmap_item itself)."""

    __slots__ = ("item",)

    def __init__(self, item: RmapItem) -> None:
        self.item = item


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
        self.logs: list[list[Any]] = [[] for _ in range(nodes)]
        self.slow = False
        self.trees: list[RBTree] = []
        self.nodes: dict[RmapItem, _Node] = {}

    def reset(self) -> None:
        """root_unstable_tree[nid] = RB_ROOT for every node."""
        for d in self.dicts:
            d.clear()
        for log in self.logs:
            log.clear()
        self.slow = False
        self.trees = []
        self.nodes = {}

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
                self.logs[nid].append(_Del(it))
                return

    def touched(self, k: Kernel, mm: Process) -> None:
        """A user operation may have changed pages mm inserted in this scan: go exact."""
        if self.slow or k.cursor is None:
            return
        tag = mm.utag
        if tag is not None and tag.seq == k.seqnr:
            self._go_slow(k)

    def _go_slow(self, k: Kernel) -> None:
        ps = k.page_size
        self.trees = [RBTree() for _ in self.dicts]
        self.nodes = {}
        for nid, log in enumerate(self.logs):
            tree = self.trees[nid]
            for ev in log:
                if ev.__class__ is _Del:
                    tree.erase(self.nodes.pop(ev.item))
                    continue
                # Replay with the content each item had when inserted (its oldchecksum).
                key = ev.oldck
                parent = None
                left = False
                node = tree.root
                while node is not None:
                    parent = node
                    left = compare(key, node.item.oldck, ps) < 0
                    node = node.l if left else node.r
                new = _Node(ev)
                self.nodes[ev] = new
                tree.link(new, parent, left)
            log.clear()
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
            if t is not None:
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
            self.logs[nid].append(it)
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
