"""Process and Kernel API: errors like the kernel's, lazy counters, prctl, fork, time."""

from __future__ import annotations

import errno

import pytest
from ksm_model import MADV_DONTNEED, MADV_MERGEABLE, MADV_UNMERGEABLE, Kernel, Process

PS = 4096


def oserr(fn: object, *args: object) -> int:
    with pytest.raises(OSError) as exc:
        fn(*args)  # type: ignore[operator]
    assert exc.value.errno is not None
    return exc.value.errno


def test_madvise_errors() -> None:
    k = Kernel()
    p = k.spawn(name="p")
    a = p.mmap(4 * PS)
    assert oserr(p.madvise, a + 1, PS, MADV_MERGEABLE) == errno.EINVAL
    assert oserr(p.madvise, a, PS, 99) == errno.EINVAL
    assert oserr(p.madvise, a, -1, MADV_MERGEABLE) == errno.EINVAL
    p.madvise(a, 0, MADV_MERGEABLE)  # empty range: nothing, no registration
    assert not p.registered
    # A range running past the mapping: the mapped part is processed, then ENOMEM.
    assert oserr(p.madvise, a + 2 * PS, 4 * PS, MADV_MERGEABLE) == errno.ENOMEM
    assert p.registered and p.ksm_stat()["ksm_mergeable"] is True
    assert [v.mergeable for v in p.vmas] == [False, True]  # the VMA was split
    p.madvise(a, 1, MADV_UNMERGEABLE)  # length rounds up to a page; no flag changes there,
    assert [v.mergeable for v in p.vmas] == [False, True]  # so no split (madvise_update_vma)
    p.madvise(a + 3 * PS, 1, MADV_UNMERGEABLE)
    assert [v.mergeable for v in p.vmas] == [False, True, False]


def test_memory_errors_and_contents() -> None:
    k = Kernel()
    p = k.spawn(name="p")
    assert oserr(p.mmap, 0) == errno.EINVAL
    assert oserr(p.mmap, PS, 1) == errno.EINVAL  # node 1 on a 1-node kernel
    a = p.mmap(2 * PS + 10)
    assert len(p.vmas) == 1 and p.vmas[0].end - p.vmas[0].start == 3
    assert oserr(p.write, a + 3 * PS, b"x") == errno.EFAULT
    assert oserr(p.read, a - 1, 2) == errno.EFAULT
    p.write(a + PS - 2, b"abcd")
    p.fill(a + 10, 3, ord("z"))
    assert p.read(a + PS - 3, 6) == b"\0abcd\0"
    assert p.read(a + 9, 5) == b"\0zzz\0"
    b = p.mmap(PS)
    assert b == a - PS  # placed top-down, right below the previous mapping
    p.munmap(a, 3 * PS)
    c = p.mmap(3 * PS)
    assert c == a  # the hole is reused
    assert oserr(p.munmap, c + 1, PS) == errno.EINVAL
    assert oserr(p.munmap, c, 0) == errno.EINVAL


def merged(n: int, byte: int = 97) -> tuple[Kernel, Process, int]:
    k = Kernel()
    p = k.spawn(name="p")
    a = p.mmap(n * PS)
    p.fill(a, n * PS, byte)
    p.madvise(a, n * PS, MADV_MERGEABLE)
    k.sysfs.write("run", "1")
    k.run_until(full_scans=2)
    return k, p, a


def test_munmap_counters_catch_up_at_next_pass() -> None:
    k, p, a = merged(10)
    p.munmap(a + 5 * PS, 5 * PS)
    assert k.counters()["pages_sharing"] == 9  # untouched until ksmd passes the addresses
    k.run_until(full_scans=3)
    c = k.counters()
    assert (c["pages_shared"], c["pages_sharing"], c["pages_volatile"]) == (1, 4, 0)
    assert p.ksm_stat()["ksm_rmap_items"] == 5


@pytest.mark.parametrize("same_place", [True, False])
def test_rmap_item_outlives_munmap_and_is_reused_at_its_address(same_place: bool) -> None:
    # get_next_rmap_item reuses the item at an address (with its oldchecksum) when a page is
    # there again before ksmd passed it: the page goes into the unstable tree at once.
    k = Kernel()
    p = k.spawn(name="p")
    a = p.mmap(4 * PS)
    p.write(a + PS, b"unique")
    p.madvise(a, 4 * PS, MADV_MERGEABLE)
    k.sysfs.write("run", "1")
    k.run_until(full_scans=1)  # the item at a+PS has the checksum of b"unique"
    p.munmap(a, 4 * PS)
    assert k.ksm_rmap_items == 1
    b = p.mmap(4 * PS) if same_place else p.mmap(8 * PS)
    assert (b == a) == same_place
    p.write(b + PS, b"unique")
    p.madvise(b, 4 * PS, MADV_MERGEABLE)
    k.run_until(full_scans=2)
    c = k.counters()
    assert c["pages_unshared"] == (1 if same_place else 0)
    assert c["pages_volatile"] == (0 if same_place else 1)
    assert k.ksm_rmap_items == 1


def test_dontneed_zaps_and_items_freed() -> None:
    k, p, a = merged(4)
    p.madvise(a, 4 * PS, MADV_DONTNEED)
    k.run_until(full_scans=3)
    c = k.counters()
    assert (c["pages_shared"], c["pages_sharing"], c["pages_volatile"]) == (0, 0, 0)
    assert p.read(a, 2) == b"\0\0"


def test_prctl_merge_any() -> None:
    k = Kernel()
    p = k.spawn(name="p")
    a = p.mmap(2 * PS)
    p.fill(a, 2 * PS, 5)
    assert p.get_memory_merge() is False
    p.set_memory_merge(True)
    b = p.mmap(2 * PS)  # new VMAs are marked too
    p.fill(b, 2 * PS, 5)
    assert p.get_memory_merge() is True
    assert p.ksm_stat()["ksm_merge_any"] is True
    k.sysfs.write("run", "1")
    k.run_until(full_scans=2)
    assert (k.counters()["pages_shared"], k.counters()["pages_sharing"]) == (1, 3)
    p.set_memory_merge(False)  # unmerges now, counters follow at the next scan
    assert p.ksm_stat()["ksm_mergeable"] is False
    assert p.registered
    k.run_until(full_scans=3)
    assert (k.counters()["pages_sharing"], p.registered) == (0, False)
    assert p.read(b, 1) == b"\x05"


def test_fork_exit_pids_and_lookup() -> None:
    k = Kernel()
    p = k.spawn(name="parent")
    q = p.fork()
    r = q.fork(name="grandchild")
    assert len({p.pid, q.pid, r.pid}) == 3
    assert (q.name, r.name) == ("parent", "grandchild")
    assert k.process(q.pid) is q
    assert k.processes == [p, q, r]
    q.exit()
    with pytest.raises(ProcessLookupError):
        k.process(q.pid)
    with pytest.raises(ProcessLookupError):
        q.ksm_stat()
    assert k.processes == [p, r]


def test_fork_cow_and_unstable_same_page() -> None:
    # A page shared with a fork child is the same physical page: the child's item meets the
    # parent's in the unstable tree and stops without inserting (spec 5.E), so it stays
    # volatile while the parent's is unshared.
    k = Kernel()
    p = k.spawn(name="p")
    a = p.mmap(PS)
    p.write(a, b"fork")
    p.madvise(a, PS, MADV_MERGEABLE)
    c = p.fork()
    k.sysfs.write("run", "1")
    k.run_until(full_scans=2)
    got = k.counters()
    assert (got["pages_unshared"], got["pages_volatile"]) == (1, 1)
    c.write(a, b"F")  # copy-on-write: the child gets its own page
    assert p.read(a, 4) == b"fork" and c.read(a, 4) == b"Fork"


def test_ksm_stat_text() -> None:
    _, p, _ = merged(3)
    assert p.ksm_stat_text() == (
        "ksm_rmap_items 3\nksm_zero_pages 0\nksm_merging_pages 3\n"
        "ksm_process_profit 12096\nksm_merge_any: no\nksm_mergeable: yes\n"
    )


def test_scan_pages_batches_and_end_of_scan() -> None:
    k = Kernel()
    p = k.spawn(name="p")
    a = p.mmap(5 * PS)
    p.fill(a, 5 * PS, 1)
    p.madvise(a, 5 * PS, MADV_MERGEABLE)
    assert k.scan_pages(3) == 0  # run=0: ksmd does not run
    k.sysfs.write("run", "1")
    assert [k.scan_pages(3), k.full_scans] == [3, 0]
    assert [k.scan_pages(3), k.full_scans] == [2, 1]  # ends early at the end of the scan
    assert [k.scan_pages(5), k.full_scans] == [5, 1]  # exactly 5: the NULL return is next
    assert [k.scan_pages(5), k.full_scans] == [0, 2]
    k.sysfs.write("pages_to_scan", "0")
    with pytest.raises(RuntimeError):
        k.run_until(full_scans=5)


def test_advance_virtual_time() -> None:
    # 100 pages, pages_to_scan 100, sleep 20 ms: each scan is 2 batches (100 pages costing
    # 10us + 500us, then the batch that only ends the scan, 10us). The sleep after each is
    # msecs_to_jiffies(20) = 5 jiffies at HZ 250, armed within jiffy J: the timer wheel fires
    # it at the tick that starts jiffy J+6, so batches start 24 ms apart. Scan n ends at
    # 24.01 + 48*(n-1) ms, so 21 scans end within 1 s.
    k = Kernel()
    p = k.spawn(name="p")
    a = p.mmap(100 * PS)
    p.fill(a, 100 * PS, 1)
    p.madvise(a, 100 * PS, MADV_MERGEABLE)
    k.sysfs.write("run", "1")
    k.advance(1.0)
    assert (k.full_scans, k.now) == (21, 1.0)
    k.sysfs.write("run", "0")
    k.advance(5.0)
    assert k.full_scans == 21
    k.sysfs.write("run", "1")  # wakes ksmd at once
    k.advance(0.0)
    assert k.counters()["pages_scanned"] == 21 * 100 + 100


def test_unmergeable_breaks_ksm_pages_immediately() -> None:
    k, p, a = merged(4, byte=3)
    p.madvise(a, 4 * PS, MADV_UNMERGEABLE)
    assert all(isinstance(s, bytes) for s in p.vmas[0].pages)
    assert k.counters()["pages_sharing"] == 3
    k.run_until(full_scans=3)
    assert (k.counters()["pages_sharing"], k.counters()["pages_shared"]) == (0, 0)


def test_fork_counts_copied_ksm_zero_pages() -> None:
    # Measured on 6.18 (notes/diff-findings F1): fork copies KSM zero-page PTEs with their
    # marker and counts each copy: global and child ksm_zero_pages grow by the copies.
    k = Kernel()
    p = k.spawn(name="p")
    a = p.mmap(8 * PS)
    p.fill(a, 8 * PS, 0)
    p.madvise(a, 8 * PS, MADV_MERGEABLE)
    k.sysfs.write("use_zero_pages", "1")
    k.sysfs.write("run", "1")
    k.run_until(full_scans=2)
    assert k.counters()["ksm_zero_pages"] == 8
    c = p.fork()
    assert (k.counters()["ksm_zero_pages"], c.ksm_stat()["ksm_zero_pages"]) == (16, 8)
    c.write(a, b"x")
    c.write(a + PS, b"x")
    assert (k.counters()["ksm_zero_pages"], c.ksm_stat()["ksm_zero_pages"]) == (14, 6)
    c.exit()
    assert k.counters()["ksm_zero_pages"] == 8
