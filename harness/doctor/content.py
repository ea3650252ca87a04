"""Content of the examined processes: what KSM scans, what could merge, what would if allowed.

Content keys come from the shadow capture (harness.shadow.capture_vmas: the same pagemap
rules and the same 16-byte page key, harness.pagekey), over two sets of VMAs per process:

- mergeable VMAs (VmFlags `mg`): the pages ksmd visits. "Could merge" = a page whose key
  occurs at least twice among all mergeable pages examined, or that is already a KSM page;
- candidate VMAs: writable mappings KSM ignores (shared, file-backed, hugetlb, or private
  anonymous without `mg`) of at least `min_vma` bytes. "Would merge" = a page whose key
  occurs at least twice among mergeable and candidate pages together, i.e. what would merge
  if these VMAs were mergeable too. A shared page mapped twice (same frame) counts once.

Volatility is measured by keying a sample of the mergeable pages again after the window: a
page whose key changed meanwhile is one ksmd would find volatile too.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from harness import procfs
from harness.doctor.exposure import KpageFlags, candidate_pfns
from harness.pagekey import KEY_SIZE, PAGE, page_key
from harness.shadow import ABSENT, VmaCapture, capture_vmas
from harness.shadow import Vma as ShadowVma

ZERO_KEY = page_key(bytes(PAGE))
VOLATILE_SAMPLE = 1024  # pages per process keyed again after the window


def vma_kind(v: procfs.Vma) -> str | None:
    """Why KSM ignores a writable VMA: hugetlb, shared, file, unadvised; None if it scans it
    or it is not worth a look (read-only, special)."""
    if v.mergeable or "wr" not in v.flags:
        return None
    if v.name.startswith("[") and v.name not in ("[heap]", "[anon_shmem]"):
        return None  # [stack], [vvar], [vdso]: never candidates
    if "io" in v.flags or "pf" in v.flags or "dd" in v.flags:
        return None  # device memory, PFN maps, do-not-dump: not ordinary memory
    if "ht" in v.flags:
        return "hugetlb"
    if "sh" in v.flags:
        return "shared"
    if v.name.startswith("/") and not v.name.startswith(("/memfd:", "/dev/zero", "/SYSV")):
        return "file"
    return "not-mergeable"


def as_shadow(v: procfs.Vma) -> ShadowVma:
    return ShadowVma(v.start, v.end, v.flags, v.name)


@dataclass
class VmaContent:
    """One captured VMA: its smaps entry, why KSM ignores it (None: it scans it), the keys."""

    vma: procfs.Vma
    kind: str | None
    cap: VmaCapture
    self_dup: np.ndarray | None = None  # pages whose frame an earlier page already counted
    ksm: np.ndarray | None = None  # bool per page: already a KSM page

    @property
    def present(self) -> int:
        return self.cap.present


@dataclass
class ProcessContent:
    pid: int
    vmas: list[VmaContent] = field(default_factory=list)
    bytes_read: int = 0
    ksm_pfns: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    error: str | None = None

    def mergeable(self) -> list[VmaContent]:
        return [v for v in self.vmas if v.kind is None]

    def candidates(self) -> list[VmaContent]:
        return [v for v in self.vmas if v.kind is not None]


def capture(
    pid: int,
    vmas: Sequence[procfs.Vma],
    flags: KpageFlags,
    proc: Path = procfs.PROC,
    min_vma: int = 1 << 20,
) -> ProcessContent:
    """Key the mergeable VMAs and the candidate VMAs of at least min_vma bytes of `pid`."""
    out = ProcessContent(pid)
    mergeable = [v for v in vmas if v.mergeable]
    cands = [
        (v, k)
        for v in vmas
        if (k := vma_kind(v)) is not None and v.end - v.start >= min_vma and v.resident_kib
    ]
    caps, n1 = capture_vmas(pid, [as_shadow(v) for v in mergeable], proc, keep_entries=True)
    ccaps, n2 = capture_vmas(
        pid, [as_shadow(v) for v, _ in cands], proc, file_pages=True, keep_entries=True
    )
    out.bytes_read = n1 + n2
    for m, c in zip(mergeable, caps, strict=True):
        out.vmas.append(VmaContent(m, None, c))
    for (v, k), c in zip(cands, ccaps, strict=True):
        out.vmas.append(VmaContent(v, k, c))
    entries = [vc.cap.entries for vc in out.mergeable() if vc.cap.entries is not None]
    if entries:
        out.ksm_pfns = flags.ksm(candidate_pfns(np.concatenate(entries)))
        for vc in out.mergeable():
            e = vc.cap.entries
            assert e is not None
            pfn = e & np.uint64(procfs.PFN_MASK)
            vc.ksm = np.isin(pfn, out.ksm_pfns) & (pfn != 0)
    return out


def mark_self_dups(procs: Iterable[ProcessContent]) -> None:
    """A shared page (PM_FILE) seen through a second mapping is the same memory: mark it."""
    seen: set[int] = set()
    for p in procs:
        for v in p.candidates():
            e = v.cap.entries
            if e is None:
                continue
            keyed = v.cap.keys != ABSENT
            shared = (e & np.uint64(procfs.PM_FILE)) != 0
            pfn = (e & np.uint64(procfs.PFN_MASK)).astype(np.int64)
            dup = np.zeros(len(e), dtype=bool)
            for i in np.flatnonzero(keyed & shared & (pfn != 0)).tolist():
                f = int(pfn[i])
                if f in seen:
                    dup[i] = True
                else:
                    seen.add(f)
            v.self_dup = dup


class KeyPool:
    """How often each content key occurs among a set of VMAs."""

    def __init__(self, vmas: Iterable[VmaContent]) -> None:
        arrays = [_countable(v) for v in vmas]
        keys = np.concatenate(arrays) if arrays else np.zeros(0, f"S{KEY_SIZE}")
        self.keys, self.counts = np.unique(keys, return_counts=True)

    def count(self, keys: np.ndarray) -> np.ndarray:
        """Occurrences of each key in the pool (0 for keys not in it)."""
        if not len(self.keys):
            return np.zeros(len(keys), dtype=np.int64)
        idx = np.searchsorted(self.keys, keys).clip(0, len(self.keys) - 1)
        out: np.ndarray = np.where(self.keys[idx] == keys, self.counts[idx], 0)
        return out


def _countable(v: VmaContent) -> np.ndarray:
    keep = v.cap.keys != ABSENT
    if v.self_dup is not None:
        keep &= ~v.self_dup
    out: np.ndarray = v.cap.keys[keep]
    return out


@dataclass(frozen=True)
class Duplicates:
    """Pages of one VMA with a duplicate in a pool; zero-filled ones among them."""

    pages: int
    zero: int


def duplicates(v: VmaContent, pool: KeyPool, include_ksm: bool = False) -> Duplicates:
    keyed = v.cap.keys != ABSENT
    if v.self_dup is not None:
        keyed &= ~v.self_dup
    dup = keyed & (pool.count(v.cap.keys) >= 2)
    if include_ksm and v.ksm is not None:
        dup |= v.ksm
    zero = dup & (v.cap.keys == np.array(ZERO_KEY, dtype=f"S{KEY_SIZE}"))
    return Duplicates(int(np.count_nonzero(dup)), int(np.count_nonzero(zero)))


def volatility_sample(p: ProcessContent, limit: int = VOLATILE_SAMPLE) -> list[tuple[int, bytes]]:
    """Up to `limit` (address, key) pairs spread evenly over the keyed mergeable pages."""
    addrs, keys = [], []
    for v in p.mergeable():
        idx = np.flatnonzero(v.cap.keys != ABSENT)
        addrs.append(np.uint64(v.vma.start) + idx.astype(np.uint64) * np.uint64(PAGE))
        keys.append(v.cap.keys[idx])
    if not addrs:
        return []
    a, k = np.concatenate(addrs), np.concatenate(keys)
    pick = np.unique(np.linspace(0, len(a) - 1, min(limit, len(a))).astype(np.int64))
    return list(zip(a[pick].tolist(), k[pick].tolist(), strict=True)) if len(a) else []


def changed_pages(
    pid: int, sample: Sequence[tuple[int, bytes]], proc: Path = procfs.PROC
) -> tuple[int, int]:
    """(pages read again, pages whose key changed) for a volatility sample."""
    try:
        fd = os.open(proc / str(pid) / "mem", os.O_RDONLY)
        pm = os.open(proc / str(pid) / "pagemap", os.O_RDONLY)
    except OSError:
        return 0, 0
    read = changed = 0
    want = procfs.PM_PRESENT | procfs.PM_FILE
    try:
        for addr, key in sample:
            try:
                # Read only pages still present: reading an absent one would fault it in.
                entry = int.from_bytes(procfs.read_pagemap(pm, addr // PAGE, 1), "little")
                if entry & want != procfs.PM_PRESENT:
                    continue
                data = os.pread(fd, PAGE, addr)
            except OSError:
                continue
            if len(data) != PAGE:
                continue
            read += 1
            # numpy S16 drops trailing NULs: compare on the stripped form.
            changed += page_key(data).rstrip(b"\0") != key.rstrip(b"\0")
    finally:
        os.close(fd)
        os.close(pm)
    return read, changed
