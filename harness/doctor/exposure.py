"""Sharing exposure: which processes (or groups of them) map the same KSM pages.

Exact, from the page tables: /proc/PID/pagemap gives the page frame of every present page of
the mergeable VMAs; /proc/kpageflags says which frames are KSM pages (KPF_KSM). Two processes
whose PTEs map one KSM frame share that page, the side channel (a write to it is slower: a
copy-on-write) that makes hosting providers turn KSM off between tenants. No page is read,
so the cost is 16 bytes of pagemap and kpageflags per page plus a numpy intersection.

Only frames pagemap reports present, anonymous and not exclusively mapped are looked up in
kpageflags (a KSM page is mapped at least twice, so PM_MMAP_EXCLUSIVE rules it out). The zero
page (use_zero_pages) is shared by everyone and is not KSM: it is never counted.
Root is needed (without CAP_SYS_ADMIN pagemap hides frame numbers).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from harness import procfs
from harness.errors import HarnessError
from harness.ksm.types import PAGE_SIZE

WINDOW = 512  # kpageflags words per pread when looking up clustered frames


@dataclass(frozen=True)
class Exposure:
    """m[i][j]: distinct KSM pages mapped by both group i and group j (i != j); m[i][i]:
    distinct KSM pages group i maps. Symmetric."""

    groups: tuple[str, ...]
    pages: tuple[tuple[int, ...], ...]
    members: Mapping[str, tuple[int, ...]]  # group -> pids
    seconds: float = 0.0

    def pairs(self) -> list[tuple[str, str, int]]:
        """(a, b, pages) for every pair of distinct groups, a < b in group order."""
        out = []
        for i, a in enumerate(self.groups):
            for j in range(i + 1, len(self.groups)):
                out.append((a, self.groups[j], self.pages[i][j]))
        return out

    def as_dict(self) -> dict[str, Any]:
        return {
            "method": "pagemap PFNs with KPF_KSM in /proc/kpageflags",
            "groups": list(self.groups),
            "pages": [list(r) for r in self.pages],
            "members": {g: list(p) for g, p in self.members.items()},
            "seconds": round(self.seconds, 4),
        }


def candidate_pfns(entries: np.ndarray) -> np.ndarray:
    """Frames of present, anonymous, not exclusively mapped pages (sorted, unique)."""
    e = entries.astype(np.uint64, copy=False)
    mask = (e & np.uint64(procfs.PM_PRESENT | procfs.PM_FILE | procfs.PM_EXCLUSIVE)) == np.uint64(
        procfs.PM_PRESENT
    )
    pfns = e[mask] & np.uint64(procfs.PFN_MASK)
    out: np.ndarray = np.unique(pfns[pfns != 0])
    return out


class KpageFlags:
    """Reads /proc/kpageflags for sorted frame numbers, one pread per cluster, with a cache."""

    def __init__(self, proc: Path = procfs.PROC) -> None:
        try:
            self.fd: int | None = os.open(proc / "kpageflags", os.O_RDONLY)
        except OSError:
            self.fd = None
        self.cache: dict[int, int] = {}

    def ksm(self, pfns: np.ndarray) -> np.ndarray:
        """The subset of (sorted, unique) `pfns` that are KSM pages."""
        if self.fd is None or not len(pfns):
            return np.zeros(0, dtype=np.uint64)
        flags = np.zeros(len(pfns), dtype=np.uint64)
        i = 0
        values = pfns.tolist()
        while i < len(values):
            lo = values[i]
            j = int(np.searchsorted(pfns, np.uint64(lo + WINDOW), side="left"))
            raw = procfs.read_kpageflags(self.fd, lo, WINDOW)
            words = np.frombuffer(raw[: len(raw) // 8 * 8], dtype="<u8")
            offs = np.asarray(values[i:j], dtype=np.int64) - lo
            ok = offs < len(words)
            flags[i:j][ok] = words[offs[ok]]
            i = j
        ksm = (flags & np.uint64(procfs.KPF_KSM)) != 0
        zero = (flags & np.uint64(procfs.KPF_ZERO_PAGE)) != 0
        out: np.ndarray = pfns[ksm & ~zero]
        return out

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def pagemap_entries(pid: int, vmas: Iterable[Any], proc: Path = procfs.PROC) -> list[np.ndarray]:
    """The pagemap words of each VMA (objects with start and pages), in order."""
    try:
        fd = os.open(proc / str(pid) / "pagemap", os.O_RDONLY)
    except (FileNotFoundError, ProcessLookupError):  # gone, or a zombie (ESRCH)
        raise HarnessError(f"no process {pid}") from None
    except PermissionError:
        raise HarnessError(f"cannot read /proc/{pid}/pagemap", hint="run as root") from None
    out = []
    try:
        for v in vmas:
            raw = procfs.read_pagemap(fd, v.start // PAGE_SIZE, v.pages)
            out.append(np.frombuffer(raw, dtype="<u8"))
    except ProcessLookupError:  # it exited while we read
        raise HarnessError(f"process {pid} exited while its page tables were read") from None
    finally:
        os.close(fd)
    return out


def ksm_pfns_of(pid: int, flags: KpageFlags, proc: Path = procfs.PROC) -> np.ndarray:
    """Distinct KSM frames mapped by the mergeable VMAs of `pid` (sorted)."""
    vmas = [v for v in procfs.smaps(pid, proc) if v.mergeable]
    entries = pagemap_entries(pid, vmas, proc)
    if not entries:
        return np.zeros(0, dtype=np.uint64)
    return flags.ksm(candidate_pfns(np.concatenate(entries)))


def matrix(
    pfns: Mapping[int, np.ndarray], group_of: Mapping[int, str], seconds: float = 0.0
) -> Exposure:
    """The exposure matrix of processes (pid -> their KSM frames) grouped by group_of[pid]."""
    members: dict[str, list[int]] = {}
    for pid in pfns:
        members.setdefault(group_of.get(pid, str(pid)), []).append(pid)
    groups = tuple(sorted(members))
    sets = [
        np.unique(np.concatenate([pfns[p] for p in members[g]]))
        if members[g]
        else np.zeros(0, np.uint64)
        for g in groups
    ]
    n = len(groups)
    m = [[0] * n for _ in range(n)]
    for i in range(n):
        m[i][i] = len(sets[i])
        for j in range(i + 1, n):
            shared = len(np.intersect1d(sets[i], sets[j], assume_unique=True))
            m[i][j] = m[j][i] = shared
    return Exposure(
        groups,
        tuple(tuple(r) for r in m),
        {g: tuple(sorted(members[g])) for g in groups},
        seconds,
    )


def exposure(
    pids: Sequence[int],
    group_of: Mapping[int, str],
    proc: Path = procfs.PROC,
) -> Exposure:
    """Measure the exposure matrix of `pids` now (processes that vanish are left out)."""
    import time

    t0 = time.perf_counter()
    flags = KpageFlags(proc)
    found: dict[int, np.ndarray] = {}
    try:
        if flags.fd is None:
            raise HarnessError(
                f"cannot read {proc / 'kpageflags'}", hint="the sharing matrix needs root"
            )
        for pid in pids:
            try:
                found[pid] = ksm_pfns_of(pid, flags, proc)
            except HarnessError:
                if procfs.pid_alive(pid, proc):
                    raise
    finally:
        flags.close()
    return matrix(found, group_of, time.perf_counter() - t0)


def format_matrix(e: Exposure, width: int = 12) -> list[str]:
    """The matrix as text rows: a header of group names, then one row per group."""
    names = [g if len(g) <= width else g[: width - 1] + "~" for g in e.groups]
    w = max([len(n) for n in names] + [5])
    lines = [" " * (w + 2) + "".join(f"{n:>{w + 2}}" for n in names)]
    for name, row in zip(names, e.pages, strict=True):
        lines.append(f"{name:<{w + 2}}" + "".join(f"{v:>{w + 2}}" for v in row))
    return lines


def markdown_matrix(e: Exposure) -> list[str]:
    """The matrix as a markdown table."""
    head = "| | " + " | ".join(e.groups) + " |"
    lines = [head, "|---" * (len(e.groups) + 1) + "|"]
    for g, row in zip(e.groups, e.pages, strict=True):
        lines.append(f"| {g} | " + " | ".join(str(v) for v in row) + " |")
    return lines


class SharingProbe:
    """The exposure matrix of every process KSM scans, measured at most once per `interval`
    seconds (the exporter's `ksm_cross_group_shared_pages`); a scrape in between gets the last
    matrix. Groups: the label `group_by` (harness.doctor.groups), else one per process."""

    def __init__(
        self,
        proc: Path = procfs.PROC,
        labels: Sequence[Any] = (),
        group_by: str | None = None,
        interval: float = 60.0,
    ) -> None:
        self.proc = proc
        self.labels = list(labels)
        self.group_by = group_by
        self.interval = interval
        self.last: Exposure | None = None
        self.taken = 0.0

    def __call__(self) -> Exposure:
        import time

        from harness.doctor.groups import group_names, process_name

        now = time.monotonic()
        if self.last is not None and now - self.taken < self.interval:
            return self.last
        users = procfs.ksm_users(self.proc, exclude={os.getpid()})
        names = {u.pid: process_name(u.pid, self.proc) for u in users}
        group_of = group_names(names, self.labels, self.group_by) if self.group_by else names
        self.last = exposure(list(names), group_of, self.proc)
        self.taken = now
        return self.last
