"""Processes (mm_structs): VMAs, page tables, madvise/prctl, fork and exit.

Memory operations change page tables only; KSM's counters are *not* touched here (the kernel
updates them when ksmd next walks the mm), except ksm_zero_pages, which follows the PTEs.
"""

from __future__ import annotations

import errno
import os
from bisect import bisect_right
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ksm_model import content, stable, thp
from ksm_model.pages import KZERO, Page
from ksm_model.rmap import Rmap

if TYPE_CHECKING:
    from ksm_model.kernel import Kernel

MADV_DONTNEED = 4
MADV_MERGEABLE = 12
MADV_UNMERGEABLE = 13
MADV_HUGEPAGE = 14
MADV_NOHUGEPAGE = 15

# Top-down mmap placement below this address (in pages), as x86-64 Linux does for a process.
_MMAP_BASE = 0x7F0000000000


def _err(code: int) -> OSError:
    return OSError(code, os.strerror(code))


class Vma:
    """A private anonymous VMA [start, end) in page numbers."""

    __slots__ = ("anon", "end", "mergeable", "nid", "pages", "start", "thp")

    def __init__(self, start: int, end: int, nid: int, mergeable: bool) -> None:
        self.start = start
        self.end = end
        self.nid = nid
        self.mergeable = mergeable  # VM_MERGEABLE
        self.anon = False  # has an anon_vma (was ever write-faulted)
        self.thp = 0  # thp.HUGE (VM_HUGEPAGE), thp.NOHUGE (VM_NOHUGEPAGE) or 0
        self.pages: list[Any] = [None] * (end - start)

    def split(self, at: int) -> Vma:
        """Cut at page `at`; self keeps [start, at), the returned VMA is [at, end)."""
        tail = Vma.__new__(Vma)
        tail.start, tail.end, tail.nid = at, self.end, self.nid
        tail.mergeable, tail.anon, tail.thp = self.mergeable, self.anon, self.thp
        cut = at - self.start
        tail.pages = self.pages[cut:]
        del self.pages[cut:]
        self.end = at
        return tail


class Process:
    """A process with its own mm. Create with Kernel.spawn() or Process.fork()."""

    def __init__(self, kernel: Kernel, pid: int, name: str) -> None:
        self.kernel = kernel
        self.pid = pid
        self.name = name
        self.vmas: list[Vma] = []
        self._starts: list[int] = []
        self.registered = False  # MMF_VM_MERGEABLE: has an mm_slot
        self.merge_any = False  # MMF_VM_MERGE_ANY (prctl)
        self.exiting = False
        self.thp_disable = False  # PR_SET_THP_DISABLE (MMF_DISABLE_THP), inherited by fork
        self.cpu = 0  # the CPU this process runs on (whose LRU batch its new pages join)
        self.blocks: dict[int, Any] = {}  # huge-page block -> what its PMD holds (thp.py)
        self.nlarge = 0  # blocks mapping a large folio (thp.HugeMap)
        self.ksm_rmap_items = 0
        self.ksm_merging_pages = 0
        self.ksm_zero_pages = 0
        # What fork copied into the three counts above on a kernel without the fork reset
        # (profile fork_resets_counters False): they never go back to the real figures.
        self.inherited = (0, 0, 0)
        self.rmap = Rmap()  # this mm's rmap_items, by address (rmap.py)

    def __repr__(self) -> str:
        return f"<Process pid={self.pid} name={self.name!r}>"

    # -- VMA bookkeeping ------------------------------------------------------------------
    def _reindex(self) -> None:
        self.vmas.sort(key=lambda v: v.start)
        self._starts = [v.start for v in self.vmas]

    def find_vma(self, pn: int) -> Vma | None:
        """The VMA containing page number `pn`."""
        i = bisect_right(self._starts, pn) - 1
        if i >= 0 and self.vmas[i].end > pn:
            return self.vmas[i]
        return None

    def _split_range(
        self, lo: int, hi: int, change: Callable[[Vma], bool] | None = None
    ) -> tuple[list[Vma], bool]:
        """Split VMAs at lo and hi; return the VMAs inside [lo, hi) and whether gaps exist.

        With `change`, only the VMAs it is true for are split and returned (madvise leaves a
        VMA whose flags would not change alone). A cut inside a huge page splits its PMD.
        """
        out: list[Vma] = []
        changed = False
        for at in (lo, hi):
            for v in list(self.vmas):
                if v.start < at < v.end and (change is None or change(v)):
                    self.vmas.append(v.split(at))
                    thp.split_pmd(self.kernel, self, at)
                    changed = True
            if changed:
                self._reindex()
        covered = 0
        for v in self.vmas:
            if v.start < hi and v.end > lo:
                covered += min(v.end, hi) - max(v.start, lo)
                if v.start >= lo and v.end <= hi and (change is None or change(v)):
                    out.append(v)
        return out, covered != hi - lo

    def _range(self, addr: int, length: int) -> tuple[int, int]:
        ps = self.kernel.page_size
        if addr % ps or length < 0:
            raise _err(errno.EINVAL)
        return addr // ps, (addr + length + ps - 1) // ps

    def _check_alive(self) -> None:
        if self.exiting:
            raise ProcessLookupError(errno.ESRCH, f"process {self.pid} has exited")

    # -- mmap / munmap ------------------------------------------------------------------------
    def mmap(self, length: int, node: int = 0, align: int = 0) -> int:
        """mmap(NULL, length, PROT_READ|PROT_WRITE, MAP_PRIVATE|MAP_ANONYMOUS): the address.

        Placed top-down like Linux (highest gap below the mmap base that fits). Like 6.7+
        (profile thp_align_anon), a length that is a multiple of the huge page size starts on
        a huge page boundary; `align` (bytes, a power of two) asks for that boundary for any
        length, as a caller that maps more and trims gets.
        """
        self._check_alive()
        k = self.kernel
        if length <= 0 or not 0 <= node < k.numa_nodes or align < 0 or align & (align - 1):
            raise _err(errno.EINVAL)
        ps = k.page_size
        n = (length + ps - 1) // ps
        huge = 1 << k.hp_shift
        step = max(1, align // ps)
        if k.profile.thp_align_anon and n % huge == 0:
            step = max(step, huge)
        top = _MMAP_BASE // ps
        for v in reversed(self.vmas):
            if v.end <= (top - n) // step * step:
                break
            top = min(top, v.start)
        start = (top - n) // step * step
        vma = Vma(start, start + n, node, self.merge_any)  # ksm_add_vma under MERGE_ANY
        self.vmas.append(vma)
        self._reindex()
        return start * k.page_size

    def munmap(self, addr: int, length: int) -> None:
        """Unmap; the rmap_items stay (and count) until ksmd passes their addresses."""
        self._check_alive()
        if length <= 0:
            raise _err(errno.EINVAL)
        lo, hi = self._range(addr, length)
        k = self.kernel
        k.unstable.touched(k, self)
        k.lru.drain(self.cpu)  # unmap_region: lru_add_drain()
        vmas, _ = self._split_range(lo, hi)
        for v in vmas:
            self._zap(v, 0, v.end - v.start)
            self.vmas.remove(v)
        self._reindex()
        thp.unmapped(k, self, lo, hi)

    def _zap(self, v: Vma, i0: int, i1: int, reclaim: bool = False) -> None:
        k = self.kernel
        if self.blocks:
            thp.zap(k, self, v, i0, i1, reclaim)
        pages = v.pages
        for i in range(i0, i1):
            s = pages[i]
            if s is None or s.__class__ is bytes:
                pages[i] = None
                continue
            if s is KZERO:
                k.unmap_zero_page(self)
            else:
                s.mapcount -= 1
                if s.node is not None:
                    stable.touched(s.node)  # a KSM page may have gone stale
            pages[i] = None

    # -- data -----------------------------------------------------------------------------------
    def _pages_for(self, addr: int, length: int) -> list[tuple[Vma, int, int, int]]:
        """(vma, index, offset in page, byte count) per page of [addr, addr+length)."""
        ps = self.kernel.page_size
        if addr < 0 or length < 0:
            raise _err(errno.EINVAL)
        out = []
        pos, end = addr, addr + length
        while pos < end:
            pn, off = divmod(pos, ps)
            v = self.find_vma(pn)
            if v is None:
                raise _err(errno.EFAULT)
            n = min(ps - off, end - pos)
            out.append((v, pn - v.start, off, n))
            pos += n
        return out

    def write(self, addr: int, data: bytes) -> None:
        """Write bytes at any address/length inside mapped memory (EFAULT otherwise)."""
        self._check_alive()
        ps = self.kernel.page_size
        data = bytes(data)
        self.kernel.unstable.touched(self.kernel, self)
        done = 0
        for v, i, off, n in self._pages_for(addr, len(data)):
            old = content.ZERO if (s := v.pages[i]) is None or s is KZERO else _key(s)
            self._store(v, i, content.patch(old, off, data[done : done + n], ps))
            done += n

    def fill(self, addr: int, length: int, byte: int) -> None:
        """Set every byte of [addr, addr+length) to `byte` (whole pages use no memory)."""
        self._check_alive()
        ps = self.kernel.page_size
        if not 0 <= byte <= 255:
            raise ValueError("byte must be 0..255")
        key = content.UNIFORM[byte]
        self.kernel.unstable.touched(self.kernel, self)
        for v, i, off, n in self._pages_for(addr, length):
            if n == ps:
                self._store(v, i, key)
            else:
                s = v.pages[i]
                old = content.ZERO if s is None or s is KZERO else _key(s)
                self._store(v, i, content.patch(old, off, bytes([byte]) * n, ps))

    def read(self, addr: int, length: int) -> bytes:
        """Read bytes (unwritten memory reads as zeros)."""
        self._check_alive()
        k = self.kernel
        ps = k.page_size
        out = bytearray()
        for v, i, off, n in self._pages_for(addr, length):
            s = v.pages[i]
            if s is None:
                thp.fault(k, self, v, i, False)  # the zero page, or a huge (zero) page
                s = v.pages[i]
            if s is None or s is KZERO:
                out += bytes(n)
            else:
                out += content.materialize(_key(s), ps)[off : off + n]
        return bytes(out)

    def _store(self, v: Vma, i: int, key: bytes) -> None:
        """A write fault + store: copy-on-write of KSM / shared / zero pages."""
        s = v.pages[i]
        v.anon = True
        if s.__class__ is bytes:
            v.pages[i] = key  # an exclusive anonymous page is written in place
            return
        k = self.kernel
        if s is None:
            # (A block that already has a page table needs no look at THP.)
            if self.blocks.get((v.start + i) >> k.hp_shift) is not thp.PTE and thp.fault(
                k, self, v, i, True
            ):
                v.pages[i] = key  # a new huge page, written in place
                return
            # else a new small page is faulted in
        elif s is KZERO:
            k.unmap_zero_page(self)  # wp_page_copy of a KSM zero page
        elif s.node is not None or s.mapcount > 1:
            # KSM pages are never reused (wp_can_reuse_anon_folio); shared ones are copied.
            if s.node is not None:
                k.cow_ksm += 1
            elif self.nlarge:
                thp.unmap_subpage(k, self, v.start + i)  # COW of a shared huge page's subpage
            s.mapcount -= 1
            if s.node is not None:
                stable.touched(s.node)
        else:
            v.pages[i] = key  # an anonymous page mapped only here is reused in place
            return
        v.pages[i] = key
        k.new_page(self, v.start + i)

    # -- madvise / prctl ------------------------------------------------------------------------
    def madvise(self, addr: int, length: int, advice: int) -> None:
        """madvise(2) for MADV_MERGEABLE/UNMERGEABLE (also DONTNEED, [NO]HUGEPAGE)."""
        self._check_alive()
        if advice not in (
            MADV_MERGEABLE,
            MADV_UNMERGEABLE,
            MADV_DONTNEED,
            MADV_HUGEPAGE,
            MADV_NOHUGEPAGE,
        ):
            raise _err(errno.EINVAL)
        lo, hi = self._range(addr, length)
        if lo == hi:
            return
        k = self.kernel
        if advice in (MADV_UNMERGEABLE, MADV_DONTNEED):
            k.unstable.touched(k, self)
        if advice == MADV_DONTNEED:
            # Zaps without touching the VMAs; zap_page_range_single drains this CPU's batch.
            k.lru.drain(self.cpu)
            vmas, gaps = self._split_range(lo, hi, _never)
            for v in self.vmas:
                if v.start < hi and v.end > lo:
                    i0, i1 = max(lo, v.start) - v.start, min(hi, v.end) - v.start
                    self._zap(v, i0, i1, k.pt_reclaim)
        elif advice in (MADV_HUGEPAGE, MADV_NOHUGEPAGE):
            flag = thp.HUGE if advice == MADV_HUGEPAGE else thp.NOHUGE
            vmas, gaps = self._split_range(lo, hi, lambda v: v.thp != flag)
            for v in vmas:
                v.thp = flag  # VM_HUGEPAGE and VM_NOHUGEPAGE exclude each other
        elif advice == MADV_MERGEABLE:
            vmas, gaps = self._split_range(lo, hi, lambda v: not v.mergeable)
            for v in vmas:
                if not self.registered:
                    k.ksm_enter(self)
                v.mergeable = True
        else:
            vmas, gaps = self._split_range(lo, hi, lambda v: v.mergeable)
            for v in vmas:
                if v.anon:
                    self._unmerge(v)
                v.mergeable = False
        if gaps:
            raise _err(errno.ENOMEM)

    def _unmerge(self, v: Vma) -> None:
        """unmerge_ksm_pages: break_ksm on every KSM page (and KSM zero page, 6.6+)."""
        k = self.kernel
        pages = v.pages
        for i, s in enumerate(pages):
            if s is None or s.__class__ is bytes:
                continue
            if s is KZERO:
                if k.profile.unshare_zero_pages:
                    k.unmap_zero_page(self)
                    pages[i] = content.ZERO
                    k.new_page(self, v.start + i)
            elif s.node is not None:
                s.mapcount -= 1
                stable.touched(s.node)
                pages[i] = s.key  # FAULT_FLAG_UNSHARE: a private copy
                k.new_page(self, v.start + i)

    def set_memory_merge(self, enable: bool) -> None:
        """prctl(PR_SET_MEMORY_MERGE, enable): EINVAL on kernels before 6.4."""
        self._check_alive()
        k = self.kernel
        if not k.profile.prctl:
            raise _err(errno.EINVAL)
        if enable:
            if self.merge_any:
                return
            if not self.registered:
                k.ksm_enter(self)
            self.merge_any = True
            for v in self.vmas:
                v.mergeable = True
        else:
            if not self.merge_any:
                return
            k.unstable.touched(k, self)
            for v in self.vmas:
                if v.mergeable:
                    if v.anon:
                        self._unmerge(v)
                    v.mergeable = False
            self.merge_any = False

    def get_memory_merge(self) -> bool:
        """prctl(PR_GET_MEMORY_MERGE)."""
        self._check_alive()
        if not self.kernel.profile.prctl:
            raise _err(errno.EINVAL)
        return self.merge_any

    # -- fork / exit ------------------------------------------------------------------------------
    def fork(self, name: str | None = None) -> Process:
        """fork(): the child shares every page copy-on-write and inherits KSM registration."""
        self._check_alive()
        k = self.kernel
        child = k._new_process(name if name is not None else self.name)
        reset = k.profile.fork_resets_counters
        if not reset:
            # dup_mm copies the mm_struct: the child starts with the parent's KSM counts.
            child.ksm_rmap_items = self.ksm_rmap_items
            child.ksm_merging_pages = self.ksm_merging_pages
            child.ksm_zero_pages = self.ksm_zero_pages
            child.inherited = (self.ksm_rmap_items, self.ksm_merging_pages, self.ksm_zero_pages)
        if self.registered:
            k.ksm_enter(child)  # ksm_fork, before the VMAs are copied
            child.merge_any = self.merge_any
        child.thp_disable, child.cpu = self.thp_disable, self.cpu
        for v in self.vmas:
            c = Vma(v.start, v.end, v.nid, v.mergeable)
            c.anon, c.thp = v.anon, v.thp
            pages, cpages = v.pages, c.pages
            for i, s in enumerate(pages):
                if s is None:
                    continue
                if s.__class__ is bytes:
                    s = Page(s, 1, v.nid)
                    pages[i] = s
                if s is KZERO:
                    # The copied PTE keeps its KSM zero-page marker and is counted as one
                    # more KSM zero page (measured on 6.18; see notes/diff-findings F1);
                    # without the fork fix the child's count is the parent's copy, and the
                    # global one does not grow.
                    if reset:
                        k.map_zero_page(child)
                else:
                    s.mapcount += 1
                cpages[i] = s
            child.vmas.append(c)
        child._reindex()
        thp.forked(k, self, child)
        k.lru.forked(self, child)
        return child

    def exit(self) -> None:
        """exit(): ksm_exit (slot handling), then every mapping is zapped."""
        self._check_alive()
        k = self.kernel
        k.unstable.touched(k, self)
        self.exiting = True
        k.ksm_exit(self)
        k.lru.drain(self.cpu)  # exit_mmap: lru_add_drain()
        thp.exited(self)
        for v in self.vmas:
            self._zap(v, 0, v.end - v.start)
        self.vmas = []
        self._starts = []
        k._reap(self)

    # -- THP and CPU ------------------------------------------------------------------------------
    def set_thp_disable(self, disable: bool) -> None:
        """prctl(PR_SET_THP_DISABLE): no huge page faults in this mm (inherited by fork)."""
        self._check_alive()
        self.thp_disable = bool(disable)

    def thp_fault_fails(self, addr: int, length: int) -> None:
        """The kernel could not allocate a huge page for these blocks: the next huge page
        fault in each not yet faulted block of [addr, addr+length) falls back to a small page.

        For replaying a real process's layout (a block that is not a THP there) and for
        testing allocation failures.
        """
        self._check_alive()
        lo, hi = self._range(addr, length)
        shift = self.kernel.hp_shift
        if hi > lo:
            for b in range(lo >> shift, ((hi - 1) >> shift) + 1):
                self.blocks.setdefault(b, thp.FAIL)

    def set_cpu(self, cpu: int) -> None:
        """sched_setaffinity to one CPU: its new pages join that CPU's LRU batch."""
        self._check_alive()
        if not isinstance(cpu, int) or cpu < 0:
            raise ValueError("cpu must be an integer >= 0")
        self.cpu = cpu

    def anon_huge_bytes(self, addr: int | None = None, length: int | None = None) -> int:
        """AnonHugePages of /proc/PID/smaps (bytes), over [addr, addr+length) or everything."""
        self._check_alive()
        if addr is None or length is None:
            return thp.anon_huge_bytes(self.kernel, self, 0, 1 << 62)
        lo, hi = self._range(addr, length)
        return thp.anon_huge_bytes(self.kernel, self, lo, hi)

    # -- /proc/PID/ksm_stat ---------------------------------------------------------------------
    def ksm_mergeable(self) -> bool:
        """Any VMA currently VM_MERGEABLE."""
        return any(v.mergeable for v in self.vmas)

    def ksm_stat(self) -> dict[str, int | bool]:
        """The fields of /proc/PID/ksm_stat for the kernel's profile."""
        self._check_alive()
        k = self.kernel
        out: dict[str, int | bool] = {"ksm_rmap_items": self.ksm_rmap_items}
        prof = k.profile
        if prof.zero_pages_counted:
            out["ksm_zero_pages"] = self.ksm_zero_pages
        if prof.general_profit:
            out["ksm_merging_pages"] = self.ksm_merging_pages
            zero = self.ksm_zero_pages if prof.zero_pages_counted else 0
            out["ksm_process_profit"] = (
                self.ksm_merging_pages + zero
            ) * k.page_size - self.ksm_rmap_items * k.RMAP_ITEM_SIZE
        if prof.ksm_stat_flags:
            out["ksm_merge_any"] = self.merge_any
            out["ksm_mergeable"] = self.ksm_mergeable()
        return out

    def ksm_stat_text(self) -> str:
        """/proc/PID/ksm_stat exactly as the kernel prints it."""
        lines = []
        for name, value in self.ksm_stat().items():
            if isinstance(value, bool):
                lines.append(f"{name}: {'yes' if value else 'no'}")
            else:
                lines.append(f"{name} {value}")
        return "".join(line + "\n" for line in lines)

    def ksm_merging_pages_file(self) -> int:
        """/proc/PID/ksm_merging_pages (5.19+)."""
        self._check_alive()
        return self.ksm_merging_pages


def _never(v: Vma) -> bool:
    return False


def _key(s: Any) -> bytes:
    key: bytes = s if s.__class__ is bytes else s.key
    return key
