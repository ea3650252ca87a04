"""Shadow capture: what KSM would scan in live processes, replayed into a ksm_model Kernel.

For each target process (a guest's QEMU, or any PID):
1. the ranges KSM scans: VMAs whose VmFlags in /proc/PID/smaps contain `mg` (VM_MERGEABLE);
2. which pages in them KSM would look at: /proc/PID/pagemap says present (bit 63) and not
   file/shared-anon (bit 61); pages mapping the shared zero page (or the huge zero page, or a
   zero page KSM placed there with use_zero_pages=1) are excluded by their PFN's KPF_ZERO_PAGE
   flag in /proc/kpageflags, because ksmd ignores them too (spec section 3). Zero-filled
   subpages of a transparent huge page are present anonymous pages and are kept; so is the
   THP layout: every aligned 2 MiB block whose 512 PFNs are one huge page (harness.pagemap),
   and whether the process has THP disabled (THP_enabled in /proc/PID/status);
3. their contents, read through /proc/PID/mem and reduced at once to a 16-byte content key
   (harness.pagekey: the page's head, its leading NULs and 6 bytes, and an XXH3-64 digest,
   read in cache-sized chunks): only the key is kept;
4. replay into the model: one model process per real process, registered in the kernel's order
   (process start time, then PID: the order in which QEMU processes madvised their RAM, as long
   as each started after the one before registered; the fleet starts its guests so), each
   mergeable VMA mapped in ascending address order, each present page written with a content
   that is equal exactly when the real contents are equal (uniform pages keep their byte, so
   use_zero_pages behaves as in the kernel). Each twin VMA has the real one's offset inside a
   2 MiB block and its MADV_HUGEPAGE/NOHUGEPAGE advice, so the model faults in a huge page
   exactly where the kernel has one; where the kernel has small pages in a block the model
   could have made huge, the model is told the huge page allocation failed. Later captures
   write only the pages that changed;
5. the model is then stepped through as many full scans as the kernel made meanwhile.

Disturbance, and why it is acceptable: nothing is stopped or ptrace-attached. Reading pagemap
does not fault. Only present pages are read through /proc/PID/mem, so no zero page is faulted
in (a read of a non-present anonymous page would map the zero page into the target: harmless
for KSM, which ignores it, but a change of the target's page tables we avoid). A page that goes
away between the pagemap read and the mem read is faulted back in (a swap-in at worst). While
a page is being copied out it holds one extra reference, so ksmd's write_protect_page can fail
for it in that instant; the page merges at its next visit instead. Contents change while we
read (the guests run): a capture is a fuzzy snapshot, as ksmd's own walk is.

Root is needed (pagemap PFNs and other users' /proc/PID/mem).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from harness import procfs
from harness.errors import HarnessError
from harness.pagekey import KEY_DTYPE, KEY_SIZE, MAX_NULS, UNIFORM_KEYS, ZERO_KEY_NP, PageReader
from harness.pagekey import PAGE as PAGE  # re-exported: the doctor keys pages with it
from harness.pagekey import page_key as page_key  # re-exported (doctor, tests)
from harness.pagemap import HPAGE, huge_blocks, in_blocks, is_huge_page
from harness.procfs import KPF_THP, KPF_ZERO_PAGE, PFN_MASK, PM_EXCLUSIVE, PM_FILE, PM_PRESENT

ABSENT = b""  # the key of a page KSM would not look at (numpy S16 reads it back as b"")
MADV_MERGEABLE = 12
MADV_DONTNEED = 4
MADV_HUGEPAGE = 14
MADV_NOHUGEPAGE = 15


class ShadowError(HarnessError):
    """A process could not be captured (gone, no permission, no pagemap)."""


@dataclass(frozen=True)
class Vma:
    start: int
    end: int
    flags: tuple[str, ...]
    name: str = ""

    @property
    def pages(self) -> int:
        return (self.end - self.start) // PAGE


def parse_smaps(text: str) -> list[Vma]:
    """Every VMA of an smaps text with its VmFlags (ascending addresses, as the kernel lists)."""
    vmas: list[Vma] = []
    cur: tuple[int, int, str] | None = None
    for line in text.splitlines():
        if line[:1].isupper():  # a field ("Rss:", "VmFlags:"): a VMA's header is lowercase hex
            if cur is not None and line.startswith("VmFlags:"):
                vmas.append(Vma(cur[0], cur[1], tuple(line.split()[1:]), cur[2]))
                cur = None
            continue
        head = line.split(None, 5)
        if head and "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
            lo, _, hi = head[0].partition("-")
            try:
                cur = (int(lo, 16), int(hi, 16), head[5].strip() if len(head) > 5 else "")
            except ValueError:
                cur = None
    return vmas


def mergeable_vmas(
    pid: int, proc: Path = Path("/proc"), fallback_hugepage: bool = False
) -> list[Vma]:
    """The VMAs KSM scans in `pid`: VmFlags has `mg`.

    With fallback_hugepage, a process with no `mg` VMA at all (a kernel without CONFIG_KSM,
    where QEMU's MADV_MERGEABLE fails) gets its anonymous MADV_HUGEPAGE VMAs (`hg`) instead:
    QEMU advises exactly its guest RAM blocks with both.
    """
    try:
        text = (proc / str(pid) / "smaps").read_text()
    except FileNotFoundError:
        raise ShadowError(f"no process {pid} to capture") from None
    except PermissionError:
        raise ShadowError(f"cannot read /proc/{pid}/smaps", hint="run as root") from None
    vmas = parse_smaps(text)
    found = [v for v in vmas if "mg" in v.flags]
    if not found and fallback_hugepage:
        found = [v for v in vmas if "hg" in v.flags and not v.name and "sh" not in v.flags]
    return found


def registered_pids(proc: Path = Path("/proc")) -> dict[int, str]:
    """Every process registered with KSM (pid -> comm): `ksm_mergeable yes` in ksm_stat, or,
    on kernels without that line, an `mg` VMA in smaps."""
    out: dict[int, str] = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "ksm_stat").read_text()
            if "ksm_mergeable" in stat:
                if "ksm_mergeable yes" not in stat:
                    continue
            elif not any("mg" in v.flags for v in parse_smaps((entry / "smaps").read_text())):
                continue
            out[int(entry.name)] = (entry / "comm").read_text().strip()
        except OSError:
            continue
    return out


def start_time(pid: int, proc: Path = Path("/proc")) -> int:
    """Field 22 of /proc/PID/stat (clock ticks since boot): orders registration."""
    try:
        stat = (proc / str(pid) / "stat").read_text()
    except OSError:
        return 0
    return int(stat.rpartition(")")[2].split()[19])


@dataclass
class VmaCapture:
    """One VMA's pages at one capture: key per page (b"" when KSM would not look at it).

    `entries` keeps the raw pagemap words (u64, one per page) the capture read, for callers
    that need page frame numbers too (the doctor's sharing matrix); `thp_zero` counts the
    zero-filled THP subpages left out (a capture that keeps the THP layout keeps them and
    counts none, see ZeroPfns); `huge` holds the blocks (address // 2 MiB) one transparent
    huge page maps (only when the capture keeps the THP layout).
    """

    vma: Vma
    keys: np.ndarray  # dtype S16, one per page
    entries: np.ndarray | None = None
    thp_zero: int = 0
    huge: frozenset[int] = frozenset()

    @property
    def present(self) -> int:
        return int(np.count_nonzero(self.keys != ABSENT))


@dataclass
class ProcessCapture:
    pid: int
    name: str
    start: int
    vmas: list[VmaCapture]
    bytes_read: int = 0
    seconds: float = 0.0
    thp_disabled: bool = False  # PR_SET_THP_DISABLE (THP_enabled: 0 in /proc/PID/status)

    @property
    def present(self) -> int:
        return sum(v.present for v in self.vmas)

    def key_counts(self) -> dict[bytes, int]:
        counts: dict[bytes, int] = {}
        for v in self.vmas:
            keys, n = np.unique(v.keys, return_counts=True)
            for k, c in zip(keys.tolist(), n.tolist(), strict=True):
                if k != ABSENT:
                    counts[k] = counts.get(k, 0) + c
        return counts


class ZeroPfns:
    """kpageflags lookups for one capture. For a page holding zeros: should KSM's view skip
    it? Always when its PFN is a zero page (KPF_ZERO_PAGE: the zero page, the huge zero page
    or a KSM zero page), which ksmd skips. A zero-filled subpage of a THP (KPF_THP) is an
    ordinary anonymous page to ksmd, but measured on 6.18 it never merges (KSM's split maps it
    to the zero page instead): with `keep_thp` it is kept (the model splits the huge page as
    the kernel does, given the THP layout), else left out. Cached by PFN."""

    def __init__(self, proc: Path, keep_thp: bool = False) -> None:
        self.cache: dict[int, bool] = {}
        self.keep_thp = keep_thp
        self.thp_zero = 0  # zero-filled THP subpages left out (none with keep_thp)
        try:
            self.fd: int | None = os.open(proc / "kpageflags", os.O_RDONLY)
        except OSError:
            self.fd = None

    def is_zero(self, pfn: int, entry: int) -> bool:
        if pfn in self.cache:
            return self.cache[pfn]
        if self.fd is None or pfn == 0:
            # No kpageflags (or no PFN without CAP_SYS_ADMIN): a zero page is never exclusive.
            return not entry & PM_EXCLUSIVE
        data = os.pread(self.fd, 8, pfn * 8)
        flags = int.from_bytes(data, "little") if len(data) == 8 else 0
        thp_sub = bool(flags & KPF_THP) and not flags & KPF_ZERO_PAGE
        zero = bool(flags & KPF_ZERO_PAGE) or (thp_sub and not self.keep_thp)
        self.thp_zero += thp_sub and not self.keep_thp
        self.cache[pfn] = zero
        return zero

    def is_huge(self, head: int) -> bool:
        """Are PFNs head..head+511 one transparent huge page (harness.pagemap)?"""
        return self.fd is not None and head != 0 and is_huge_page(self.fd, head)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)


def true_runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) index runs where mask is True."""
    if not mask.any():
        return []
    m = np.concatenate(([False], mask, [False])).astype(np.int8)
    edges = np.flatnonzero(np.diff(m))
    return list(zip(edges[0::2].tolist(), edges[1::2].tolist(), strict=True))


def capture_process(
    pid: int, name: str = "", proc: Path = Path("/proc"), fallback_hugepage: bool = False
) -> ProcessCapture:
    """Hash every page KSM would scan in `pid`; see the module docstring."""
    t0 = time.perf_counter()
    vmas = mergeable_vmas(pid, proc, fallback_hugepage)
    out, nbytes = capture_vmas(pid, vmas, proc, thp_layout=True)
    return ProcessCapture(
        pid=pid,
        name=name or str(pid),
        start=start_time(pid, proc),
        vmas=out,
        bytes_read=nbytes,
        seconds=time.perf_counter() - t0,
        thp_disabled=procfs.thp_enabled(pid, proc) is False,
    )


def capture_vmas(
    pid: int,
    vmas: Iterable[Vma],
    proc: Path = Path("/proc"),
    *,
    file_pages: bool = False,
    keep_entries: bool = False,
    thp_layout: bool = False,
) -> tuple[list[VmaCapture], int]:
    """Content keys of the present pages of `vmas` in `pid`, and the bytes read.

    By default a page is keyed as ksmd would see it: present, anonymous (not file or shared
    anonymous), not the zero page, not a zero-filled THP subpage. file_pages=True also keys
    file-backed and shared pages (what a VMA KSM ignores holds: the doctor's "would merge").
    keep_entries keeps the pagemap words in each VmaCapture. thp_layout (the model's view)
    keys zero-filled THP subpages too and finds the huge page blocks of each VMA.
    """
    base = proc / str(pid)
    try:
        pagemap = os.open(base / "pagemap", os.O_RDONLY)
        mem = os.open(base / "mem", os.O_RDONLY)
    except (FileNotFoundError, ProcessLookupError):  # gone, or a zombie (ESRCH)
        raise ShadowError(f"process {pid} exited during capture") from None
    except PermissionError:
        raise ShadowError(f"cannot read /proc/{pid}/mem", hint="run as root") from None
    zero = ZeroPfns(proc, keep_thp=thp_layout)
    want = np.uint64(PM_PRESENT | PM_FILE) if not file_pages else np.uint64(PM_PRESENT)
    out: list[VmaCapture] = []
    reader = PageReader(mem)
    try:
        for vma in vmas:
            try:
                raw = os.pread(pagemap, vma.pages * 8, (vma.start // PAGE) * 8)
            except ProcessLookupError:  # it exited meanwhile: its mm is gone
                raise ShadowError(f"process {pid} exited during capture") from None
            entries = np.frombuffer(raw, dtype="<u8")
            if len(entries) < vma.pages:  # the VMA shrank under us: pad as absent
                entries = np.concatenate((entries, np.zeros(vma.pages - len(entries), "<u8")))
            scan = (entries & want) == np.uint64(PM_PRESENT)
            keys = np.zeros(vma.pages, dtype=KEY_DTYPE)
            thp_before = zero.thp_zero
            key_pages(reader, vma.start, entries, scan, keys, zero)
            kept = entries if keep_entries else None
            huge = huge_blocks(vma.start, vma.end, entries, zero.is_huge) if thp_layout else None
            out.append(VmaCapture(vma, keys, kept, zero.thp_zero - thp_before, huge or frozenset()))
    finally:
        os.close(pagemap)
        os.close(mem)
        zero.close()
    return out, reader.bytes_read


def key_pages(
    reader: PageReader,
    start: int,
    entries: np.ndarray,
    scan: np.ndarray,
    keys: np.ndarray,
    zero: ZeroPfns,
) -> None:
    """Key the pages where `scan` is set (of a mapping at `start`, pagemap `entries`) into
    `keys`, reading them through `reader`; zero-filled ones that `zero` says ksmd skips are
    left absent."""
    for lo, hi in true_runs(scan):
        reader.key_run(start + lo * PAGE, keys[lo:hi])
    zeros = np.flatnonzero(scan & (keys == ZERO_KEY_NP))
    if zero.keep_thp:
        # Then only a zero page is left out, and pagemap never marks one exclusive (it maps no
        # normal page): the exclusive ones (zeroed by their owner) need no look-up.
        zeros = zeros[(entries[zeros] & np.uint64(PM_EXCLUSIVE)) == 0]
    if not len(zeros):
        return
    # One kpageflags look-up per distinct frame (most zero-filled pages map the zero page).
    frames, where = np.unique(
        entries[zeros] & np.uint64(PFN_MASK | PM_EXCLUSIVE), return_inverse=True
    )
    skip = np.array([zero.is_zero(e & PFN_MASK, e) for e in frames.tolist()], dtype=bool)
    keys[zeros[skip[where]]] = ABSENT


@dataclass
class _Shadowed:
    """A real process's model twin: VMA start -> model address, and the last keys written."""

    proc: Any
    name: str
    maps: dict[int, int] = field(default_factory=dict)
    keys: dict[int, np.ndarray] = field(default_factory=dict)
    huge: set[int] = field(default_factory=set)  # real blocks ever seen as one THP


@dataclass
class ReplayStats:
    pages_written: int = 0
    pages_vanished: int = 0  # present before, absent now: dropped (MADV_DONTNEED or munmap)
    seconds: float = 0.0


class Shadow:
    """Captures real processes and replays them into one model Kernel."""

    def __init__(
        self,
        kernel: Any,
        proc: Path = Path("/proc"),
        madv_mergeable: int | None = None,
        fallback_hugepage: bool = False,
    ) -> None:
        self.kernel = kernel
        self.proc = proc
        self.fallback_hugepage = fallback_hugepage
        # ksm_model takes the Linux madvise numbers.
        self.madv = MADV_MERGEABLE if madv_mergeable is None else madv_mergeable
        self.twins: dict[int, _Shadowed] = {}

    def capture(self, targets: Mapping[int, str]) -> list[ProcessCapture]:
        """Capture every target (pid -> name) in the kernel's registration order."""
        caps = []
        for pid, name in targets.items():
            try:
                caps.append(capture_process(pid, name, self.proc, self.fallback_hugepage))
            except ShadowError:
                if not procfs.pid_alive(pid, self.proc):  # gone, or a zombie
                    continue  # exited: the model keeps its last view until told otherwise
                raise
        caps.sort(key=lambda c: (c.start, c.pid))
        return caps

    def replay(self, caps: Iterable[ProcessCapture]) -> ReplayStats:
        """Write what changed since the last capture into the model.

        A VMA that went away, or changed size, is unmapped from the model (a resized one is
        then mapped afresh). New VMAs are mapped highest address first: the model places mmaps
        top-down, so this keeps their ascending order (the order ksmd walks them) the same as
        in the real process.
        A page that was present and is now absent (swapped out, discarded) is dropped from the
        model with MADV_DONTNEED, except when it last held zeros and KSM took it away itself
        (with use_zero_pages=1, or as a zero-filled subpage of a huge page KSM split): the
        model's ksmd does that too.
        """
        t0 = time.perf_counter()
        stats = ReplayStats()
        zero_merge = self._use_zero_pages()
        for cap in caps:
            twin = self.twins.get(cap.pid)
            if twin is None:
                twin = _Shadowed(self.kernel.spawn(name=cap.name), cap.name)
                self.twins[cap.pid] = twin
                if cap.thp_disabled and hasattr(twin.proc, "set_thp_disable"):
                    twin.proc.set_thp_disable(True)
            now = {vc.vma.start: vc.vma.pages for vc in cap.vmas}
            for start, known in list(twin.keys.items()):
                if now.get(start) != len(known):
                    twin.proc.munmap(twin.maps.pop(start), len(known) * PAGE)
                    del twin.keys[start]
                    stats.pages_vanished += int(np.count_nonzero(known != ABSENT))
            for vc in sorted(cap.vmas, key=lambda c: -c.vma.start):
                if vc.vma.start not in twin.keys:
                    twin.maps[vc.vma.start] = self._map(twin.proc, vc.vma)
                    twin.keys[vc.vma.start] = np.zeros(vc.vma.pages, dtype=KEY_DTYPE)
            for vc in cap.vmas:
                addr = twin.maps[vc.vma.start]
                old = twin.keys[vc.vma.start]
                changed = (old != vc.keys) & (vc.keys != ABSENT)
                gone = (old != ABSENT) & (vc.keys == ABSENT)
                twin.huge |= vc.huge
                # Zeros gone to the zero page: KSM did it (use_zero_pages, or 6.12+ a THP
                # split), and so does the model's ksmd.
                done_by_ksm = in_blocks(vc.vma.start, vc.vma.end, twin.huge) | zero_merge
                gone &= ~((old == ZERO_KEY_NP) & done_by_ksm)
                self._small_blocks(twin.proc, addr, vc, changed)
                stats.pages_written += _write_pages(twin.proc, addr, vc.keys, changed)
                for lo, hi in true_runs(gone):
                    twin.proc.madvise(addr + lo * PAGE, (hi - lo) * PAGE, MADV_DONTNEED)
                    stats.pages_vanished += hi - lo
                keep = (vc.keys == ABSENT) & (old == ZERO_KEY_NP) & done_by_ksm
                twin.keys[vc.vma.start] = np.where(keep, old, vc.keys)
        stats.seconds = time.perf_counter() - t0
        return stats

    def _map(self, proc: Any, vma: Vma) -> int:
        """A twin VMA at the real one's offset inside a huge page, with its THP advice."""
        skip = (vma.start // PAGE) % HPAGE * PAGE
        length = vma.pages * PAGE
        base = proc.mmap(length + skip, align=HPAGE * PAGE)
        if skip:
            proc.munmap(base, skip)
        addr = base + skip
        if "hg" in vma.flags or "nh" in vma.flags:
            proc.madvise(addr, length, MADV_HUGEPAGE if "hg" in vma.flags else MADV_NOHUGEPAGE)
        proc.madvise(addr, length, self.madv)
        return int(addr)

    @staticmethod
    def _small_blocks(proc: Any, addr: int, vc: VmaCapture, changed: np.ndarray) -> None:
        """Blocks about to get pages that the kernel maps with small pages: tell the model
        its huge page allocation failed there (it only marks blocks still empty)."""
        if not hasattr(proc, "thp_fault_fails") or not changed.any():
            return
        first = vc.vma.start // PAGE
        for block in np.unique((np.flatnonzero(changed) + first) // HPAGE).tolist():
            if block not in vc.huge:
                lo = max(block * HPAGE, first) - first
                hi = min((block + 1) * HPAGE, vc.vma.end // PAGE) - first
                proc.thp_fault_fails(addr + lo * PAGE, (hi - lo) * PAGE)

    def _use_zero_pages(self) -> bool:
        try:
            return str(self.kernel.sysfs.read("use_zero_pages")).strip() == "1"
        except (AttributeError, OSError):
            return False

    def reap(self, alive: Iterable[int]) -> list[int]:
        """Exit the model twin of every captured process that is no longer in `alive`."""
        keep = set(alive)
        gone = [pid for pid in self.twins if pid not in keep]
        for pid in gone:
            self.twins.pop(pid).proc.exit()
        return gone

    def step(self, full_scans: int) -> None:
        """Run the model's ksmd until its full_scans counter reads `full_scans`."""
        self.kernel.run_until(full_scans=full_scans)

    def model_pid(self, pid: int) -> Any:
        return self.twins[pid].proc


def model_page(key: bytes) -> bytes:
    """The page written into the model for a content key that is not a uniform page's: the
    real page's leading NULs and the 6 bytes after them (harness.pagekey), its digest, 0x01,
    then zeros. Pages are equal exactly when their keys are, and ordered as memcmp orders the
    real pages whenever those differ within that head (the trees' order). Pages with as many
    leading NULs have one shape, so the model compares them without building them
    (ksm_model.content.compare's fast path); the 0x01 keeps a digest ending in NUL bytes from
    changing that shape. Any other 16 bytes (a test's made-up key) are framed whole as
    0x01 + key + 0x01 + zeros, which no real key's page equals."""
    nuls = PAGE - int.from_bytes(key[:2], "big")
    real = 0 <= nuls <= MAX_NULS
    body = bytes(nuls) + key[2:] + b"\x01" if real else b"\x01" + key + b"\x01"
    return body + bytes(PAGE - len(body))


def _write_pages(proc: Any, addr: int, keys: np.ndarray, changed: np.ndarray) -> int:
    """Write the changed pages; a run of pages of one uniform byte becomes one fill()."""
    idx = np.flatnonzero(changed).tolist()
    i = 0
    while i < len(idx):
        first = idx[i]
        key = _full(keys[first])
        byte = UNIFORM_KEYS.get(key)
        if byte is None:
            proc.write(addr + first * PAGE, model_page(key))
            i += 1
            continue
        j = i + 1
        while j < len(idx) and idx[j] == idx[j - 1] + 1 and keys[idx[j]] == keys[first]:
            j += 1
        proc.fill(addr + first * PAGE, (j - i) * PAGE, byte)
        i = j
    return len(idx)


def _full(k: bytes) -> bytes:
    """numpy S16 drops trailing NUL bytes on access; put them back."""
    return k.ljust(KEY_SIZE, b"\0")


def sharing_matrix(caps: list[ProcessCapture]) -> np.ndarray:
    """m[i][j]: pages of process i whose content also occurs in process j (i != j); m[i][i]:
    pages of i whose content occurs more than once inside i. From the capture (the model's view
    of memory), for the guest-by-guest heatmap."""
    counts = [c.key_counts() for c in caps]
    n = len(caps)
    m = np.zeros((n, n), dtype=np.int64)
    for i in range(n):
        for j in range(n):
            if i == j:
                m[i][j] = sum(c for c in counts[i].values() if c > 1)
            else:
                other = counts[j]
                m[i][j] = sum(c for k, c in counts[i].items() if k in other)
    return m
