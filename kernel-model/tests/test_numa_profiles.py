"""Model-only behaviour this machine cannot show: two NUMA nodes, and the 6.1 profile.

Each expected value is derived from shared/ksm-model-spec.md; the derivation is in the comment.
"""

from __future__ import annotations

import errno

import pytest
from ksm_model import MADV_MERGEABLE, MADV_UNMERGEABLE, Kernel, Process
from ksm_model.profiles import PROFILES, resolve

PS = 4096


def proc(k: Kernel, npages: int, byte: int | None, node: int = 0) -> tuple[Process, int]:
    p = k.spawn(name="p")
    a = p.mmap(npages * PS, node=node)
    for i in range(npages):
        if byte is None:
            p.write(a + i * PS, b"u" + i.to_bytes(4, "little"))
        else:
            p.fill(a + i * PS, PS, byte)
    p.madvise(a, npages * PS, MADV_MERGEABLE)
    return p, a


def c(k: Kernel, *names: str) -> tuple[int, ...]:
    got = k.counters()
    return tuple(got[n] for n in names)


def test_numa_merge_across_nodes_1_is_one_tree() -> None:
    # Section 10: with 1 there is a single stable and unstable tree, so 4 'a' pages on node 0
    # and 4 on node 1 are one group of K=8 <= 256: shared 1, sharing 7 (section 8 closed form).
    k = Kernel(numa_nodes=2)
    proc(k, 4, ord("a"), node=0)
    proc(k, 4, ord("a"), node=1)
    k.sysfs.write("run", "1")
    k.run_until(full_scans=2)
    assert c(k, "pages_shared", "pages_sharing", "pages_unshared") == (1, 7, 0)


def test_numa_merge_across_nodes_0_one_ksm_page_per_node() -> None:
    # Section 10: with 0 each node has its own trees; pages on different nodes never merge,
    # and each node holding >= 2 copies gets its own KSM page: 2 groups of K=4 -> shared 2,
    # sharing 3 + 3 = 6, no chain (different trees, so no equal-content node is ever met).
    k = Kernel(numa_nodes=2)
    k.sysfs.write("merge_across_nodes", "0")
    proc(k, 4, ord("a"), node=0)
    proc(k, 4, ord("a"), node=1)
    k.sysfs.write("run", "1")
    k.run_until(full_scans=2)
    assert c(
        k,
        "pages_shared",
        "pages_sharing",
        "pages_unshared",
        "stable_node_chains",
        "stable_node_dups",
    ) == (2, 6, 0, 0, 0)


def test_numa_merge_across_nodes_0_single_copy_stays_unshared() -> None:
    # 3 copies on node 0 merge (shared 1, sharing 2); the lone copy on node 1 has no partner in
    # node 1's unstable tree: it is inserted there (unshared 1) at its 2nd visit (F=2).
    k = Kernel(numa_nodes=2)
    k.sysfs.write("merge_across_nodes", "0")
    proc(k, 3, ord("a"), node=0)
    proc(k, 1, ord("a"), node=1)
    k.sysfs.write("run", "1")
    k.run_until(full_scans=2)
    assert c(k, "pages_shared", "pages_sharing", "pages_unshared") == (1, 2, 1)


def test_numa_switch_is_ebusy_while_merged() -> None:
    # Section 10 / 12.5: a change while pages_shared != 0 is EBUSY; the same value is fine;
    # after run=2 (pages_shared 0, nodes unmapped) the change succeeds.
    k = Kernel(numa_nodes=2)
    proc(k, 2, ord("a"))
    k.sysfs.write("run", "1")
    k.run_until(full_scans=2)
    with pytest.raises(OSError) as exc:
        k.sysfs.write("merge_across_nodes", "0")
    assert exc.value.errno == errno.EBUSY
    k.sysfs.write("merge_across_nodes", "1")
    k.sysfs.write("run", "2")
    k.sysfs.write("merge_across_nodes", "0")
    assert k.sysfs.read("merge_across_nodes") == "0\n"


def test_empty_chain_is_freed_by_remove_all_stable_nodes() -> None:
    # K=4, M=2 -> shared 2, sharing 2, chains 1, dups 2 (section 8). When the only process
    # exits, ksmd frees its items (F=3); both KSM pages were freed by exit, so each dup is
    # stale and removed (dups 0) but the empty chain stays (chains 1). A merge_across_nodes
    # write with pages_shared == 0 runs remove_all_stable_nodes, which frees it (chains 0).
    k = Kernel(numa_nodes=2)
    k.sysfs.write("max_page_sharing", "2")
    p, _ = proc(k, 4, ord("a"))
    k.sysfs.write("run", "1")
    k.run_until(full_scans=2)
    assert c(k, "pages_shared", "pages_sharing", "stable_node_chains", "stable_node_dups") == (
        2,
        2,
        1,
        2,
    )
    p.exit()
    k.run_until(full_scans=3)
    assert c(k, "pages_shared", "pages_sharing", "stable_node_chains", "stable_node_dups") == (
        0,
        0,
        1,
        0,
    )
    k.sysfs.write("merge_across_nodes", "0")
    assert c(k, "stable_node_chains", "stable_node_dups") == (0, 0)


def test_profile_61_files_and_ksm_stat() -> None:
    # Section 17: 6.1 has no pages_scanned (6.6), pages_skipped/smart_scan (6.7), advisor
    # (6.8), ksm_zero_pages (6.6), general_profit (6.4); ksm_stat has only ksm_rmap_items.
    k = Kernel(profile="6.1")
    assert set(k.sysfs.files()) == {
        "run",
        "pages_to_scan",
        "sleep_millisecs",
        "pages_shared",
        "pages_sharing",
        "pages_unshared",
        "pages_volatile",
        "full_scans",
        "merge_across_nodes",
        "max_page_sharing",
        "stable_node_chains",
        "stable_node_dups",
        "stable_node_chains_prune_millisecs",
        "use_zero_pages",
    }
    for name in ("pages_scanned", "smart_scan", "advisor_mode", "general_profit"):
        with pytest.raises(FileNotFoundError):
            k.sysfs.read(name)
        with pytest.raises(FileNotFoundError):
            k.sysfs.write(name, "1")
    p, _ = proc(k, 3, ord("a"))
    k.sysfs.write("run", "1")
    k.run_until(full_scans=2)
    assert p.ksm_stat() == {"ksm_rmap_items": 3}
    assert p.ksm_merging_pages_file() == 3
    assert p.ksm_stat_text() == "ksm_rmap_items 3\n"
    with pytest.raises(OSError) as exc:
        p.set_memory_merge(True)  # prctl PR_SET_MEMORY_MERGE is 6.4+
    assert exc.value.errno == errno.EINVAL


def test_profile_61_no_smart_scan_unique_pages_stay_unshared() -> None:
    # Section 17 (6.7): before smart_scan every page is visited every scan, so N unique pages
    # are unshared N at every F >= 2 and nothing is ever skipped.
    n = 7
    k = Kernel(profile="6.1")
    proc(k, n, None)
    k.sysfs.write("run", "1")
    for f in range(2, 20):
        k.run_until(full_scans=f)
        assert c(k, "pages_unshared", "pages_volatile") == (n, 0)


def test_profile_61_merges_into_existing_ksm_page_on_first_visit() -> None:
    # Section 5 [ver] <= 6.10: the stable search comes before the checksum, so a page equal to
    # a KSM page with room merges on its first visit. P1's 3 'a' pages merge in scan 2; P2
    # registers after F=2 (tail of the list) and its 2 'a' pages join N1 during scan 3.
    k = Kernel(profile="6.1")
    proc(k, 3, ord("a"))
    k.sysfs.write("run", "1")
    k.run_until(full_scans=2)
    proc(k, 2, ord("a"))
    k.run_until(full_scans=3)
    assert c(k, "pages_shared", "pages_sharing", "pages_volatile") == (1, 4, 0)
    k2 = Kernel(profile="6.11")  # 6.11+: two visits needed, so volatile 2 at F=3
    proc(k2, 3, ord("a"))
    k2.sysfs.write("run", "1")
    k2.run_until(full_scans=2)
    proc(k2, 2, ord("a"))
    k2.run_until(full_scans=3)
    assert c(k2, "pages_shared", "pages_sharing", "pages_volatile") == (1, 2, 2)


def test_profile_61_zero_pages_uncounted_and_not_unshared() -> None:
    # Section 9 [ver]: before 6.6 KSM zero pages are neither counted nor unshared by
    # run=2/MADV_UNMERGEABLE. After run=2 + run=1 the zero PTEs are not anonymous pages, so
    # nothing is tracked (rmap 0); on 6.11 run=2 unshares them into N anonymous zero pages,
    # which the next scan tracks again (volatile N at F=1).
    n = 5
    for profile, volatile in (("6.1", 0), ("6.11", n)):
        k = Kernel(profile=profile)
        p, a = proc(k, n, 0)
        k.sysfs.write("use_zero_pages", "1")
        k.sysfs.write("run", "1")
        k.run_until(full_scans=3)
        assert c(k, "pages_volatile", "pages_shared") == (0, 0)
        k.sysfs.write("run", "2")
        k.sysfs.write("run", "1")
        k.run_until(full_scans=1)
        assert c(k, "pages_volatile") == (volatile,)
        assert p.read(a, 8) == bytes(8)


def test_profile_61_unmergeable_keeps_zero_pte() -> None:
    n = 3
    k = Kernel(profile="6.1")
    p, a = proc(k, n, 0)
    k.sysfs.write("use_zero_pages", "1")
    k.sysfs.write("run", "1")
    k.run_until(full_scans=3)
    p.madvise(a, n * PS, MADV_UNMERGEABLE)
    p.madvise(a, n * PS, MADV_MERGEABLE)
    k.run_until(full_scans=6)
    assert c(k, "pages_volatile", "pages_unshared") == (0, 0)


def test_host_profile_choice() -> None:
    # By release alone: the newest profile not newer than it (select() follows the files).
    assert resolve("host", "6.18.44-fc-v769").name == "6.17"
    assert resolve("host", "6.12.117+deb12-amd64").name == "6.12"
    assert resolve("host", "6.11.0").name == "6.11"
    assert resolve("host", "6.10.14-amd64").name == "6.10"
    assert resolve("host", "6.8.0-49-generic").name == "6.8"
    assert resolve("host", "6.1.0-57-amd64").name == "6.1"
    assert resolve("host", "5.15.0-91-generic").name == "6.1"
    assert Kernel(profile="host").profile.name.split("+")[0].split("-")[0] in PROFILES
    with pytest.raises(ValueError):
        Kernel(profile="5.4")
