"""Jiffies arithmetic and per-CPU LRU batches in the model."""

from __future__ import annotations

import pytest
from ksm_model import MADV_HUGEPAGE, MADV_MERGEABLE, Kernel, Process
from ksm_model.jiffies import bucket_expiry, msecs_to_jiffies, sleep_end_ns

PS = 4096


def test_msecs_to_jiffies_rounds_up() -> None:
    assert [msecs_to_jiffies(ms, 250) for ms in (0, 1, 4, 5, 20, 101, 105, 109)] == [
        0, 1, 1, 2, 5, 26, 27, 28,
    ]  # fmt: skip
    assert [msecs_to_jiffies(ms, 1000) for ms in (1, 20)] == [1, 20]
    assert [msecs_to_jiffies(ms, 100) for ms in (1, 20, 21)] == [1, 2, 3]
    assert msecs_to_jiffies(10, 300) == 3


def test_timer_wheel_fires_strictly_after_the_expiry() -> None:
    # Level 0 (less than 63 jiffies ahead): the next jiffy. Level 1: the next multiple of 8.
    assert bucket_expiry(105, 100, 250) == 106
    assert bucket_expiry(100 + 62, 100, 250) == 163
    assert bucket_expiry(100 + 75, 100, 250) == 176
    assert bucket_expiry(100 + 600, 100, 250) == 704  # level 2: multiples of 64
    # A 20 ms sleep at HZ 250 armed at 0.51 ms (jiffy 0): 5 jiffies, fires at jiffy 6.
    assert sleep_end_ns(510_000, 20, 250) == 24_000_000
    assert sleep_end_ns(510_000, 0, 250) == 510_000  # no sleep at all


def chain_case(prune_ms: int) -> dict[str, int]:
    """The chain of tests/integration test_chain_prune_in_jiffies, through the model API
    with the scenario runner's steps: 3 pages per batch, sleep 101 ms, and after a scan's
    end run=1 plus a sleep_millisecs change that wakes ksmd at once."""
    k = Kernel(profile="6.12")
    for name, value in (
        ("max_page_sharing", 3),
        ("pages_to_scan", 3),
        ("sleep_millisecs", 101),
        ("stable_node_chains_prune_millisecs", prune_ms),
    ):
        k.sysfs.write(name, str(value))
    procs: dict[str, tuple[Process, int]] = {}
    for name, pages in (("L", [b"u1"]), ("A", [b"a"] * 3), ("B", [b"a"] * 2), ("C", [b"u3"])):
        p = k.spawn(name=name)
        a = p.mmap(len(pages) * PS)
        for i, tok in enumerate(pages):
            p.write(a + i * PS, tok * (PS // len(tok)))
        p.madvise(a, len(pages) * PS, MADV_MERGEABLE)
        procs[name] = (p, a)

    def put(name: str, page: int, tok: bytes) -> None:
        p, a = procs[name]
        p.write(a + page * PS, tok * (PS // len(tok)))

    k.sysfs.write("run", "1")
    for scan, writes in (
        (1, [("L", 0, b"a"), ("C", 0, b"u4")]),
        (2, [("A", 0, b"b"), ("A", 1, b"b"), ("A", 2, b"b"), ("C", 0, b"u5")]),
        (3, []),
    ):
        k.run_until(full_scans=scan)
        for w in writes:
            put(*w)
        k.sysfs.write("sleep_millisecs", "102" if scan % 2 else "101")
    c = k.counters()
    return {n: c[n] for n in ("stable_node_chains", "stable_node_dups", "pages_shared")}


def test_chain_prune_interval_in_jiffies() -> None:
    # Between the chain's creation and the next lookup lie one 101 ms sleep: 26 jiffies,
    # ending at the tick after that, 27 jiffies later. 105 ms is 27 jiffies: pruned (the
    # stale dup goes and the chain collapses); 109 ms is 28: not pruned yet.
    assert chain_case(105) == {"stable_node_chains": 0, "stable_node_dups": 0, "pages_shared": 1}
    assert chain_case(109) == {"stable_node_chains": 1, "stable_node_dups": 1, "pages_shared": 1}
    assert chain_case(0)["stable_node_chains"] == 0  # 0 prunes at every lookup


def merged_pair(k: Kernel, n: int) -> tuple[Process, int, Process, int]:
    """P1 and P2 with n pages of 'a' each, merged by scan 2 (smart_scan off)."""
    if "smart_scan" in k.sysfs.files():
        k.sysfs.write("smart_scan", "0")
    out = []
    for name in ("P1", "P2"):
        p = k.spawn(name=name)
        a = p.mmap(n * PS)
        p.fill(a, n * PS, ord("a"))
        p.madvise(a, n * PS, MADV_MERGEABLE)
        out += [p, a]
    k.sysfs.write("run", "1")
    k.run_until(full_scans=2)
    return out[0], out[1], out[2], out[3]


def cow_mid_scan(profile: str, n: int, other: int = 0) -> int:
    """P2 rewrites its n merged pages once ksmd has passed P1 in scan 3: pages_volatile at
    the end of scan 3 (the copies still in the LRU batch cannot merge)."""
    k = Kernel(profile=profile)
    _, _, p2, a2 = merged_pair(k, n)
    k.scan_pages(n)  # scan 3 so far: P1's pages
    k.lru_other_allocations(other)
    p2.fill(a2, n * PS, ord("a"))
    k.run_until(full_scans=3)
    return k.counters()["pages_volatile"]


@pytest.mark.parametrize(("profile", "batch"), [("6.12", 31), ("6.1", 15)])
def test_mid_scan_copies_wait_only_in_the_lru_batch(profile: str, batch: int) -> None:
    assert cow_mid_scan(profile, 10) == 10  # all in the batch
    assert cow_mid_scan(profile, 100) == 100 % batch  # the batch moved every `batch` pages
    assert cow_mid_scan(profile, 2 * batch) == 0
    # Other tasks' pages share the batch: with k of them before, (k + n) % batch are left.
    assert [cow_mid_scan(profile, 100, k) for k in (0, 1, batch - 1)] == [
        (k + 100) % batch for k in (0, 1, batch - 1)
    ]


def test_other_cpus_and_drains() -> None:
    k = Kernel()
    _, _, p2, a2 = merged_pair(k, 8)
    k.scan_pages(8)
    p2.set_cpu(1)
    k.lru_other_allocations(30, cpu=0)  # CPU 0 is almost full, but P2's pages go to CPU 1
    p2.fill(a2, 4 * PS, ord("a"))
    assert k.lru.in_batch(1) == 4 and k.lru.in_batch(0) == 30
    q = k.spawn(name="Q")
    q.set_cpu(1)
    b = q.mmap(512 * PS)
    q.madvise(b, 512 * PS, MADV_HUGEPAGE)
    q.fill(b, PS, 1)  # a huge page added on CPU 1 moves CPU 1's whole batch
    assert k.lru.in_batch(1) == 0
    p2.fill(a2 + 4 * PS, PS, ord("a"))
    q.munmap(b, 512 * PS)  # unmap_region drains this CPU's batch
    assert k.lru.in_batch(1) == 0 and k.lru.in_batch(0) == 30
    k.run_until(full_scans=3)
    assert k.counters()["pages_volatile"] == 0
    with pytest.raises(ValueError):
        p2.set_cpu(-1)


@pytest.mark.parametrize(("lifetime_s", "first_step"), [(0, 5000), (30, 10)])
def test_advisor_first_step_counts_all_of_ksmds_cpu_time(lifetime_s: int, first_step: int) -> None:
    # Switching advisor_mode on zeroes the saved CPU time, so the first scan_time_advisor()
    # divides ksmd's whole CPU time (task_sched_runtime: the host probe reads it from
    # /proc/<ksmd>/schedstat) by the scan time. A scan of 1000 pages here takes under a
    # second (scan_time 1): with 5 ms of CPU, cpu_percent is 1 and the per-page floor gives
    # 500 * 10 = 5000; with 30 s more, cpu_percent is 3000, so 1 * 10 = 10 pages.
    k = Kernel()
    k.ksmd_runtime_ns = lifetime_s * 1_000_000_000
    p = k.spawn(name="p")
    a = p.mmap(1000 * PS)
    for i in range(1000):
        p.write(a + i * PS, i.to_bytes(8, "little") + b"x")
    p.madvise(a, 1000 * PS, MADV_MERGEABLE)
    k.sysfs.write("advisor_mode", "scan-time")
    assert k.pages_to_scan == 500
    k.sysfs.write("run", "1")
    k.run_until(full_scans=1)
    assert k.pages_to_scan == first_step
