"""A red-black tree with the Linux lib/rbtree.c algorithms (insert, erase, replace).

KSM's stable tree is an rbtree ordered by page content, and which nodes a search walks
through is observable: every chain or stale node on the path is pruned, collapsed or freed
(mm/ksm.c chain_prune/ksm_get_folio), which moves stable_node_chains/stable_node_dups. So the
model keeps the real tree shape: the same rotations as the kernel for the same operation
sequence. Nodes carry the fields ``p`` (parent), ``l``, ``r`` and ``red``.
"""

from __future__ import annotations

from typing import Any


class RBTree:
    """Root holder; nodes are any objects with p/l/r/red attributes."""

    __slots__ = ("root",)

    def __init__(self) -> None:
        self.root: Any = None

    # -- helpers ----------------------------------------------------------------------------
    def _change_child(self, old: Any, new: Any, parent: Any) -> None:
        if parent is None:
            self.root = new
        elif parent.l is old:
            parent.l = new
        else:
            parent.r = new

    def _rotate_left(self, x: Any) -> None:
        y = x.r
        x.r = y.l
        if y.l is not None:
            y.l.p = x
        y.p = x.p
        self._change_child(x, y, x.p)
        y.l = x
        x.p = y

    def _rotate_right(self, x: Any) -> None:
        y = x.l
        x.l = y.r
        if y.r is not None:
            y.r.p = x
        y.p = x.p
        self._change_child(x, y, x.p)
        y.r = x
        x.p = y

    # -- insert -----------------------------------------------------------------------------
    def link(self, node: Any, parent: Any, left: bool) -> None:
        """rb_link_node + rb_insert_color: attach `node` as a child of `parent`."""
        node.p = parent
        node.l = node.r = None
        node.red = True
        if parent is None:
            self.root = node
        elif left:
            parent.l = node
        else:
            parent.r = node
        self._insert_color(node)

    def _insert_color(self, z: Any) -> None:
        while z.p is not None and z.p.red:
            p = z.p
            g = p.p
            if p is g.l:
                u = g.r
                if u is not None and u.red:
                    p.red = False
                    u.red = False
                    g.red = True
                    z = g
                    continue
                if z is p.r:
                    z = p
                    self._rotate_left(z)
                    p = z.p
                p.red = False
                g.red = True
                self._rotate_right(g)
            else:
                u = g.l
                if u is not None and u.red:
                    p.red = False
                    u.red = False
                    g.red = True
                    z = g
                    continue
                if z is p.l:
                    z = p
                    self._rotate_right(z)
                    p = z.p
                p.red = False
                g.red = True
                self._rotate_left(g)
        self.root.red = False

    # -- replace ----------------------------------------------------------------------------
    def replace(self, victim: Any, new: Any) -> None:
        """rb_replace_node: `new` takes `victim`'s place, links and colour."""
        new.p, new.l, new.r, new.red = victim.p, victim.l, victim.r, victim.red
        if victim.l is not None:
            victim.l.p = new
        if victim.r is not None:
            victim.r.p = new
        self._change_child(victim, new, victim.p)
        victim.p = victim.l = victim.r = None

    # -- erase ------------------------------------------------------------------------------
    def erase(self, node: Any) -> None:
        """rb_erase: splice out, or replace by the in-order successor, then rebalance."""
        left, right = node.l, node.r
        rebalance: Any = None
        if left is None or right is None:
            child = right if left is None else left
            parent = node.p
            self._change_child(node, child, parent)
            if child is not None:
                child.p = parent
                child.red = False  # a lone child is red; it takes node's (black) colour
            elif not node.red:
                rebalance = parent
        else:
            succ = right
            while succ.l is not None:
                succ = succ.l
            child2 = succ.r
            if succ is right:
                parent = succ
            else:
                parent = succ.p
                parent.l = child2
                succ.r = right
                right.p = succ
            succ.l = left
            left.p = succ
            was_red = succ.red
            succ.red = node.red
            succ.p = node.p
            self._change_child(node, succ, node.p)
            if child2 is not None:
                child2.p = parent
                child2.red = False
            elif not was_red:
                rebalance = parent
        node.p = node.l = node.r = None
        if rebalance is not None:
            self._erase_color(rebalance)

    def _erase_color(self, parent: Any) -> None:
        node: Any = None
        while parent is not None and (node is None or not node.red):
            if node is not parent.r:
                w = parent.r
                if w.red:
                    w.red = False
                    parent.red = True
                    self._rotate_left(parent)
                    w = parent.r
                if (w.l is None or not w.l.red) and (w.r is None or not w.r.red):
                    w.red = True
                    node = parent
                    parent = node.p
                    continue
                if w.r is None or not w.r.red:
                    w.l.red = False
                    w.red = True
                    self._rotate_right(w)
                    w = parent.r
                w.red = parent.red
                parent.red = False
                w.r.red = False
                self._rotate_left(parent)
                node = self.root
                break
            w = parent.l
            if w.red:
                w.red = False
                parent.red = True
                self._rotate_right(parent)
                w = parent.l
            if (w.l is None or not w.l.red) and (w.r is None or not w.r.red):
                w.red = True
                node = parent
                parent = node.p
                continue
            if w.l is None or not w.l.red:
                w.r.red = False
                w.red = True
                self._rotate_left(w)
                w = parent.l
            w.red = parent.red
            parent.red = False
            w.l.red = False
            self._rotate_right(parent)
            node = self.root
            break
        if node is not None:
            node.red = False
