"""Seeded random workloads on the model, with its internal bookkeeping checked after every
ksmd batch against a recount from scratch (the kernel's counters are sums over its structures:
spec section 7). Catches a counter updated on one path and forgotten on another.
"""

from __future__ import annotations

import random
from itertools import compress
from typing import Any

import pytest
from ksm_model import MADV_DONTNEED, MADV_MERGEABLE, MADV_UNMERGEABLE, Kernel, Process
from ksm_model.rmap import TREE, UNSTABLE, StableRef, locate, unstable_bits
from ksm_model.stable import StableNode

PS = 4096
INHERITED_ZERO: dict[int, int] = {}  # id(kernel) -> zero pages fork children copied uncounted


def _tree_nodes(root: Any) -> list[Any]:
    out, stack = [], [root]
    while stack:
        n = stack.pop()
        if n is None:
            continue
        assert n.l is None or n.l.p is n
        assert n.r is None or n.r.p is n
        out.append(n)
        stack += [n.l, n.r]
    return out


def _node(slot: Any) -> StableNode | None:
    """The stable node an item hangs from (its slot), None if it is not STABLE."""
    if isinstance(slot, StableRef):
        node: StableNode = slot.node
        return node
    return slot if isinstance(slot, StableNode) else None


def check(k: Kernel) -> None:
    mms: list[Process] = list(k.mm_list)
    items = []
    for mm in mms:
        rm = mm.rmap
        mine = list(rm.items())
        assert rm.keys == sorted(rm.chunks), "chunk index not sorted"
        for c in rm.chunks.values():
            assert c.mm is mm and c.n == len(c.st) - c.st.count(0)
            assert not any(compress(c.ock, (not x for x in c.st)))  # no item: slot None
        assert rm.count == len(mine)
        # A child forked without the fork reset (6.1 profile) keeps what it copied.
        assert mm.ksm_rmap_items == len(mine) + mm.inherited[0]
        items += [(mm, c.base + j, c.st[j], c.ock[j]) for c, j in mine]
    for p in k.processes:
        if not p.registered:
            assert (p.ksm_rmap_items, p.ksm_merging_pages) == p.inherited[:2]
            assert p.rmap.count == 0
    assert k.ksm_rmap_items == len(items)
    for _, _, x, slot in items:
        # An item is in one tree at most.
        assert not (x & UNSTABLE and _node(slot) is not None)
    unshared = sum(1 for _, _, x, _ in items if x & UNSTABLE)
    assert k.pages_unshared == unshared
    merging: dict[Process, int] = {}
    for mm, _, _, slot in items:
        node = _node(slot)
        if node is not None and not node.dead:
            merging[mm] = merging.get(mm, 0) + 1
    for mm in mms:
        assert mm.ksm_merging_pages == merging.get(mm, 0) + mm.inherited[1], mm
    chains = dups = shared = sharing = 0
    for tree in k.stable_trees:
        for n in _tree_nodes(tree.root):
            group = n.dups if n.chain else [n]
            chains += n.chain
            dups += len(n.dups) if n.chain else 0
            for d in group:
                assert not d.dead
                if d.length:
                    shared += 1
                    sharing += d.length - 1
                assert d.length == sum(d.mms.values())
    assert (k.stable_node_chains, k.stable_node_dups) == (chains, dups)
    assert (k.pages_shared, k.pages_sharing) == (shared, sharing)
    # Without the fork reset the global count never had a child's copied zero pages, but
    # loses them when the child drops them (so it undercounts from then on).
    lost = INHERITED_ZERO.get(id(k), 0)
    assert k.ksm_zero_pages == sum(p.ksm_zero_pages for p in k.processes) - lost
    u = k.unstable  # between scans it still holds the last scan's tree (reset at next start)
    want = unstable_bits(u.seqnr)
    current = {(mm, pn) for mm, pn, x, _ in items if x & TREE == want}
    if u.slow:
        assert set(u.nodes) == current
    else:
        live = []
        for d in u.dicts:
            for key, t in d.items():
                if u.live(t):
                    j = locate(t, key)
                    live.append((t.chunk.mm, t.chunk.base + j))
        assert len(live) == len(set(live))
        assert set(live) == current
    for tree in k.stable_trees:
        _check_rb(tree.root)
    assert k.pages_volatile == k.ksm_rmap_items - shared - sharing - unshared


def _check_rb(n: Any) -> int:
    """Red-black properties; returns the black height."""
    if n is None:
        return 1
    if n.red:
        assert not (n.l is not None and n.l.red) and not (n.r is not None and n.r.red)
    hl, hr = _check_rb(n.l), _check_rb(n.r)
    assert hl == hr
    return hl + (0 if n.red else 1)


TOKENS = [b"a", b"b", b"c", b"\0", b"u1", b"u2", b"u3"]


def fill(p: Process, addr: int, tok: bytes) -> None:
    if len(tok) == 1:
        p.fill(addr, PS, tok[0])
    else:
        p.write(addr, tok)


@pytest.mark.parametrize("seed", range(60))
def test_random_workload_bookkeeping(seed: int) -> None:
    rng = random.Random(seed)
    k = Kernel(profile=rng.choice(["6.11", "6.11", "6.1"]), numa_nodes=rng.choice([1, 2]))
    INHERITED_ZERO[id(k)] = 0
    k.sysfs.write("pages_to_scan", str(rng.choice([1, 3, 7, 50])))
    k.sysfs.write("max_page_sharing", str(rng.choice([2, 3, 256])))
    k.sysfs.write("use_zero_pages", str(rng.randint(0, 1)))
    if k.numa_nodes == 2:
        k.sysfs.write("merge_across_nodes", str(rng.randint(0, 1)))
    procs: list[tuple[Process, int, int]] = []
    for _ in range(rng.randint(1, 4)):
        p = k.spawn(name="p")
        n = rng.randint(1, 24)
        a = p.mmap(n * PS, node=rng.randrange(k.numa_nodes))
        for i in range(n):
            fill(p, a + i * PS, rng.choice(TOKENS))
        p.madvise(a, n * PS, MADV_MERGEABLE)
        procs.append((p, a, n))
    k.sysfs.write("run", "1")
    for _ in range(150):
        k.scan_pages(k.pages_to_scan)
        check(k)
        if rng.random() < 0.25 and procs:
            p, a, n = rng.choice(procs)
            r = rng.random()
            if r < 0.55:
                fill(p, a + rng.randrange(n) * PS, rng.choice(TOKENS))
            elif r < 0.65:
                p.madvise(a, n * PS, rng.choice([MADV_UNMERGEABLE, MADV_MERGEABLE]))
            elif r < 0.72:
                p.madvise(a + rng.randrange(n) * PS, PS, MADV_DONTNEED)
            elif r < 0.8 and len(procs) < 6:
                child = p.fork()
                INHERITED_ZERO[id(k)] = INHERITED_ZERO.get(id(k), 0) + child.inherited[2]
                procs.append((child, a, n))
            elif r < 0.88 and len(procs) > 1:
                procs.remove((p, a, n))
                p.exit()
            elif r < 0.92:
                k.sysfs.write("run", "2")
                k.sysfs.write("run", "1")
            elif r < 0.96 and k.profile.prctl:
                p.set_memory_merge(rng.random() < 0.5)
            else:
                k.sysfs.write("smart_scan" if k.profile.smart_scan else "run", "1")
            check(k)
