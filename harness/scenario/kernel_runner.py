"""Run a Scenario on the real kernel: worker processes, ksmd, LTP-style frozen samples.

The sequence (spec sections 2, 3, 12.4 and 14):
1. run=0, then run=2 to drop every previous KSM state (this also sets full_scans to 0);
2. write the tunables, plus a huge pages_to_scan so one ksmd batch is one full scan, a long
   sleep_millisecs so the counters stay at the end-of-scan state while we read them, and a
   one-hour stable_node_chains_prune_millisecs (see DEFAULT_PRUNE_MS) unless the scenario
   sets those; knobs the scenario leaves unset get the kernel's defaults and the advisor is
   turned off, whatever an earlier run left behind;
3. start the workers one at a time (each registers before the next starts), then run=1;
4. poll full_scans every millisecond; the moment it moves write run=0 (that write takes
   ksmd's mutex, so it returns only after the batch in progress), read every counter and
   each live worker's /proc/PID/ksm_stat, apply the scenario's actions, write run=1;
5. at the end kill every worker and write run=2, so no KSM state of ours is left behind.

To avoid waiting out the long sleep after each sample, the runner rewrites sleep_millisecs
alternating S and S+1, just before run=1: a changed value ends ksmd's sleep at once
(sleep_millisecs_store wakes ksm_iter_wait). Counters do not depend on the sleep length.

A sample is proven to be the end-of-scan state: after run=0 full_scans must still be the value
that was seen to change (a batch started meanwhile would be a whole scan and bump it again).

Knobs this kernel does not have (smart_scan before 6.7, ...) are not written: the scenario runs
as that kernel can run it, and a `set` action on one is refused with ENOENT, as the model of
that kernel refuses it. Where the KSM lives is behind a few methods (_pool, _await_scan,
_snapshot, _foreign): harness.kernels.guest runs the same sequence in a guest over its agent.
"""

from __future__ import annotations

import errno
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

from harness import procfs
from harness.errors import KsmWriteRefused, ScanTimeout
from harness.ksm.backend import BackendBase
from harness.ksm.sysfs import SysfsBackend
from harness.record import Snapshot, StatValue, stat_record
from harness.scenario.errors import ForeignKsmActivity, SamplingError
from harness.scenario.series import ScanSample, Series, relative
from harness.scenario.spec import (
    Action,
    Exit,
    Fork,
    RangeAction,
    Rerun,
    Scenario,
    SetTunable,
    Spawn,
    Write,
    range_of,
)
from harness.scenario.workers import WorkerPool
from harness.thp import khugepaged_pinned

# One batch must cover a whole scan; the kernel takes any u32 here.
BIG_PAGES_TO_SCAN = 4_000_000
DEFAULT_SLEEP_MS = 300
# Chain pruning depends on wall-clock time (spec section 8), which the kernel and the model's
# virtual clock do not share; one hour means "never during a run" on both sides. Scenarios may
# set it (0 = prune on every chain lookup, also deterministic).
DEFAULT_PRUNE_MS = 3_600_000
_RESET_COUNTERS = ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile")


@dataclass
class KernelRunner:
    """Runs scenarios on the real KSM behind `backend`; the caller holds the KSM lock.

    Use run_on_kernel() to have the lock and the knob save/restore taken for you.
    """

    backend: BackendBase  # a SysfsBackend here; harness.kernels.guest.GuestKsm in a guest
    python: str = sys.executable
    sleep_millisecs: int = DEFAULT_SLEEP_MS
    pages_to_scan: int = BIG_PAGES_TO_SCAN
    scan_timeout: float = 60.0
    worker_timeout: float = 30.0
    poll_seconds: float = 0.001
    _sleep: int = field(default=DEFAULT_SLEEP_MS, init=False, repr=False)
    last_pids: list[int] = field(default_factory=list, init=False, repr=False)

    def run(self, scenario: Scenario) -> Series:
        """Run the scenario and return its kernel series; always kills the workers.

        With THP processes, khugepaged is pinned for the run (harness.thp; the old interval
        goes into the run's journal).
        """
        b = self.backend
        self.check_no_foreign(set())
        huge = any(p.thp for p in scenario.processes) or any(
            isinstance(a, Spawn) and a.spec.thp for a in scenario.actions
        )
        try:
            # In a guest (harness.kernels) khugepaged is held off for good by the guest itself.
            root = b.root if isinstance(b, SysfsBackend) else None
            with (
                khugepaged_pinned(root.parent / "transparent_hugepage")
                if huge and root is not None
                else nullcontext(),
                self._pool() as pool,
            ):
                self.last_pids = pool.pids  # every worker pid of this run, for leak checks
                return self._run(scenario, pool)
        finally:
            # Killed workers' rmap_items would otherwise stay counted while ksmd is stopped.
            b.write_tunables(run=2, force=True)

    def _pool(self) -> WorkerPool:
        """The pool that starts this run's worker processes."""
        return WorkerPool(
            python=self.python, page_size=self.backend.page_size, timeout=self.worker_timeout
        )

    # -- the run ---------------------------------------------------------------------------
    def _run(self, scenario: Scenario, pool: WorkerPool) -> Series:
        b = self.backend
        b.write_tunables(run=0)
        b.write_tunables(run=2, force=True)
        self._check_reset()
        have = b.read_tunables()
        numa, advisor = have.merge_across_nodes is not None, have.advisor_mode is not None
        absent = frozenset(k for k, v in have.as_dict().items() if v is None)
        tunables = runner_tunables(
            scenario, self.pages_to_scan, self.sleep_millisecs, numa, advisor, absent
        )
        b.write_tunables(**tunables)  # type: ignore[arg-type]
        self._sleep = int(tunables["sleep_millisecs"])
        for p in scenario.processes:
            pool.start(p.name, p.pages, p.thp)
        self.check_no_foreign({h.pid for h in pool.live()})
        base = b.read_counters().as_dict()
        initial = self._snapshot(pool, base)
        samples: list[ScanSample] = []
        last = base["full_scans"] or 0
        with self._full_scans_fd() as fd:
            b.write_tunables(run=1)
            for scan in range(1, scenario.scans + 1):
                seen, visits = self._await_scan(fd, last, scan)
                end = self._snapshot(pool, base)
                self._check_frozen(scan, seen, visits, end, last)
                self._check_accounting(scan, end, {h.pid for h in pool.live()})
                actions = scenario.actions_after(scan)
                outcomes = tuple(self._apply(scenario, a, pool) for a in actions)
                after = self._snapshot(pool, base) if actions else None
                samples.append(ScanSample(scan, end, after, outcomes))
                last = b.read_counters().full_scans or 0
                if scan < scenario.scans:
                    self._resume()
        return Series("kernel", scenario, initial, tuple(samples))

    def _resume(self) -> None:
        b = self.backend
        # A changed sleep_millisecs ends ksmd's current sleep now instead of after S ms. It is
        # written while run=0: the woken ksmd finds nothing to do and waits for run, and run=1
        # then starts exactly one batch. Written after run=1 it could also wake a ksmd that
        # had been idle (a pause longer than S), had started at run=1 and already finished
        # the next scan: a second scan at once (seen on a 6.1 guest).
        current = b.read_tunables().sleep_millisecs
        b.write_tunables(sleep_millisecs=self._sleep + 1 if current == self._sleep else self._sleep)
        b.write_tunables(run=1)

    def _apply(self, scenario: Scenario, action: Action, pool: WorkerPool) -> str:
        t = self.worker_timeout
        if isinstance(action, Write):
            pages = ",".join(str(i) for i in action.pages)
            pool[action.process].request(f"write {action.content} {pages}", t)
        elif isinstance(action, RangeAction):
            first, count = range_of(action, scenario.page_count(action.process))
            pool[action.process].request(f"madvise {action.kind} {first} {count}", t)
        elif isinstance(action, Spawn):
            pool.start(action.spec.name, action.spec.pages, action.spec.thp)
        elif isinstance(action, Fork):
            pool.fork(action.process, action.child)
        elif isinstance(action, Exit):
            pool.exit(action.process)
        elif isinstance(action, Rerun):
            self.backend.write_tunables(run=2, force=True)
        elif isinstance(action, SetTunable):
            try:
                values = {action.name: action.value}
                self.backend.write_tunables(**values)  # type: ignore[arg-type]
            except KsmWriteRefused as exc:
                return refusal(exc.errno)
            if action.name == "sleep_millisecs":
                self._sleep = action.value
        return "ok"

    def _sysfs(self) -> SysfsBackend:
        if not isinstance(self.backend, SysfsBackend):
            raise TypeError(f"{type(self).__name__} needs a SysfsBackend")
        return self.backend

    def _await_scan(
        self, fd: int, last: int, scan: int
    ) -> tuple[int, tuple[int | None, int | None]]:
        """Wait until full_scans is no longer `last`, then pause ksmd (run=0, which returns
        once the batch in progress ended); returns the value seen and the visit counters read
        just before the pause, for _check_frozen."""
        seen = self._wait_change(fd, last, scan)
        visits = self._visits()
        self.backend.write_tunables(run=0)
        return seen, visits

    # -- reading ---------------------------------------------------------------------------
    def _snapshot(self, pool: WorkerPool, base: dict[str, int | None]) -> Snapshot:
        counters = relative(self.backend.read_counters().as_dict(), base)
        procs = {}
        for h in pool.live():
            procs[h.name] = self.read_stat(h.pid)
            proc = getattr(self.backend, "proc", procfs.PROC)
            procs[h.name]["anon_huge_kb"] = anon_huge_kb(proc, h.pid, h.addr, h.length)
        return Snapshot(counters=counters, processes=procs)

    def read_stat(self, pid: int) -> dict[str, StatValue]:
        """/proc/PID/ksm_stat with the kernel's field names (what ksm_model returns too)."""
        return stat_record(self.backend.ksm_stat(pid))

    @contextmanager
    def _full_scans_fd(self) -> Iterator[int]:
        """An open full_scans file for the whole run (-1 where _await_scan needs none)."""
        fd = os.open(self._sysfs().root / "full_scans", os.O_RDONLY)
        try:
            yield fd
        finally:
            os.close(fd)

    def _wait_change(self, fd: int, last: int, scan: int) -> int:
        # pread at offset 0 makes sysfs regenerate the value: one syscall per poll.
        deadline = time.monotonic() + self.scan_timeout
        while True:
            value = int(os.pread(fd, 32, 0))
            if value != last:
                return value
            if time.monotonic() > deadline:
                raise ScanTimeout(
                    f"full scan {scan} did not complete in {self.scan_timeout:g} s "
                    f"(full_scans stayed {last})",
                    hint="is another process driving /sys/kernel/mm/ksm without the lock?",
                )
            time.sleep(self.poll_seconds)

    def _visits(self) -> tuple[int | None, int | None]:
        c = self.backend.read_counters()
        return c.pages_scanned, c.pages_skipped

    def _check_frozen(
        self,
        scan: int,
        seen: int,
        visits: tuple[int | None, int | None],
        end: Snapshot,
        last: int | None = None,
    ) -> None:
        """Prove the sample is the end-of-scan state: ksmd did not start the next batch.

        A batch started before run=0 took effect either completes a scan (full_scans moves
        again, with one batch per scan) or visits pages (pages_scanned/skipped move). And
        exactly one scan completed since the last sample (`last`): two would be a sample
        missed.
        """
        if last is not None and seen != last + 1:
            raise SamplingError(
                f"F={scan}: ksmd completed {seen - last} full scans since the last sample "
                f"(full_scans {last} -> {seen}), so a sample was missed",
                hint="the host is too loaded for a frozen read; raise sleep_millisecs",
            )
        now = self._visits()
        if end.counters["full_scans"] != seen or now != visits:
            raise SamplingError(
                f"F={scan}: ksmd went on before it could be paused (full_scans {seen} -> "
                f"{end.counters['full_scans']}, scanned/skipped {visits} -> {now})",
                hint="the host is too loaded for a frozen read; raise sleep_millisecs",
            )

    def _check_reset(self) -> None:
        c = self.backend.read_counters().as_dict()
        left = {n: c[n] for n in ("full_scans", *_RESET_COUNTERS) if c[n]}
        if left:
            raise SamplingError(
                f"run=2 did not reset KSM: {left}",
                hint="something else keeps KSM state alive; see ksmh status",
            )

    def _check_accounting(self, scan: int, snap: Snapshot, pids: set[int]) -> None:
        """At a scan's end every rmap_item belongs to a live worker; more means foreign mms."""
        c = snap.counters
        total = sum(c[n] or 0 for n in _RESET_COUNTERS)
        ours = sum(int(s["ksm_rmap_items"] or 0) for s in snap.processes.values())
        if total > ours:
            raise ForeignKsmActivity(
                f"F={scan}: KSM tracks {total} rmap_items but the scenario's processes own "
                f"{ours}; other registered processes: "
                f"{self._foreign(pids) or 'none found'}",
                hint="stop the other KSM users (QEMU guests?) or wait for them; they must hold "
                "the ksm-harness lock while merging",
            )

    def _foreign(self, ours: set[int]) -> str:
        """The processes other than `ours` (and this one) that KSM scans or counts, described;
        empty when there are none."""
        found = procfs.ksm_users(self._sysfs().proc, exclude=ours | {os.getpid()})
        return procfs.describe_users(found)

    def check_no_foreign(self, ours: set[int]) -> None:
        """Raise ForeignKsmActivity if any process but `ours` is registered with KSM."""
        found = self._foreign(ours)
        if found:
            raise ForeignKsmActivity(
                "processes outside the scenario are registered with KSM: " + found,
                hint="their pages would change every counter; stop them (or wait) and retry",
            )


# The kernel's defaults for what a scenario leaves unset: a previous run on the same host may
# have left anything there, while the model always starts from these.
KERNEL_DEFAULTS = {"max_page_sharing": 256, "use_zero_pages": 0, "smart_scan": 1}
NUMA_DEFAULTS = {"merge_across_nodes": 1}  # only where the file exists (NUMA builds)
# The advisor retunes pages_to_scan from wall-clock scan times (and refuses pages_to_scan
# writes while active): always off here, where the file exists (6.8+).
ADVISOR_DEFAULTS = {"advisor_mode": "none"}


def runner_tunables(
    scenario: Scenario,
    pages_to_scan: int,
    sleep_millisecs: int,
    numa: bool,
    advisor: bool,
    absent: frozenset[str] = frozenset(),
) -> dict[str, int | str]:
    """What both runners write before run=1: defaults, timing settings, then the scenario's,
    minus the knobs this kernel (or model profile) does not have (`absent`)."""
    values: dict[str, int | str] = {
        **(ADVISOR_DEFAULTS if advisor else {}),
        **KERNEL_DEFAULTS,
        **(NUMA_DEFAULTS if numa else {}),
        "pages_to_scan": pages_to_scan,
        "sleep_millisecs": sleep_millisecs,
        "stable_node_chains_prune_millisecs": DEFAULT_PRUNE_MS,
        **scenario.tunable_values,
    }
    return {k: v for k, v in values.items() if k not in absent}


def anon_huge_kb(proc: Path, pid: int, addr: int, length: int) -> int:
    """AnonHugePages (kB) of the VMAs of `pid` inside [addr, addr+length), from smaps."""
    return sum(
        v.anon_huge_kib
        for v in procfs.smaps(pid, proc)
        if addr <= v.start and v.end <= addr + length
    )


def refusal(code: int | None) -> str:
    """Outcome text of a refused tunable write, e.g. 'refused EBUSY'."""
    if not code:
        return "refused (no errno)"
    return "refused " + errno.errorcode.get(code, str(code))


def run_on_kernel(scenario: Scenario, backend: SysfsBackend | None = None, **kw: object) -> Series:
    """Take the host-wide KSM lock (re-entrant: the pytest `ksm` fixture may hold it already),
    journal and save every knob, run the scenario, restore the knobs."""
    from harness.recovery import run_session

    b = backend or SysfsBackend()
    name = f"scenario-{scenario.name}-{os.getpid()}"
    with run_session(b, name, "scenario", echo=lambda s: print(s, file=sys.stderr)):
        return KernelRunner(b, **kw).run(scenario)  # type: ignore[arg-type]
