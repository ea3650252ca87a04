"""Shadow capture for a twin that captures again and again: read only what may have changed.

A KSM page never changes in place: a write breaks COW into a new page, at another PFN. So a
page that was shared (mapped by several PTEs: pagemap's exclusive bit 56 clear, which is what
a KSM page is) at the last capture, and still is, at the same PFN, holds the same content:
its key is kept and the page is not read. Everything else is read and keyed as
harness.shadow.capture_process does, with the THP layout (harness.shadow.key_pages, the same
page keys; present, not file or shared-anon; the zero page left out, zero-filled THP subpages
kept; the blocks one huge page maps), so a capture of a converged host costs about its unmerged
pages. The result is the ProcessCapture that harness.shadow.Shadow replays.

The THP layout matters to every model fed from here: without it the model maps small pages
only, never splits, and never visits the zero-filled subpages of huge pages, which ksmd does
(measured: 4 filled THP guests, ksmd visited 205,224 pages in its first scan, a capture without
them 165,381, so a forecast put that scan at 38 s against 49 s measured).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from harness import procfs
from harness.pagekey import KEY_DTYPE, PageReader
from harness.pagemap import huge_blocks
from harness.procfs import PFN_MASK, PM_EXCLUSIVE, PM_FILE, PM_PRESENT
from harness.shadow import (
    PAGE,
    ProcessCapture,
    ShadowError,
    Vma,
    VmaCapture,
    ZeroPfns,
    key_pages,
    mergeable_vmas,
    start_time,
)


@dataclass
class _Seen:
    """What the last capture of one VMA knew: per page its PFN, key and whether it was shared."""

    pfns: np.ndarray  # uint64
    keys: np.ndarray  # S16
    shared: np.ndarray  # bool


class IncrementalCapture:
    """Captures processes like harness.shadow, reusing the keys of unchanged KSM pages."""

    def __init__(self, proc: Path = procfs.PROC, fallback_hugepage: bool = False) -> None:
        self.proc = proc
        self.fallback_hugepage = fallback_hugepage
        self.seen: dict[tuple[int, int], dict[int, _Seen]] = {}  # (pid, start) -> vma -> seen
        self.pages_read = 0
        self.pages_kept = 0
        self.failures: list[str] = []  # processes the last capture could not read, and why

    def capture(self, targets: Mapping[int, str]) -> list[ProcessCapture]:
        """Every target (pid -> name) that still exists, in the kernel's registration order.
        One that cannot be read is left out and named in `failures` (a live host keeps going;
        its pages are then missing from the models, which the deltas show)."""
        caps = []
        alive = set()
        self.failures = []
        for pid, name in targets.items():
            try:
                cap = self._process(pid, name)
            except ShadowError as exc:
                if (self.proc / str(pid)).exists():  # else: exited meanwhile
                    self.failures.append(exc.message)
                continue
            caps.append(cap)
            alive.add((pid, cap.start))
        for key in [k for k in self.seen if k not in alive]:
            del self.seen[key]
        caps.sort(key=lambda c: (c.start, c.pid))
        return caps

    def _process(self, pid: int, name: str) -> ProcessCapture:
        t0 = time.perf_counter()
        start = start_time(pid, self.proc)
        vmas = mergeable_vmas(pid, self.proc, self.fallback_hugepage)
        base = self.proc / str(pid)
        try:
            pagemap = os.open(base / "pagemap", os.O_RDONLY)
            mem = os.open(base / "mem", os.O_RDONLY)
        except FileNotFoundError:
            raise ShadowError(f"process {pid} exited during capture") from None
        except PermissionError:
            raise ShadowError(f"cannot read /proc/{pid}/mem", hint="run as root") from None
        zero = ZeroPfns(self.proc, keep_thp=True)
        reader = PageReader(mem)
        before = self.seen.get((pid, start), {})
        now: dict[int, _Seen] = {}
        out: list[VmaCapture] = []
        try:
            for vma in vmas:
                seen, huge = self._vma(vma, pagemap, reader, zero, before.get(vma.start))
                now[vma.start] = seen
                out.append(VmaCapture(vma, seen.keys, huge=huge))
        finally:
            os.close(pagemap)
            os.close(mem)
            zero.close()
        self.seen[(pid, start)] = now
        self.pages_read += reader.bytes_read // PAGE
        # A process with THP disabled (QEMU under `--no-thp`) never faults in huge pages: the
        # model must know, or a host in THP madvise mode makes its MADV_HUGEPAGE RAM huge.
        thp_off = procfs.thp_enabled(pid, self.proc) is False
        seconds = time.perf_counter() - t0
        nbytes = reader.bytes_read
        return ProcessCapture(pid, name or str(pid), start, out, nbytes, seconds, thp_off)

    def _vma(
        self, vma: Vma, pagemap: int, reader: PageReader, zero: ZeroPfns, old: _Seen | None
    ) -> tuple[_Seen, frozenset[int]]:
        """One VMA: what this capture knows of it, and the blocks huge pages map."""
        start, pages = vma.start, vma.pages
        raw = os.pread(pagemap, pages * 8, (start // PAGE) * 8)
        entries = np.frombuffer(raw, dtype="<u8")
        if len(entries) < pages:  # the VMA shrank under us: pad as absent
            entries = np.concatenate((entries, np.zeros(pages - len(entries), "<u8")))
        scan = (entries & np.uint64(PM_PRESENT | PM_FILE)) == np.uint64(PM_PRESENT)
        pfns = entries & np.uint64(PFN_MASK)
        shared = scan & ((entries & np.uint64(PM_EXCLUSIVE)) == 0)
        keys = np.zeros(pages, dtype=KEY_DTYPE)
        if old is not None and len(old.pfns) == pages:
            keep = shared & old.shared & (old.pfns == pfns) & (pfns != 0)
            keys[keep] = old.keys[keep]
            self.pages_kept += int(np.count_nonzero(keep))
            scan &= ~keep
        key_pages(reader, start, entries, scan, keys, zero)
        huge = huge_blocks(start, vma.end, entries, zero.is_huge)
        return _Seen(pfns, keys, shared), huge


def capture_stats(caps: list[ProcessCapture]) -> tuple[int, int]:
    """(present pages, bytes read) of a capture."""
    return sum(c.present for c in caps), sum(c.bytes_read for c in caps)


__all__ = ["IncrementalCapture", "capture_stats"]
