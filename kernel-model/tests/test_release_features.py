"""Features that differ between releases and that the kernel matrix measured (or the changelog
gives): the fork counter reset, pre-6.9 chain lookups, and 6.6-6.9 pages_scanned accounting.
Each expected value is derived in the comments; the 6.1 ones were seen on a 6.1.192 guest."""

from __future__ import annotations

from ksm_model import MADV_MERGEABLE, Kernel, Process
from ksm_model.profiles import PROFILES

PS = 4096


def proc(k: Kernel, npages: int, byte: int) -> tuple[Process, int]:
    p = k.spawn(name="p")
    a = p.mmap(npages * PS)
    p.fill(a, npages * PS, byte)
    p.madvise(a, npages * PS, MADV_MERGEABLE)
    return p, a


def c(k: Kernel, *names: str) -> tuple[int, ...]:
    got = k.counters()
    return tuple(got[n] for n in names)


def test_fork_without_the_reset_copies_the_parents_counts() -> None:
    # dup_mm copies the mm_struct: the child starts with the parent's 8 rmap_items and, once
    # ksmd has walked it, has its own 8 on top (the 6.1 guest showed 118 -> 236 the same way).
    for name, at_fork, after_scan in (("6.1", 8, 16), ("6.17", 0, 8)):
        k = Kernel(profile=name)
        p, _ = proc(k, 8, ord("a"))
        k.sysfs.write("run", "1")
        k.run_until(full_scans=2)
        child = p.fork()
        assert child.ksm_stat()["ksm_rmap_items"] == at_fork, name
        k.run_until(full_scans=3)
        assert child.ksm_stat()["ksm_rmap_items"] == after_scan, name
        assert c(k, "pages_shared", "pages_sharing") == (1, 15), name  # the same merges


def test_fork_without_the_reset_leaves_the_global_zero_count_alone() -> None:
    # 6.12 mainline (before the fix): the child's ksm_zero_pages is the parent's copy, the
    # global count does not grow; when the child drops them the global count falls anyway.
    for name, after_fork, after_exit in (("6.12", 4, 0), ("6.17", 8, 4)):
        k = Kernel(profile=name)
        k.sysfs.write("use_zero_pages", "1")
        p, _ = proc(k, 4, 0)
        k.sysfs.write("run", "1")
        k.run_until(full_scans=2)
        assert c(k, "ksm_zero_pages") == (4,)
        child = p.fork()
        assert child.ksm_stat()["ksm_zero_pages"] == 4
        assert c(k, "ksm_zero_pages") == (after_fork,), name
        child.exit()
        assert c(k, "ksm_zero_pages") == (after_exit,), name


def chain_of_two(name: str) -> tuple[Kernel, list[Process], int]:
    """max_page_sharing 2, four 1-page processes of 'a' (no pruning): after F=2 one chain with
    two dups, N1 (p1, p2) and N2 (p3, p4) (spec section 8, K=4, M=2)."""
    k = Kernel(profile=name)
    k.sysfs.write("max_page_sharing", "2")
    k.sysfs.write("stable_node_chains_prune_millisecs", "3600000")
    procs = [proc(k, 1, ord("a")) for _ in range(4)]
    k.sysfs.write("run", "1")
    k.run_until(full_scans=2)
    assert c(k, "pages_shared", "pages_sharing", "stable_node_chains", "stable_node_dups") == (
        2, 2, 1, 2,
    )  # fmt: skip
    return k, [p for p, _ in procs], procs[0][1]


def test_a_chain_left_with_one_dup_collapses_only_on_6_9_and_later() -> None:
    # p3 and p4 write 'b': N2's page is freed. F=3: their items drop N2 (stale: dups 2 -> 1).
    # Their new 'b' pages then need a stable-tree walk, which passes the 'a' chain:
    # - 6.17: the walk collapses a chain holding one dup (chains 0, dups 0);
    # - 6.1: the stable search comes first (visit at F=3 already) but without pruning (the
    #   interval has not elapsed) only candidates are picked, N1 is full (2 = M), so nothing
    #   collapses: chains 1, dups 1 stay (what the 6.1 guest showed for seeds 5, 60, ...).
    for name, end in (("6.1", (1, 1)), ("6.17", (0, 0))):
        k, (_, _, p3, p4), addr = chain_of_two(name)
        for p in (p3, p4):
            p.fill(addr, PS, ord("b"))
        k.run_until(full_scans=5)
        assert c(k, "stable_node_chains", "stable_node_dups") == end, name
        assert c(k, "pages_shared", "pages_sharing") == (2, 2), name  # N1, and p3+p4 on 'b'


def test_a_pruning_search_collapses_on_6_1_when_one_candidate_is_left() -> None:
    # With pruning on every lookup (prune interval 0) 6.1 collapses too, but only when the one
    # live dup is a candidate: p2 leaves N1 (writes 'c') so N1 has room again.
    k, (_, p2, p3, p4), addr = chain_of_two("6.1")
    k.sysfs.write("stable_node_chains_prune_millisecs", "0")
    for p in (p2, p3, p4):
        p.fill(addr, PS, ord("c"))
    k.run_until(full_scans=5)
    assert c(k, "stable_node_chains", "stable_node_dups") == (0, 0)


def test_pages_scanned_per_batch_before_6_10() -> None:
    # 9 pages, pages_to_scan 4: batches of 4, 4 and 1 (+ the end of the scan).
    # 6.6-6.9 add pages_to_scan + 1 after a batch that used its whole budget and nothing after
    # the batch that ended the scan: 5 + 5 + 0 = 10 per full scan; 6.10+: 9.
    for name, per_scan in (("6.6", 10), ("6.10", 9)):
        k = Kernel(profile=name)
        proc(k, 9, ord("a"))
        k.sysfs.write("pages_to_scan", "4")
        k.sysfs.write("run", "1")
        k.run_until(full_scans=2)
        assert c(k, "pages_scanned") == (2 * per_scan,), name
    # One batch per scan (the scenario runner's setting): nothing is ever counted on 6.6-6.9.
    k = Kernel(profile="6.8")
    proc(k, 9, ord("a"))
    k.sysfs.write("pages_to_scan", "4000000")
    k.sysfs.write("run", "1")
    k.run_until(full_scans=3)
    assert c(k, "pages_scanned") == (0,)


def test_profiles_are_features_by_release() -> None:
    assert PROFILES["6.1"].files == PROFILES["6.4"].files[:-1]  # + general_profit
    assert "pages_scanned" in PROFILES["6.6"].files and "smart_scan" not in PROFILES["6.6"].files
    assert not PROFILES["6.1"].fork_resets_counters and PROFILES["6.17"].fork_resets_counters
