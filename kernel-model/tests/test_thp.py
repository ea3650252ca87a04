"""Transparent huge pages in the model.

The expected rows were measured on the real 6.18 kernel (HZ 250, THP madvise) with the same
processes: an aligned MADV_HUGEPAGE buffer written page by page, MADV_MERGEABLE, run=1, counters
read frozen at the end of each full scan (harness.scenario.kernel_runner). Each row is
(full_scans, shared, sharing, unshared, volatile, rmap_items of p1, AnonHugePages kB of p1).
"""

from __future__ import annotations

import pytest
from ksm_model import MADV_HUGEPAGE, MADV_MERGEABLE, MADV_NOHUGEPAGE, Kernel, Process

PS = 4096
HP = 512  # pages per huge page


def spawn(k: Kernel, tokens: list[str], huge: bool = True, name: str = "p1") -> tuple[Process, int]:
    p = k.spawn(name=name)
    a = p.mmap(len(tokens) * PS, align=HP * PS)
    p.madvise(a, len(tokens) * PS, MADV_HUGEPAGE if huge else MADV_NOHUGEPAGE)
    for i, t in enumerate(tokens):
        if t.startswith("u"):
            p.write(a + i * PS, t.encode() + bytes(PS - len(t)))
        else:
            p.fill(a + i * PS, PS, 0 if t == "0" else ord(t))
    p.madvise(a, len(tokens) * PS, MADV_MERGEABLE)
    return p, a


def rows(k: Kernel, p: Process, scans: int) -> list[tuple[int, ...]]:
    k.sysfs.write("run", "1")
    out = []
    for f in range(1, scans + 1):
        k.run_until(full_scans=f)
        c = k.counters()
        out.append(
            (
                f,
                c["pages_shared"],
                c["pages_sharing"],
                c["pages_unshared"],
                c["pages_volatile"],
                p.ksm_stat()["ksm_rmap_items"],
                p.anon_huge_bytes() >> 10,
            )
        )
    return out


def test_huge_page_of_identical_pages_merges_a_scan_late() -> None:
    # Scan 2: page 0 goes into the unstable tree, page 1 matches it in the same huge page:
    # split_huge_page fails for ksmd's reference on page 0, so no merge, and the page is
    # split right after; page 2 then merges with page 0 and the rest append. Page 1 merges
    # in scan 3 (shared 2: max_page_sharing 256 makes a chain of two dups).
    k = Kernel(profile="6.12")
    p, _ = spawn(k, ["a"] * HP)
    assert p.anon_huge_bytes() == 2 << 20
    assert rows(k, p, 3) == [
        (1, 0, 0, 0, 512, 512, 2048),
        (2, 2, 509, 0, 1, 512, 0),
        (3, 2, 510, 0, 0, 512, 0),
    ]


def test_half_identical_half_unique() -> None:
    k = Kernel(profile="6.12")
    p, _ = spawn(k, ["a"] * 256 + [f"u{i}" for i in range(256)])
    assert rows(k, p, 3) == [
        (1, 0, 0, 0, 512, 512, 2048),
        (2, 1, 254, 256, 1, 512, 0),
        (3, 1, 255, 256, 0, 512, 0),
    ]


def test_zero_filled_head_blocks_the_unstable_tree() -> None:
    # 6.12+: the split maps every zero-filled subpage to the shared zero page, the one in
    # the unstable tree too; every later walk stops there, so the 'a' pages wait a scan.
    k = Kernel(profile="6.12")
    p, _ = spawn(k, ["0"] * 256 + ["a"] * 256)
    assert rows(k, p, 3) == [
        (1, 0, 0, 0, 512, 512, 2048),
        (2, 0, 0, 1, 257, 258, 0),
        (3, 1, 255, 0, 0, 256, 0),
    ]


def test_zero_filled_head_with_use_zero_pages() -> None:
    # The zero-page merge splits the huge page, which takes the page itself away: the merge
    # fails and the page (unmapped) still goes into the unstable tree. No KSM zero page.
    k = Kernel(profile="6.12")
    k.sysfs.write("use_zero_pages", "1")
    p, _ = spawn(k, ["0"] * 256 + ["a"] * 256)
    assert rows(k, p, 3) == [
        (1, 0, 0, 0, 512, 512, 2048),
        (2, 0, 0, 1, 256, 257, 0),
        (3, 1, 255, 0, 0, 256, 0),
    ]
    assert k.counters()["ksm_zero_pages"] == 0


def test_zero_filled_tail_and_small_zero_pages() -> None:
    k = Kernel(profile="6.12")
    p, _ = spawn(k, ["a"] * 256 + ["0"] * 256)
    q, _ = spawn(k, ["0"] * 8, huge=False, name="p2")
    assert rows(k, p, 3) == [
        (1, 0, 0, 0, 520, 512, 2048),
        (2, 2, 261, 0, 1, 256, 0),
        (3, 2, 262, 0, 0, 256, 0),
    ]
    assert q.ksm_stat()["ksm_merging_pages"] == 8


def test_before_6_12_a_split_keeps_zero_subpages() -> None:
    # Without the remap the zero-filled subpages stay ordinary pages and merge like any
    # (derived from the code, not measured: this host runs 6.18). Scan 2: page 1 fails and
    # splits as above; pages 2..255 join page 0 (255 zero pages), the 'a' pages pair up.
    k = Kernel(profile="6.11")
    p, _ = spawn(k, ["0"] * 256 + ["a"] * 256)
    assert rows(k, p, 3) == [
        (1, 0, 0, 0, 512, 512, 2048),
        (2, 2, 509, 0, 1, 512, 0),
        (3, 2, 510, 0, 0, 512, 0),
    ]


def test_two_huge_pages_merge_across_in_one_scan() -> None:
    # Pages of different huge pages: each split succeeds at once, nothing waits.
    k = Kernel(profile="6.12")
    u = [f"u{i}" for i in range(HP)]
    p, _ = spawn(k, u)
    spawn(k, u, name="p2")
    assert rows(k, p, 2)[1] == (2, 512, 512, 0, 0, 512, 0)


def test_writes_to_split_and_unsplit_huge_pages() -> None:
    k = Kernel(profile="6.12")
    p1, a1 = spawn(k, [f"u{i}" for i in range(HP)])
    p2, a2 = spawn(k, ["a"] * HP, name="p2")
    assert rows(k, p1, 2)[1] == (2, 2, 509, 512, 1, 512, 2048)
    p1.fill(a1 + 5 * PS, PS, ord("b"))  # in place: the huge page stays
    p2.fill(a2 + 3 * PS, 2 * PS, ord("c"))  # copy-on-write of two KSM pages
    assert p1.anon_huge_bytes() == 2 << 20
    assert k.cow_ksm == 2
    assert rows(k, p1, 5)[2:] == [
        (3, 2, 508, 511, 3, 512, 2048),
        (4, 3, 509, 512, 0, 512, 2048),
        (5, 3, 509, 0, 512, 512, 2048),
    ]


def test_fork_shares_the_huge_page_and_cow_splits_only_the_writers_pmd() -> None:
    k = Kernel(profile="6.12")
    p, a = spawn(k, [f"u{i}" for i in range(HP)])
    k.sysfs.write("run", "1")
    k.run_until(full_scans=1)
    c = p.fork(name="c1")
    c.write(a + 7 * PS, b"u3" + bytes(PS - 2))
    assert (p.anon_huge_bytes(), c.anon_huge_bytes()) == (2 << 20, 0)
    k.run_until(full_scans=3)
    cnt = k.counters()
    assert (cnt["pages_shared"], cnt["pages_sharing"], cnt["pages_unshared"]) == (1, 1, 511)
    assert (p.anon_huge_bytes(), c.anon_huge_bytes()) == (0, 0)


def test_eligibility_and_modes() -> None:
    k = Kernel(thp="madvise")
    p = k.spawn(name="p")
    a = p.mmap(2 * HP * PS)  # a multiple of the huge page size: aligned (6.7+)
    assert a % (HP * PS) == 0
    p.fill(a, PS, 1)  # no MADV_HUGEPAGE: a small page, and a page table for that block
    p.madvise(a, 2 * HP * PS, MADV_HUGEPAGE)
    p.fill(a + PS, PS, 1)  # the block already has a page table: still small pages
    p.fill(a + HP * PS, PS, 1)  # the second block: a huge page
    assert p.anon_huge_bytes() == 2 << 20
    assert sum(s is not None for s in p.vmas[0].pages) == 2 + HP
    k.thp_enabled = "always"
    q = k.spawn(name="q")
    b = q.mmap(HP * PS)
    q.fill(b, PS, 1)
    assert q.anon_huge_bytes() == 2 << 20
    r = k.spawn(name="r")
    r.set_thp_disable(True)
    c = r.mmap(HP * PS)
    r.fill(c, PS, 1)
    assert r.anon_huge_bytes() == 0
    with pytest.raises(ValueError):
        k.thp_enabled = "sometimes"


def test_unaligned_or_partial_blocks_get_no_huge_page() -> None:
    k = Kernel()
    p = k.spawn(name="p")
    a = p.mmap((HP + 100) * PS, align=HP * PS)
    p.madvise(a, (HP + 100) * PS, MADV_HUGEPAGE)
    p.fill(a, (HP + 100) * PS, 1)
    assert p.anon_huge_bytes() == 2 << 20  # only the whole first block


def test_failed_huge_page_allocation_falls_back() -> None:
    k = Kernel()
    p = k.spawn(name="p")
    a = p.mmap(2 * HP * PS)
    p.madvise(a, 2 * HP * PS, MADV_HUGEPAGE)
    p.thp_fault_fails(a, HP * PS)
    p.fill(a, 2 * HP * PS, 1)
    assert p.anon_huge_bytes() == 2 << 20
    assert p.anon_huge_bytes(a, HP * PS) == 0


@pytest.mark.parametrize(("profile", "huge"), [("6.13", True), ("6.12", False)])
def test_read_fault_maps_the_huge_zero_page(profile: str, huge: bool) -> None:
    # Measured on 6.18: after a read maps the huge zero page (kpageflags ZERO_PAGE|THP, no
    # AnonHugePages), a write maps a new huge page (AnonHugePages 2048 kB). Before 6.13 the
    # write split the zero PMD and faulted one small page.
    k = Kernel(profile=profile)
    p = k.spawn(name="p")
    a = p.mmap(HP * PS)
    p.madvise(a, HP * PS, MADV_HUGEPAGE)
    assert p.read(a, 4) == bytes(4)  # huge zero page: nothing present, nothing to scan
    assert p.anon_huge_bytes() == 0
    p.fill(a + PS, PS, 1)
    assert p.anon_huge_bytes() == (2 << 20 if huge else 0)
    assert sum(s is not None for s in p.vmas[0].pages) == (HP if huge else 1)
    k2 = Kernel(thp_use_zero_page=False)
    q = k2.spawn(name="q")
    b = q.mmap(HP * PS)
    q.madvise(b, HP * PS, MADV_HUGEPAGE)
    q.read(b, 4)  # without the huge zero page a read allocates the huge page
    assert q.anon_huge_bytes() == 2 << 20


def test_partial_unmergeable_splits_the_pmd_and_dontneed_of_a_whole_block() -> None:
    k = Kernel()
    p, a = spawn(k, ["a"] * (2 * HP))
    p.madvise(a + 10 * PS, 5 * PS, 13)  # MADV_UNMERGEABLE: VMA split inside block 0
    assert p.anon_huge_bytes() == 2 << 20  # block 1 is still PMD-mapped
    p.madvise(a + HP * PS, HP * PS, 4)  # MADV_DONTNEED of all of block 1: zap_huge_pmd
    assert p.anon_huge_bytes() == 0
    p.fill(a + HP * PS, PS, 2)  # an empty PMD again: a new huge page
    assert p.anon_huge_bytes() == 2 << 20


@pytest.mark.parametrize("reclaim", [True, False])
def test_dontneed_of_a_whole_block_frees_its_page_table(reclaim: bool) -> None:
    # CONFIG_PT_RECLAIM (6.14+, set on this 6.18 host): MADV_DONTNEED that covers a whole
    # block frees its empty page table, so the next write faults in a huge page again
    # (measured: random scenario seed 200, AnonHugePages 2048 kB after such a rewrite).
    k = Kernel(pt_reclaim=reclaim)
    p = k.spawn(name="p")
    a = p.mmap(HP * PS)
    p.madvise(a, HP * PS, MADV_HUGEPAGE)
    p.thp_fault_fails(a, HP * PS)
    p.fill(a, HP * PS, 1)  # small pages: a page table
    p.madvise(a, HP * PS, 4)  # MADV_DONTNEED
    p.fill(a, PS, 2)
    assert p.anon_huge_bytes() == (2 << 20 if reclaim else 0)
