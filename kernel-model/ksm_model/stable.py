"""The stable tree: KSM pages ordered by content, with chains of dups (mm/ksm.c).

Faithful to stable_tree_search / stable_tree_insert / stable_node_dup / ksm_get_folio /
remove_node_from_stable_tree of 6.11+ (and of 6.1-6.8 for the dup choice, profile
chain_best_dup): every node a walk passes through is validated, stale
nodes (their KSM page was freed) are removed on the spot and the walk restarts, and every chain
on the path is pruned / collapsed / freed. That is why the tree is a real rbtree in memcmp order
(rbtree.py) and not a dict: those lazy clean-ups move stable_node_chains and stable_node_dups.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ksm_model.content import compare
from ksm_model.jiffies import NSEC_PER_SEC
from ksm_model.pages import Page
from ksm_model.rbtree import RBTree
from ksm_model.rmap import Chunk, StableRef

if TYPE_CHECKING:
    from ksm_model.kernel import Kernel


class StableNode:
    """struct ksm_stable_node: a regular node, a dup inside a chain, or a chain head."""

    __slots__ = (
        "chain",
        "dead",
        "dups",
        "in_chain",
        "key",
        "l",
        "length",
        "memo",
        "mms",
        "nid",
        "p",
        "page",
        "prune_time",
        "r",
        "red",
    )

    def __init__(self, key: bytes, nid: int, page: Page | None) -> None:
        self.p: Any = None
        self.l: Any = None
        self.r: Any = None
        self.red = False
        self.key = key
        self.nid = nid
        self.page = page
        self.chain = False
        self.dups: list[StableNode] = []  # chain only; index 0 is the hlist head
        self.prune_time = 0  # chain_prune_time, in jiffies
        self.in_chain: StableNode | None = None  # dup only: its chain
        self.length = 0  # rmap_hlist_len
        self.mms: dict[Any, int] = {}  # mm -> number of its rmap_items on this node
        self.dead = False
        # chain only: Kernel.stable_gen when a walk last found every dup live and none a
        # sharing candidate (then, until one of its dups changes, every walk finds the
        # same); -1 once touched().
        self.memo = -1


def touched(node: StableNode) -> None:
    """Dup `node` changed (its rmap_hlist_len, or its KSM page was unmapped somewhere): its
    chain's next walk must look at every dup again."""
    chain = node.in_chain
    if chain is not None:
        chain.memo = -1


def is_candidate(k: Kernel, node: StableNode, offset: int = 0) -> bool:
    """__is_page_sharing_candidate."""
    return node.length > 0 and node.length + offset < k.max_page_sharing


def remove_node(k: Kernel, node: StableNode) -> None:
    """remove_node_from_stable_tree: drop every rmap_item on it, unlink and free it.

    The rmap_items keep pointing at the dead node; the model treats an item whose node is
    dead as being in no tree (the kernel clears their STABLE flag here), with the node's
    content as its oldchecksum.
    """
    touched(node)
    if node.length:
        k.pages_shared -= 1
        k.pages_sharing -= node.length - 1
    for mm, n in node.mms.items():
        mm.ksm_merging_pages -= n
    node.mms = {}
    node.length = 0
    chain = node.in_chain
    if chain is not None:
        chain.dups.remove(node)
        node.in_chain = None
        k.stable_node_dups -= 1
    else:
        k.stable_trees[node.nid].erase(node)
    node.dead = True
    if node.page is not None and node.page.node is node:
        node.page.node = None


def get_folio(k: Kernel, node: StableNode) -> bool:
    """ksm_get_folio: True if the node's KSM page is still there, else remove the node."""
    page = node.page
    if page is not None and page.mapcount > 0:
        return True
    remove_node(k, node)
    return False


def _node_dup(
    k: Kernel, chain: StableNode, tree: RBTree, prune: bool
) -> tuple[StableNode | None, StableNode]:
    if not k.profile.chain_best_dup:
        return _node_dup_old(k, chain, tree, prune)
    return _node_dup_best(k, chain, tree, prune)


def _prune_due(k: Kernel, chain: StableNode) -> bool:
    """!time_before(jiffies, chain_prune_time + msecs_to_jiffies(prune_ms)): the chain is due a
    prune, which restarts its interval now."""
    hz = k.hz
    now = k.now_ns * hz // NSEC_PER_SEC
    if now - chain.prune_time - (k.stable_node_chains_prune_millisecs * hz + 999) // 1000 < 0:
        return False
    chain.prune_time = now
    return True


def _node_dup_old(
    k: Kernel, chain: StableNode, tree: RBTree, prune: bool
) -> tuple[StableNode | None, StableNode]:
    """stable_node_dup before 6.9 (and stable_node_dup_any after it), same contract as
    _node_dup_best. Only sharing candidates are picked; when there is none, the first live
    dup is returned to continue the walk (stable_node_dup_any), or the chain is freed when it
    has none. A chain collapses only in a pruning lookup (a search once the prune interval
    has elapsed) that found exactly one live dup, and it is a candidate.
    """
    if prune:
        prune = _prune_due(k, chain)
    found: StableNode | None = None
    found_len = 0
    live = 0
    dups = chain.dups
    i = 0
    while i < len(dups):
        dup = dups[i]
        if not get_folio(k, dup):
            continue  # the stale dup was unlinked from `dups`
        i += 1
        live += 1
        if is_candidate(k, dup) and (found is None or dup.length > found_len):
            found = dup
            found_len = dup.length
            if not prune:
                break
    if found is not None:
        if prune and live == 1:
            _collapse(k, chain, found, tree)
            return found, found
        if dups[0] is not found and is_candidate(k, found, 1):
            dups.remove(found)
            dups.insert(0, found)
        return found, chain
    # stable_node_dup_any: the walk above removed every stale dup.
    if not dups:
        tree.erase(chain)
        chain.dead = True
        k.stable_node_chains -= 1
        return None, chain
    return dups[0], chain


def _collapse(k: Kernel, chain: StableNode, found: StableNode, tree: RBTree) -> None:
    """The chain's only dup takes its place in the tree (chains -1, dups -1)."""
    tree.replace(chain, found)
    found.in_chain = None
    chain.dups = []
    chain.dead = True
    k.stable_node_chains -= 1
    k.stable_node_dups -= 1


def _node_dup_best(
    k: Kernel, chain: StableNode, tree: RBTree, prune: bool
) -> tuple[StableNode | None, StableNode]:
    """stable_node_dup: pick a dup of `chain`; may prune, collapse or free the chain.

    Returns (dup or None, node now at the chain's position). Dup choice: first sharing
    candidate in list order, or (when the prune interval has elapsed) the candidate with the
    most mappings; this only matters for later collapse/prune behaviour.
    """
    if prune:
        prune = _prune_due(k, chain)
    dups = chain.dups
    if chain.memo == k.stable_gen:
        # Nothing changed since a walk found every dup live and none a candidate: this one
        # would walk them all again and pick the first (the kernel's cost, not the model's).
        k.dups_walked += len(dups)
        return dups[0], chain
    found: StableNode | None = None
    found_len = 0
    i = 0
    while i < len(dups):
        dup = dups[i]
        k.dups_walked += 1  # bookkeeping for cost models (Kernel.dups_walked)
        if not get_folio(k, dup):
            continue  # the stale dup was unlinked from `dups` (hlist_for_each_entry_safe)
        i += 1
        if found is None or (
            is_candidate(k, dup) and (not is_candidate(k, found) or dup.length > found_len)
        ):
            found = dup
            found_len = dup.length
            if not prune and is_candidate(k, found):
                break
    if found is None:
        tree.erase(chain)
        chain.dead = True
        k.stable_node_chains -= 1
        return None, chain
    if len(dups) == 1:
        # Only one dup left: the chain collapses into it (chains -1, dups -1).
        _collapse(k, chain, found, tree)
        return found, found
    if not is_candidate(k, found):
        chain.memo = k.stable_gen  # the walk went through every dup: all live, all full
    elif dups[0] is not found and is_candidate(k, found, 1):
        dups.remove(found)
        dups.insert(0, found)
    return found, chain


def search(k: Kernel, key: bytes, nid: int) -> StableNode | None:
    """stable_tree_search for a non-KSM page: the dup to merge into, or None."""
    tree = k.stable_trees[nid]
    ps = k.page_size
    node_dup = _node_dup_best if k.profile.chain_best_dup else _node_dup_old
    while True:
        node = tree.root
        restart = False
        while node is not None:
            if node.chain:
                dup, node = node_dup(k, node, tree, True)
                if dup is None:
                    restart = True
                    break
            else:
                if not get_folio(k, node):
                    restart = True
                    break
                dup = node
            c = compare(key, node.key, ps)
            if c < 0:
                node = node.l
            elif c > 0:
                node = node.r
            else:
                return dup if is_candidate(k, dup) else None
        if not restart:
            return None


def insert(k: Kernel, page: Page) -> StableNode:
    """stable_tree_insert: a new node for KSM page `page` (a new dup if the content exists)."""
    nid = page.nid if not k.merge_across_nodes else 0
    tree = k.stable_trees[nid]
    ps = k.page_size
    while True:
        parent = None
        left = False
        node = tree.root
        restart = False
        equal = False
        while node is not None:
            if node.chain:
                dup, node = _node_dup(k, node, tree, False)
                if dup is None:
                    restart = True
                    break
            elif not get_folio(k, node):
                restart = True
                break
            c = compare(page.key, node.key, ps)
            parent = node
            if c < 0:
                left = True
                node = node.l
            elif c > 0:
                left = False
                node = node.r
            else:
                equal = True
                break
        if not restart:
            break
    new = StableNode(page.key, nid, page)
    if not equal:
        tree.link(new, parent, left)
    else:
        assert node is not None
        chain = node
        if not chain.chain:
            chain = StableNode(node.key, nid, None)
            chain.chain = True
            chain.prune_time = k.jiffies
            k.stable_node_chains += 1
            tree.replace(node, chain)
            chain.dups.insert(0, node)
            node.in_chain = chain
            k.stable_node_dups += 1
        chain.memo = -1
        chain.dups.insert(0, new)
        new.in_chain = chain
        k.stable_node_dups += 1
    page.node = new
    return new


def append(k: Kernel, c: Chunk, j: int, node: StableNode, mm: Any) -> None:
    """stable_tree_append: hang the item at index j of chunk c (of `mm`) on `node`.

    The item is in no tree: its slot holds its oldchecksum, which it keeps (rmap.py).
    """
    node.length += 1
    touched(node)
    old = c.ock[j]
    c.ock[j] = node if old == node.key else StableRef(node, old)
    if node.length > 1:
        k.pages_sharing += 1
    else:
        k.pages_shared += 1
    mm.ksm_merging_pages += 1
    node.mms[mm] = node.mms.get(mm, 0) + 1


def remove_stable_node(k: Kernel, node: StableNode) -> bool:
    """remove_stable_node: True (busy) if its KSM page is still mapped.

    get_folio() removes the node when its page is gone. The kernel's third case (the folio
    exists but is unmapped, e.g. in the swap cache: remove the node too) cannot occur here: a
    model page exists exactly while it is mapped (it is freed at mapcount 0).
    """
    return get_folio(k, node)


def remove_all(k: Kernel) -> bool:
    """remove_all_stable_nodes: False on success, True (EBUSY) if a node is still mapped.

    A busy node stops the clean-up of its tree (the kernel breaks to the next NUMA node).
    """
    busy = False
    for tree in k.stable_trees:
        while tree.root is not None:
            node = tree.root
            if not node.chain:
                if remove_stable_node(k, node):
                    busy = True
                    break
                continue
            chain_busy = False
            for dup in list(node.dups):
                if remove_stable_node(k, dup):
                    chain_busy = True
                    break
            if chain_busy:
                busy = True
                break
            tree.erase(node)
            node.dead = True
            k.stable_node_chains -= 1
    return busy
