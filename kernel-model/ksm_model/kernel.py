"""Kernel: the global KSM state, ksmd on a virtual clock, and the process table."""

from __future__ import annotations

import errno

from ksm_model import scanner, stable, thp
from ksm_model.advisor import Advisor
from ksm_model.jiffies import jiffies_at, msecs_to_jiffies, sleep_end_ns
from ksm_model.lru import LruBatches
from ksm_model.process import Process
from ksm_model.profiles import Profile, resolve
from ksm_model.rbtree import RBTree
from ksm_model.sysfs import COUNTER_FILES, Sysfs
from ksm_model.unstable import Unstable

KSM_RUN_MERGE = 1
KSM_RUN_UNMERGE = 2


class Kernel:
    """A model of one kernel's KSM: sysfs knobs/counters, ksmd, processes.

    Virtual time: ksmd runs a batch of pages_to_scan, which costs ``cpu_ns_per_batch +
    pages * cpu_ns_per_page`` of model CPU time, then sleeps sleep_millisecs as the kernel
    does: rounded up to jiffies at ``hz`` and ended by the timer wheel (see jiffies.py).
    ``advance`` and ``run_until`` follow that timeline; ``now`` is the clock in seconds.

    ``hz`` is the kernel's CONFIG_HZ (the model does no I/O: ksm_model.hostprobe reads the
    running kernel's). ``thp`` is /sys/kernel/mm/transparent_hugepage/enabled (always,
    madvise or never; see thp.py), ``thp_use_zero_page`` its use_zero_page, ``pt_reclaim``
    CONFIG_PT_RECLAIM (empty page tables freed by MADV_DONTNEED).
    """

    RMAP_ITEM_SIZE = 64  # sizeof(struct ksm_rmap_item) on 64-bit

    def __init__(
        self,
        profile: str | Profile = "latest",
        numa_nodes: int = 1,
        page_size: int = 4096,
        *,
        hz: int = 250,
        thp: str = "madvise",
        thp_use_zero_page: bool = True,
        pt_reclaim: bool = False,
    ) -> None:
        if numa_nodes < 1:
            raise ValueError("numa_nodes must be >= 1")
        if page_size < 16 or page_size > 65536 or page_size & (page_size - 1):
            raise ValueError("page_size must be a power of two, 16..65536")
        if not isinstance(hz, int) or not 1 <= hz <= 10000:
            raise ValueError("hz must be an integer, 1..10000 (CONFIG_HZ)")
        self.profile: Profile = resolve(profile)
        self.numa_nodes = numa_nodes
        self.page_size = page_size
        self.hz = hz
        # Transparent huge pages: a PMD maps page_size/8 pages (512 x 4 KiB on x86-64).
        self.hp_shift = (page_size // 8).bit_length() - 1
        self.hp_mask = (1 << self.hp_shift) - 1
        self._thp = "never"
        self.thp_enabled = thp
        self.thp_use_zero_page = thp_use_zero_page
        # CONFIG_PT_RECLAIM (6.14+): MADV_DONTNEED of a whole block frees its page table.
        self.pt_reclaim = pt_reclaim
        # tunables
        self.run = 0
        self.pages_to_scan = 100
        self.sleep_millisecs = 20
        self.max_page_sharing = 256
        self.stable_node_chains_prune_millisecs = 2000
        self.use_zero_pages = False
        self.merge_across_nodes = 1
        self.smart_scan = True
        self.advisor = Advisor()
        # counters
        self.pages_shared = 0
        self.pages_sharing = 0
        self.pages_unshared = 0
        self.ksm_rmap_items = 0
        self.pages_scanned = 0
        # Page visits by kind (scanner.VISIT_KINDS: first, unique, merged, joined, chained);
        # they sum to pages_scanned. Bookkeeping for cost models only: nothing depends on them.
        self.visits = [0, 0, 0, 0, 0]
        # Dups of stable_node_chains examined by stable tree walks (stable_node_dup): with
        # every dup full, each search through a chain examines all of them. Bookkeeping too.
        self.dups_walked = 0
        # Bumped when max_page_sharing changes, which can alter every walk through a chain's
        # dups (a change of one dup only resets its chain's memo): stable.py, StableNode.memo.
        self.stable_gen = 0
        self.pages_skipped = 0
        self.stable_node_chains = 0
        self.stable_node_dups = 0
        self.ksm_zero_pages = 0
        self.seqnr = 0
        self.cow_ksm = 0  # /proc/vmstat cow_ksm
        # trees and the mm_slot list
        self.stable_trees = [RBTree() for _ in range(numa_nodes)]
        self.unstable = Unstable(numa_nodes)
        self.mm_list: list[Process] = []
        self.cursor: Process | None = None  # None: the list head (between full scans)
        self.lru = LruBatches(self.profile.lru_batch)  # see new_page()
        self.scan_addr = 0
        # processes and time
        self._procs: dict[int, Process] = {}
        self._next_pid = 1000
        self.now_ns = 0
        self.ksmd_runtime_ns = 0
        self.cpu_ns_per_page = 5000
        self.cpu_ns_per_batch = 10000
        self._next_batch_ns: int | None = None
        self.sysfs = Sysfs(self)

    @property
    def thp_enabled(self) -> str:
        """transparent_hugepage/enabled: "always", "madvise" or "never"."""
        return self._thp

    @thp_enabled.setter
    def thp_enabled(self, mode: str) -> None:
        if mode not in thp.MODES:
            raise ValueError(f"thp mode {mode!r}: use always, madvise or never")
        self._thp = mode

    # -- processes ----------------------------------------------------------------------------
    def spawn(self, name: str = "proc") -> Process:
        """A new process with an empty address space."""
        return self._new_process(name)

    def _new_process(self, name: str) -> Process:
        pid = self._next_pid
        self._next_pid += 1
        p = Process(self, pid, name)
        self._procs[pid] = p
        return p

    def _reap(self, p: Process) -> None:
        self._procs.pop(p.pid, None)

    def process(self, pid: int) -> Process:
        """The live process with this pid (ProcessLookupError if none)."""
        try:
            return self._procs[pid]
        except KeyError:
            raise ProcessLookupError(errno.ESRCH, f"no process with pid {pid}") from None

    @property
    def processes(self) -> list[Process]:
        """Live processes, by pid."""
        return [self._procs[p] for p in sorted(self._procs)]

    # -- mm_slot list -------------------------------------------------------------------------
    def ksm_enter(self, mm: Process) -> None:
        """__ksm_enter: insert the new slot just before the cursor (tail during run=2)."""
        if self.run & KSM_RUN_UNMERGE or self.cursor is None:
            self.mm_list.append(mm)
        else:
            self.mm_list.insert(self.mm_list.index(self.cursor), mm)
        mm.registered = True

    def ksm_exit(self, mm: Process) -> None:
        """__ksm_exit: free an idle slot now, else move it right after the cursor."""
        if not mm.registered or self.cursor is mm:
            return
        self.mm_list.remove(mm)
        if not mm.rmap.count:
            mm.registered = False
            mm.merge_any = False
            return
        pos = 0 if self.cursor is None else self.mm_list.index(self.cursor) + 1
        self.mm_list.insert(pos, mm)

    # -- per-CPU LRU batches -------------------------------------------------------------
    def new_page(self, mm: Process, pn: int) -> None:
        """A small page was just allocated at (mm, pn) (write fault, copy-on-write, unshare).

        It goes into the LRU batch of the CPU mm runs on (Process.cpu), whose extra reference
        makes write_protect_page() fail until the batch fills up or is drained (lru.py). Pages
        allocated between full scans are drained (lru_add_drain_all) before ksmd sees them.
        """
        if self.cursor is not None:
            self.lru.add(mm.cpu, (mm, pn))

    def merge_blocked(self, mm: Process, pn: int) -> bool:
        """write_protect_page() would fail: the page is still in an LRU batch."""
        return bool(self.lru.pending) and (mm, pn) in self.lru.pending

    def lru_other_allocations(self, n: int, cpu: int = 0) -> None:
        """`n` small folios allocated on `cpu` by tasks outside the model.

        They share that CPU's LRU batch with the model's pages, so they decide when it fills
        up and is drained: the real kernel's result for a page allocated mid-scan depends on
        them, and a caller that knows nothing about them can try every count from 0 to
        lru_batch-1 to get the kernel's possible outcomes.
        """
        if n < 0:
            raise ValueError("n must be >= 0")
        if self.cursor is None:
            return  # drained at the start of the next full scan anyway
        for _ in range(n):
            self.lru.add(cpu, None)

    # -- zero pages ---------------------------------------------------------------------------
    def map_zero_page(self, mm: Process) -> None:
        if self.profile.zero_pages_counted:
            self.ksm_zero_pages += 1
            mm.ksm_zero_pages += 1

    def unmap_zero_page(self, mm: Process) -> None:
        """ksm_might_unmap_zero_page: a KSM zero-page PTE was zapped, copied or unshared."""
        if self.profile.zero_pages_counted:
            self.ksm_zero_pages -= 1
            mm.ksm_zero_pages -= 1

    # -- run=2 ----------------------------------------------------------------------------------
    def unmerge_all(self) -> None:
        """unmerge_and_remove_all_rmap_items + remove_all_stable_nodes; full_scans = 0."""
        for mm in list(self.mm_list):
            if not mm.exiting:
                for v in mm.vmas:
                    if v.mergeable and v.anon:
                        mm._unmerge(v)
            scanner.remove_all_items(self, mm)
            if mm.exiting:
                self.mm_list.remove(mm)
                mm.registered = False
                mm.merge_any = False
        stable.remove_all(self)
        self.unstable.reset(0, hard=True)
        self.lru.drain_all()
        self.seqnr = 0
        self.cursor = None
        self.scan_addr = 0

    # -- counters -------------------------------------------------------------------------------
    @property
    def pages_volatile(self) -> int:
        v = self.ksm_rmap_items - self.pages_shared - self.pages_sharing - self.pages_unshared
        return max(v, 0)

    @property
    def general_profit(self) -> int:
        zero = self.ksm_zero_pages if self.profile.zero_pages_counted else 0
        return (self.pages_sharing + zero) * self.page_size - (
            self.ksm_rmap_items * self.RMAP_ITEM_SIZE
        )

    @property
    def full_scans(self) -> int:
        return self.seqnr

    def counters(self) -> dict[str, int]:
        """Every counter file of this profile, as ints."""
        return {
            name: int(self.sysfs.read(name)) for name in self.profile.files if name in COUNTER_FILES
        }

    # -- ksmd and the clock -----------------------------------------------------------------
    @property
    def now(self) -> float:
        """Virtual time in seconds."""
        return self.now_ns / 1e9

    @property
    def jiffies(self) -> int:
        """The kernel's jiffies at the model's clock (jiffy 0 starts at time 0)."""
        return jiffies_at(self.now_ns, self.hz)

    def msecs_to_jiffies(self, ms: int) -> int:
        """msecs_to_jiffies() at this kernel's hz (rounded up)."""
        return msecs_to_jiffies(ms, self.hz)

    def ksmd_should_run(self) -> bool:
        return bool(self.run & KSM_RUN_MERGE) and bool(self.mm_list)

    def wake_ksmd(self) -> None:
        """End ksmd's current sleep (sleep_millisecs write)."""
        self._next_batch_ns = self.now_ns

    def _batch(self, budget: int) -> int:
        done = scanner.do_scan(self, budget)
        cost = self.cpu_ns_per_batch + done * self.cpu_ns_per_page
        self.now_ns += cost
        self.ksmd_runtime_ns += cost
        self._next_batch_ns = sleep_end_ns(self.now_ns, self.sleep_millisecs, self.hz)
        return done

    def scan_pages(self, n: int) -> int:
        """One ksmd batch of at most n pages; returns the pages handed to cmp_and_merge_page.

        Does nothing (returns 0) when ksmd would not run (run has no MERGE bit, or no mm is
        registered). Ends early at the end of a full scan.
        """
        if n < 0:
            raise ValueError("n must be >= 0")
        if not self.ksmd_should_run():
            return 0
        return self._batch(n)

    def advance(self, seconds: float) -> None:
        """Let `seconds` of virtual time pass with ksmd running as the kernel's would."""
        if seconds < 0:
            raise ValueError("seconds must be >= 0")
        end = self.now_ns + round(seconds * 1e9)
        while self.ksmd_should_run():
            nxt = self._next_batch_ns
            if nxt is None or nxt < self.now_ns:
                nxt = self.now_ns
            if nxt > end:
                break
            self.now_ns = nxt
            self._batch(self.pages_to_scan)
        if not self.ksmd_should_run():
            self._next_batch_ns = None
        self.now_ns = max(self.now_ns, end)

    def run_until(self, full_scans: int, max_batches: int | None = None) -> None:
        """Run ksmd batches (with their sleeps) until full_scans reaches `full_scans`."""
        batches = 0
        while self.seqnr < full_scans:
            if not self.ksmd_should_run():
                raise RuntimeError("ksmd is not running (write run=1 and register a process first)")
            if self.pages_to_scan == 0:
                raise RuntimeError("pages_to_scan is 0: ksmd never completes a scan")
            if max_batches is not None and batches >= max_batches:
                raise RuntimeError(f"full_scans={self.seqnr} after {batches} batches")
            nxt = self._next_batch_ns
            if nxt is not None and nxt > self.now_ns:
                self.now_ns = nxt
            self._batch(self.pages_to_scan)
            batches += 1
