"""The THP layout of a mapping, from its pagemap entries and /proc/kpageflags (harness.procfs).

A 2 MiB block of a mapping is one transparent huge page when its 512 pagemap entries are
present anonymous pages whose PFNs run contiguously from a 512-aligned head that kpageflags
marks KPF_COMPOUND_HEAD, all of them KPF_THP and none KPF_ZERO_PAGE (the huge zero page has
both KPF_THP and KPF_ZERO_PAGE). Only blocks that pass the PFN test cost a kpageflags read.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np

from harness.procfs import KPF_COMPOUND_HEAD, KPF_THP, KPF_ZERO_PAGE, PFN_MASK, PM_FILE, PM_PRESENT

PAGE = 4096
HPAGE = 512  # pages per PMD-mapped transparent huge page (x86-64, 4 KiB pages)


def is_huge_page(kpageflags_fd: int, head: int) -> bool:
    """Are PFNs head..head+511 one transparent huge page (not the huge zero page)?"""
    data = os.pread(kpageflags_fd, HPAGE * 8, head * 8)
    if len(data) != HPAGE * 8:
        return False
    flags = np.frombuffer(data, "<u8")
    return (
        bool(flags[0] & np.uint64(KPF_COMPOUND_HEAD))
        and bool(np.all(flags & np.uint64(KPF_THP)))
        and not bool(np.any(flags & np.uint64(KPF_ZERO_PAGE)))
    )


def huge_blocks(
    start: int, end: int, entries: np.ndarray, is_huge: Callable[[int], bool]
) -> frozenset[int]:
    """Blocks (address // 2 MiB) of the mapping [start, end) that one THP maps, from its
    pagemap `entries` (one per page from `start`) and `is_huge(head_pfn)`."""
    out = set()
    present = np.uint64(PM_PRESENT | PM_FILE)
    ramp = np.arange(HPAGE, dtype="<u8")
    for block in range(-(-start // (HPAGE * PAGE)), end // (HPAGE * PAGE)):
        lo = block * HPAGE - start // PAGE
        e = entries[lo : lo + HPAGE]
        if len(e) != HPAGE or not np.all((e & present) == np.uint64(PM_PRESENT)):
            continue
        pfn = e & np.uint64(PFN_MASK)
        head = int(pfn[0])
        if head and head % HPAGE == 0 and np.array_equal(pfn - pfn[0], ramp) and is_huge(head):
            out.add(block)
    return frozenset(out)


def in_blocks(start: int, end: int, blocks: set[int]) -> np.ndarray:
    """Per page of the mapping [start, end): is it inside one of `blocks`?"""
    pn = np.arange(start // PAGE, end // PAGE)
    if not blocks:
        return np.zeros(len(pn), dtype=bool)
    return np.isin(pn // HPAGE, np.fromiter(blocks, dtype=np.int64))
