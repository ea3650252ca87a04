"""Operations between ksmd batches, in the middle of a full scan.

The expected rows were measured on the real 6.18 kernel by stepping ksmd one batch at a time
(sleep_millisecs set huge, then toggled: each change ends the sleep and ksmd runs exactly one
batch) with the same processes, and reading every counter between batches.
"""

from __future__ import annotations

from ksm_model import MADV_MERGEABLE, Kernel, Process

PS = 4096


def put(p: Process, a: int, i: int, token: str) -> None:
    if token.startswith("u"):
        p.write(a + i * PS, token.encode() + bytes(PS - len(token)))
    else:
        p.fill(a + i * PS, PS, ord(token))


def test_unstable_tree_pages_written_mid_scan() -> None:
    # P1 and P2 hold u1..u4, pages_to_scan 2, smart_scan 0. In scan 2, P1's pages already in
    # the unstable tree are rewritten before P2 is reached ('k' over u1, then u3 over u2), and
    # P2's u3 page later: the walk compares current contents through a corrupted tree.
    k = Kernel()
    k.sysfs.write("pages_to_scan", "2")
    k.sysfs.write("smart_scan", "0")
    procs: dict[str, tuple[Process, int]] = {}
    for name in ("P1", "P2"):
        p = k.spawn(name=name)
        a = p.mmap(4 * PS)
        for i, t in enumerate(("u1", "u2", "u3", "u4")):
            put(p, a, i, t)
        p.madvise(a, 4 * PS, MADV_MERGEABLE)
        procs[name] = (p, a)
    events = {6: [("P1", 0, "k")], 7: [("P1", 1, "u3")], 11: [("P2", 2, "k")]}
    # batch: (full_scans, shared, sharing, unshared, volatile) after the batch (kernel values)
    want = [
        (0, 0, 0, 0, 2),
        (0, 0, 0, 0, 4),
        (0, 0, 0, 0, 6),
        (0, 0, 0, 0, 8),
        (1, 0, 0, 0, 8),
        (1, 0, 0, 2, 6),
        (1, 0, 0, 4, 4),
        (1, 0, 0, 6, 2),
        (1, 2, 2, 4, 0),
        (2, 2, 2, 4, 0),
        (2, 2, 2, 3, 1),
        (2, 2, 3, 2, 1),
        (2, 2, 3, 2, 1),
        (2, 2, 2, 2, 2),
        (3, 2, 2, 2, 2),
        (3, 2, 2, 3, 1),
    ]
    k.sysfs.write("run", "1")
    got = []
    for batch in range(len(want)):
        for name, i, t in events.get(batch, []):
            put(*procs[name], i, t)
        k.scan_pages(2)
        c = k.counters()
        got.append(
            (
                c["full_scans"],
                c["pages_shared"],
                c["pages_sharing"],
                c["pages_unshared"],
                c["pages_volatile"],
            )
        )
    assert got == want


def test_registration_mid_scan_goes_before_the_cursor() -> None:
    # Spec 3: a slot registered while the cursor is inside P1 is inserted just before P1, so
    # it is first visited in the next full scan. P2 (2 pages) registers after batch 1.
    k = Kernel()
    k.sysfs.write("pages_to_scan", "2")
    p1 = k.spawn(name="P1")
    a1 = p1.mmap(6 * PS)
    p1.fill(a1, 6 * PS, 1)
    p1.madvise(a1, 6 * PS, MADV_MERGEABLE)
    k.sysfs.write("run", "1")
    assert k.scan_pages(2) == 2
    p2 = k.spawn(name="P2")
    a2 = p2.mmap(2 * PS)
    p2.fill(a2, 2 * PS, 2)
    p2.madvise(a2, 2 * PS, MADV_MERGEABLE)
    assert k.mm_list == [p2, p1]
    k.run_until(full_scans=1)
    assert (k.counters()["pages_scanned"], p2.ksm_stat()["ksm_rmap_items"]) == (6, 0)
    k.run_until(full_scans=2)
    assert (k.counters()["pages_scanned"], p2.ksm_stat()["ksm_rmap_items"]) == (14, 2)


def test_exit_of_the_cursor_mm_mid_scan() -> None:
    # Spec 3: the cursor's own mm is not moved; ksmd notices it exiting at its next batch,
    # frees all its rmap_items and the slot (full_scans +1 since it was the only one).
    k = Kernel()
    k.sysfs.write("pages_to_scan", "2")
    p = k.spawn(name="P")
    a = p.mmap(4 * PS)
    p.fill(a, 4 * PS, 1)
    p.madvise(a, 4 * PS, MADV_MERGEABLE)
    k.sysfs.write("run", "1")
    k.scan_pages(2)
    p.exit()
    assert k.counters()["pages_volatile"] == 2
    assert k.scan_pages(2) == 0
    c = k.counters()
    assert (c["full_scans"], c["pages_volatile"], k.mm_list) == (1, 0, [])


def test_page_allocated_mid_scan_cannot_merge_until_next_scan() -> None:
    # P1 [ux3, ux5], P2 [ux3], pages_to_scan 1, smart_scan 0: the ux3 pair merges in scan 2.
    # In scan 3, after ksmd passed P1's first page, P2 writes the same bytes over its KSM
    # page: copy-on-write gives it a new page, still in a per-CPU LRU batch, so when ksmd
    # reaches it write_protect_page() fails: the item is dropped from the node (sharing 0) and
    # stays volatile; lru_add_drain_all() at the start of scan 4 lets it merge again.
    # Measured on 6.18 batch by batch: (shared, sharing, unshared, volatile) below.
    k = Kernel()
    k.sysfs.write("pages_to_scan", "1")
    k.sysfs.write("smart_scan", "0")
    procs: dict[str, tuple[Process, int]] = {}
    for name, toks in (("P1", ("ux3", "ux5")), ("P2", ("ux3",))):
        p = k.spawn(name=name)
        a = p.mmap(len(toks) * PS)
        for i, t in enumerate(toks):
            put(p, a, i, t)
        p.madvise(a, len(toks) * PS, MADV_MERGEABLE)
        procs[name] = (p, a)
    k.sysfs.write("run", "1")
    got = {}
    for batch in range(16):
        if batch == 9:
            put(*procs["P2"], 0, "ux3")
        k.scan_pages(1)
        c = k.counters()
        got[batch] = (
            c["pages_shared"],
            c["pages_sharing"],
            c["pages_unshared"],
            c["pages_volatile"],
        )
    assert [got[b] for b in (8, 9, 10, 11, 13, 14, 15)] == [
        (1, 1, 1, 0),
        (1, 1, 1, 0),
        (1, 0, 1, 1),
        (1, 0, 1, 1),
        (1, 0, 1, 1),
        (1, 1, 1, 0),
        (1, 1, 1, 0),
    ]
