"""Kernel.visits and Kernel.dups_walked: bookkeeping of what each page visit did, for cost
models. They change no behaviour; they add up to pages_scanned."""

from __future__ import annotations

from ksm_model import MADV_MERGEABLE, Kernel
from ksm_model.scanner import VISIT_KINDS


def _kernel(profile: str, pages: list[bytes | int], mps: int = 256) -> Kernel:
    k = Kernel(profile=profile)
    k.sysfs.write("pages_to_scan", "37")  # batches end mid-process: the counts carry over
    k.sysfs.write("max_page_sharing", str(mps))
    p = k.spawn()
    a = p.mmap(len(pages) * 4096)
    for i, c in enumerate(pages):
        if isinstance(c, int):
            p.fill(a + i * 4096, 4096, c)
        else:
            p.write(a + i * 4096, c)
    p.madvise(a, len(pages) * 4096, MADV_MERGEABLE)
    k.sysfs.write("run", "1")
    return k


def test_identical_pages_scan_by_scan() -> None:
    # 600 identical pages, max_page_sharing 256. Scan 1 only checksums. Scan 2: page 0 goes
    # into the unstable tree (unique), 1 merges with it (joined) and 2..255 join that stable
    # node; 256 finds it full: unstable (unique), 257 pairs with it (joined) into a new dup of
    # a chain, 258..511 join that dup through the chain (chained); 512, 513 alike, 514..599
    # chained. Scan 3: every page is merged.
    k = _kernel("6.11", [0x5A] * 600)
    assert VISIT_KINDS == ("first", "unique", "merged", "joined", "chained")
    k.run_until(full_scans=1)
    assert k.visits == [600, 0, 0, 0, 0]
    k.run_until(full_scans=2)
    assert k.visits == [600, 3, 0, 257, 340]
    k.run_until(full_scans=3)
    assert k.visits == [600, 3, 600, 257, 340]
    assert sum(k.visits) == k.pages_scanned == 1800
    assert (k.pages_shared, k.pages_sharing, k.stable_node_dups) == (3, 597, 3)


def test_unique_pages_and_full_dups() -> None:
    # 512 identical pages (two full dups) then 100 unique ones: from scan 3 on every unique
    # page's stable search passes the chain, and with no dup a candidate it examines both.
    pages: list[bytes | int] = [7] * 512 + [b"u%d" % i for i in range(100)]
    k = _kernel("6.11", pages)
    k.run_until(full_scans=2)
    walked = k.dups_walked
    k.run_until(full_scans=3)
    assert k.visits[1] == 100 + 100 + 2  # unique: scans 2 and 3, and the pages 0 and 256
    assert k.dups_walked - walked == 100 * 2
    assert sum(k.visits) == k.pages_scanned


def test_profile_6_1_counts_alike() -> None:
    k = _kernel("6.1", [0x5A] * 600)
    k.run_until(full_scans=3)
    assert k.visits == [600, 3, 600, 257, 340]
    # Visits are per page on every profile; before 6.10 the kernel's pages_scanned added
    # pages_to_scan + 1 per batch that did not end a full scan (pages_scanned_exact), so
    # there the two differ: 1800 visits against 1824 counted.
    assert not k.profile.pages_scanned_exact
    assert (sum(k.visits), k.pages_scanned) == (1800, 1824)


def test_compare_fast_path_is_memcmp() -> None:
    import random

    from ksm_model.content import canon, compare, materialize

    rng = random.Random(7)
    # Many keys share fill byte, offset and middle length (the fast path); the second set
    # differs in offset and length (the slow path), and both are compared with each other.
    keys = [canon(bytes(rng.randrange(3) for _ in range(24)) + bytes(4072)) for _ in range(300)]
    keys += [
        canon(bytes(16 - n) + bytes(rng.randrange(256) for _ in range(n)) + bytes(4080))
        for n in range(1, 17)
    ]
    # Any fill byte, uniform pages, middles anywhere (prefix compare of the slow path).
    for _ in range(80):
        page = bytearray([rng.choice((0, 7, 200, 255))]) * 4096
        for _ in range(rng.randrange(3)):
            at = rng.randrange(4096)
            page[at : at + rng.randrange(1, 40)] = bytes(rng.randrange(256) for _ in range(39))
        keys.append(canon(bytes(page[:4096])))
    for a in keys:
        for b in keys[:60] + keys[-80:]:
            fa, fb = materialize(a, 4096), materialize(b, 4096)
            assert compare(a, b, 4096) == (fa > fb) - (fa < fb)
