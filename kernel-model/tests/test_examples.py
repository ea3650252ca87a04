"""Every worked example of ksm-model-spec.md section 15, counter for counter.

Common setup (spec 15): each process writes its buffer completely, then madvise(MERGEABLE)
on exactly that buffer; processes register in order P1, P2, P3 while ksmd is idle, then run=1.
Counters are read right after the F-th full scan (run_until stops exactly there).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from ksm_model import MADV_MERGEABLE, MADV_UNMERGEABLE, Kernel, Process

PS = 4096
Fill = Callable[[Process, int, int, int], None]
NAMES = (
    "pages_shared",
    "pages_sharing",
    "pages_unshared",
    "pages_volatile",
    "stable_node_chains",
    "stable_node_dups",
    "pages_scanned",
    "pages_skipped",
    "ksm_zero_pages",
    "general_profit",
    "full_scans",
)


def fill_a(p: Process, addr: int, proc: int, page: int) -> None:
    p.fill(addr, PS, ord("a"))


def fill_index(p: Process, addr: int, proc: int, page: int) -> None:
    """Content unique to the page index, the same in every process."""
    p.write(addr, b"idx" + page.to_bytes(4, "little"))


def build(k: Kernel, nprocs: int, npages: int, fill: Fill) -> list[tuple[Process, int]]:
    out = []
    for j in range(nprocs):
        p = k.spawn(name=f"P{j + 1}")
        a = p.mmap(npages * PS)
        for i in range(npages):
            fill(p, a + i * PS, j, i)
        p.madvise(a, npages * PS, MADV_MERGEABLE)
        out.append((p, a))
    return out


def at(k: Kernel, f: int) -> dict[str, int]:
    k.run_until(full_scans=f)
    c = k.counters()
    return {n: c[n] for n in NAMES if n in c}


def stat(p: Process) -> tuple[int | bool, ...]:
    s = p.ksm_stat()
    return tuple(s.values())


def test_example1_three_procs_100_identical() -> None:
    k = Kernel()
    procs = build(k, 3, 100, fill_a)
    k.sysfs.write("run", "1")
    assert at(k, 1) == dict(
        pages_shared=0,
        pages_sharing=0,
        pages_unshared=0,
        pages_volatile=300,
        stable_node_chains=0,
        stable_node_dups=0,
        pages_scanned=300,
        pages_skipped=0,
        ksm_zero_pages=0,
        general_profit=-19200,
        full_scans=1,
    )
    assert at(k, 2) == dict(
        pages_shared=2,
        pages_sharing=298,
        pages_unshared=0,
        pages_volatile=0,
        stable_node_chains=1,
        stable_node_dups=2,
        pages_scanned=600,
        pages_skipped=0,
        ksm_zero_pages=0,
        general_profit=1201408,
        full_scans=2,
    )
    for p, _ in procs:
        assert p.ksm_stat() == dict(
            ksm_rmap_items=100,
            ksm_zero_pages=0,
            ksm_merging_pages=100,
            ksm_process_profit=403200,
            ksm_merge_any=False,
            ksm_mergeable=True,
        )
    for f in (3, 4, 5):  # F >= 3: same, pages_scanned +300 per scan, KSM pages never skipped
        c = at(k, f)
        assert (c["pages_shared"], c["pages_sharing"], c["pages_scanned"], c["pages_skipped"]) == (
            2,
            298,
            300 * f,
            0,
        )


def test_example1_variant_n50() -> None:
    k = Kernel()
    procs = build(k, 3, 50, fill_a)
    k.sysfs.write("run", "1")
    c = at(k, 2)
    assert (
        c["pages_shared"],
        c["pages_sharing"],
        c["stable_node_chains"],
        c["stable_node_dups"],
        c["general_profit"],
    ) == (1, 149, 0, 0, 600704)
    for p, _ in procs:
        assert p.ksm_stat()["ksm_merging_pages"] == 50
        assert p.ksm_stat()["ksm_process_profit"] == 201600


def test_example2_groups_of_three() -> None:
    n = 20
    k = Kernel()
    procs = build(k, 3, n, fill_index)
    k.sysfs.write("run", "1")
    c = at(k, 2)
    assert (
        c["pages_shared"],
        c["pages_sharing"],
        c["pages_unshared"],
        c["pages_volatile"],
        c["stable_node_chains"],
        c["stable_node_dups"],
    ) == (n, 2 * n, 0, 0, 0, 0)
    assert c["general_profit"] == 2 * n * 4096 - 3 * n * 64
    for p, _ in procs:
        assert p.ksm_stat()["ksm_merging_pages"] == n
        assert p.ksm_stat()["ksm_rmap_items"] == n


def test_example3_max_page_sharing_2_k12() -> None:
    k = Kernel()
    build(k, 3, 4, fill_a)
    k.sysfs.write("max_page_sharing", "2")
    k.sysfs.write("run", "1")
    c = at(k, 2)
    assert (
        c["pages_shared"],
        c["pages_sharing"],
        c["pages_unshared"],
        c["pages_volatile"],
        c["stable_node_chains"],
        c["stable_node_dups"],
    ) == (6, 6, 0, 0, 1, 6)


def test_example3_max_page_sharing_2_k9_leftover_cycles() -> None:
    k = Kernel()
    build(k, 3, 3, fill_a)
    k.sysfs.write("max_page_sharing", "2")
    k.sysfs.write("run", "1")
    c = at(k, 2)
    assert (
        c["pages_shared"],
        c["pages_sharing"],
        c["pages_unshared"],
        c["stable_node_chains"],
        c["stable_node_dups"],
    ) == (4, 4, 1, 1, 4)
    # The leftover shows as unshared at F = 2, 3, 4, 6, 9, 14, 23 and volatile otherwise.
    unshared_at = {2, 3, 4, 6, 9, 14, 23, 32}
    for f in range(2, 33):
        c = at(k, f)
        want = (1, 0) if f in unshared_at else (0, 1)
        assert (c["pages_unshared"], c["pages_volatile"]) == want, f


EX4 = {  # F: (unshared, volatile, scanned, skipped) in multiples of N (spec table)
    1: (0, 1, 1, 0),
    2: (1, 0, 2, 0),
    3: (1, 0, 3, 0),
    4: (1, 0, 4, 0),
    5: (0, 1, 4, 1),
    6: (1, 0, 5, 1),
    7: (0, 1, 5, 2),
    8: (0, 1, 5, 3),
    9: (1, 0, 6, 3),
    10: (0, 1, 6, 4),
    11: (0, 1, 6, 5),
    12: (0, 1, 6, 6),
    13: (0, 1, 6, 7),
    14: (1, 0, 7, 7),
    15: (0, 1, 7, 8),
    22: (0, 1, 7, 15),
    23: (1, 0, 8, 15),
    32: (1, 0, 9, 23),
}


def test_example4_distinct_pages_smart_scan() -> None:
    n = 16
    k = Kernel()
    build(k, 1, n, fill_index)
    k.sysfs.write("run", "1")
    for f in sorted(EX4):
        c = at(k, f)
        got = (c["pages_unshared"], c["pages_volatile"], c["pages_scanned"], c["pages_skipped"])
        assert got == tuple(x * n for x in EX4[f]), f
        assert c["general_profit"] == -n * 64


def test_example4_smart_scan_off() -> None:
    n = 8
    k = Kernel()
    build(k, 1, n, fill_index)
    k.sysfs.write("smart_scan", "0")
    k.sysfs.write("run", "1")
    for f in range(2, 12):
        c = at(k, f)
        assert (c["pages_unshared"], c["pages_scanned"], c["pages_skipped"]) == (n, f * n, 0)


def test_example5_use_zero_pages() -> None:
    n = 12
    k = Kernel()
    ((p, a),) = build(k, 1, n, lambda p, a, j, i: p.fill(a, PS, 0))
    k.sysfs.write("use_zero_pages", "1")
    k.sysfs.write("run", "1")
    c = at(k, 1)
    assert (c["pages_volatile"], c["ksm_zero_pages"]) == (n, 0)
    c = at(k, 2)
    assert (c["ksm_zero_pages"], c["pages_shared"], c["pages_sharing"], c["pages_volatile"]) == (
        n,
        0,
        0,
        n,
    )
    assert c["general_profit"] == n * 4096 - n * 64
    assert stat(p) == (n, n, 0, n * 4096 - n * 64, False, True)
    c = at(k, 3)
    assert (c["pages_volatile"], c["general_profit"], c["pages_scanned"]) == (0, n * 4096, 2 * n)
    assert p.ksm_stat()["ksm_rmap_items"] == 0
    assert p.ksm_stat()["ksm_process_profit"] == n * 4096
    # Every later batch completes a (empty) full scan.
    assert k.scan_pages(100) == 0 and k.full_scans == 4
    # Writing non-zero data to k pages drops ksm_zero_pages at once.
    p.write(a, b"x")
    p.write(a + 5 * PS + 7, b"y")
    assert k.counters()["ksm_zero_pages"] == n - 2
    assert p.ksm_stat()["ksm_zero_pages"] == n - 2
    assert p.read(a, 2) == b"x\0"


def test_example5_without_zero_pages_is_one_ksm_page() -> None:
    n = 12
    k = Kernel()
    build(k, 1, n, lambda p, a, j, i: p.fill(a, PS, 0))
    k.sysfs.write("run", "1")
    c = at(k, 2)
    assert (c["pages_shared"], c["pages_sharing"], c["ksm_zero_pages"]) == (1, n - 1, 0)


def test_example6_cow_after_merge() -> None:
    k = Kernel()
    (p1, a1), (p2, a2) = build(k, 2, 1, fill_a)
    k.sysfs.write("run", "1")
    c = at(k, 2)
    assert (c["pages_shared"], c["pages_sharing"]) == (1, 1)
    p2.fill(a2, PS, ord("b"))
    assert k.cow_ksm == 1
    assert k.counters()["pages_sharing"] == 1  # counters are not touched at COW time
    c = at(k, 3)
    assert (c["pages_shared"], c["pages_sharing"], c["pages_unshared"], c["pages_volatile"]) == (
        1,
        0,
        0,
        1,
    )
    c = at(k, 4)
    assert (c["pages_shared"], c["pages_sharing"], c["pages_unshared"]) == (1, 0, 1)
    c = at(k, 5)  # smart scan: P2's page (age 4) is skipped
    assert (c["pages_unshared"], c["pages_volatile"], c["pages_skipped"]) == (0, 1, 1)
    p1.fill(a1, PS, ord("c"))  # the KSM page is freed; the node is stale
    c = at(k, 6)
    assert c["pages_shared"] == 0
    assert p1.read(a1, 1) == b"c" and p2.read(a2, 1) == b"b"


def test_example7_run2_after_example1() -> None:
    k = Kernel()
    procs = build(k, 3, 100, fill_a)
    k.sysfs.write("run", "1")
    at(k, 2)
    k.sysfs.write("run", "2")
    assert k.counters() == dict(
        pages_shared=0,
        pages_sharing=0,
        pages_unshared=0,
        pages_volatile=0,
        full_scans=0,
        stable_node_chains=0,
        stable_node_dups=0,
        pages_scanned=600,
        pages_skipped=0,
        ksm_zero_pages=0,
        general_profit=0,
    )
    for p, a in procs:
        assert stat(p) == (0, 0, 0, 0, False, True)
        assert p.read(a + 99 * PS, 3) == b"aaa"
    k.sysfs.write("run", "1")
    assert at(k, 1)["pages_volatile"] == 300
    c = at(k, 2)
    assert (
        c["pages_shared"],
        c["pages_sharing"],
        c["stable_node_chains"],
        c["stable_node_dups"],
        c["general_profit"],
    ) == (2, 298, 1, 2, 1201408)


def test_example8_unmergeable_in_example2() -> None:
    n = 10
    k = Kernel()
    procs = build(k, 3, n, fill_index)
    k.sysfs.write("run", "1")
    at(k, 2)
    p2, a2 = procs[1]
    p2.madvise(a2, n * PS, MADV_UNMERGEABLE)
    c = k.counters()
    assert (c["pages_shared"], c["pages_sharing"]) == (n, 2 * n)  # not touched yet
    c = at(k, 3)
    assert (c["pages_shared"], c["pages_sharing"], c["pages_unshared"]) == (n, n, 0)
    assert stat(p2) == (0, 0, 0, 0, False, False)
    assert p2 not in k.mm_list


def test_example9_fork_after_merge() -> None:
    n = 100
    k = Kernel()
    ((p, _),) = build(k, 1, n, fill_a)
    k.sysfs.write("run", "1")
    c = at(k, 2)
    assert (c["pages_shared"], c["pages_sharing"]) == (1, n - 1)
    child = p.fork()
    assert (k.counters()["pages_sharing"], child.ksm_stat()["ksm_rmap_items"]) == (n - 1, 0)
    c = at(k, 3)
    assert (c["pages_shared"], c["pages_sharing"]) == (1, 2 * n - 1)
    assert c["general_profit"] == (2 * n - 1) * 4096 - 2 * n * 64
    assert child.ksm_stat()["ksm_merging_pages"] == n


def test_example10_exit_after_example1() -> None:
    k = Kernel()
    procs = build(k, 3, 100, fill_a)
    k.sysfs.write("run", "1")
    at(k, 2)
    p3 = procs[2][0]
    p3.exit()
    assert k.mm_list[0] is p3  # moved right after the cursor (the head)
    c = at(k, 3)
    assert (
        c["pages_shared"],
        c["pages_sharing"],
        c["stable_node_chains"],
        c["stable_node_dups"],
    ) == (1, 199, 1, 1)
    assert k.counters()["general_profit"] == 199 * 4096 - 200 * 64
    # Chain bookkeeping is lazy: a later stable-tree walk (a non-KSM page with a stable
    # checksum, here P4's 'b' page on its 2nd visit) passes the chain and collapses it.
    p4 = k.spawn(name="P4")
    a4 = p4.mmap(PS)
    p4.fill(a4, PS, ord("b"))
    p4.madvise(a4, PS, MADV_MERGEABLE)
    c = at(k, 4)
    assert (c["stable_node_chains"], c["stable_node_dups"], c["pages_volatile"]) == (1, 1, 1)
    c = at(k, 5)
    assert (c["stable_node_chains"], c["stable_node_dups"], c["pages_unshared"]) == (0, 0, 1)


def test_example10_last_mm_exit_completes_a_scan() -> None:
    k = Kernel()
    ((p, _),) = build(k, 1, 4, fill_a)
    k.sysfs.write("run", "1")
    at(k, 2)
    p.exit()
    assert k.scan_pages(100) == 0
    assert (k.full_scans, k.counters()["pages_sharing"], k.mm_list) == (3, 0, [])
    assert k.counters()["pages_volatile"] == 0


@pytest.mark.parametrize(("profile", "f3"), [("6.1", (1, 2, 0)), ("6.11", (1, 1, 1))])
def test_example11_late_joiner(profile: str, f3: tuple[int, int, int]) -> None:
    k = Kernel(profile=profile)
    build(k, 2, 1, fill_a)
    k.sysfs.write("run", "1")
    k.run_until(full_scans=2)
    p3 = k.spawn(name="P3")
    a = p3.mmap(PS)
    p3.fill(a, PS, ord("a"))
    p3.madvise(a, PS, MADV_MERGEABLE)
    k.run_until(full_scans=3)
    c = k.counters()
    assert (c["pages_shared"], c["pages_sharing"], c["pages_volatile"]) == f3
    k.run_until(full_scans=4)
    assert k.counters()["pages_sharing"] == 2
