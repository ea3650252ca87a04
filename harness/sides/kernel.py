"""The kernel side: the host's real KSM through SysfsBackend."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from harness import procfs
from harness.errors import HarnessError, ScanTimeout
from harness.ksm.backend import BackendBase
from harness.ksm.sysfs import SysfsBackend
from harness.record import ScanPoint, Snapshot, stat_record
from harness.waiting import wait_until


class KernelSide:
    """The real KSM; leads every comparison it is part of."""

    source = "kernel"

    def __init__(
        self, backend: SysfsBackend, proc: Path = procfs.PROC, *, scan_samples: bool = False
    ) -> None:
        self.backend = backend
        self.page_size = backend.page_size
        self.proc = proc
        self.guests: dict[int, str] = {}
        self.scans_seen = backend.read_counters().full_scans or 0
        self.scans_total = 0  # full scans since the run began (run=2 does not reset it)
        # Frozen end-of-scan samples during waits, as the differential runner takes them.
        self.scan_samples = scan_samples
        self._scan_log: list[ScanPoint] = []
        self._t0 = time.monotonic()
        self._ksmd = procfs.ksmd_pid(proc)

    def watch(self, guests: Mapping[int, str]) -> None:
        self.guests = dict(guests)

    @contextmanager
    def hold(self) -> Iterator[int]:
        paused = False
        if self.backend.read_tunables().run == 1:
            self.backend.apply({"run": 0})  # returns once the batch in progress ended
            paused = True
        try:
            cur = self.backend.read_counters().full_scans or 0
            # run=2 resets full_scans on current kernels: count from zero then.
            delta = cur - self.scans_seen if cur >= self.scans_seen else cur
            self.scans_seen = cur
            self.scans_total += delta
            yield delta
        finally:
            if paused:
                self.backend.apply({"run": 1})

    def follow(self, scans: int) -> None:
        """The kernel never follows: its ksmd runs on its own."""

    def counters(self) -> dict[str, int]:
        return self.backend.read_counters().present()

    def snapshot(self) -> Snapshot:
        stats = {}
        for pid, name in self.guests.items():
            try:
                stats[name] = stat_record(self.backend.ksm_stat(pid))
            except HarnessError:
                continue  # the guest is gone: its row is missing, not zero
        return Snapshot(self.backend.read_counters().as_dict(), stats)

    def knobs(self) -> dict[str, int | str]:
        return self.backend.read_tunables().present()

    def scanning(self) -> bool:
        return self.backend.read_tunables().run == 1

    def apply(self, values: Mapping[str, int | str]) -> None:
        self.backend.apply(values)
        self.scans_seen = self.backend.read_counters().full_scans or 0

    def wait_full_scans(self, n: int, timeout: float) -> None:
        if not self.scan_samples or self.backend.read_tunables().run != 1:
            self.backend.wait_full_scans(n, timeout)
            return
        deadline = time.monotonic() + timeout
        for _ in range(n):
            self._frozen_scan_sample(deadline)

    def _frozen_scan_sample(self, deadline: float) -> None:
        """Wait for the next scan's end, pause ksmd at once and keep that state, but only when
        it is provably the end of the scan: full_scans did not move again and no page was
        visited between seeing the scan end and the pause taking effect (as the differential
        scenario runner proves its samples)."""
        b = self.backend
        start = b.read_counters().full_scans or 0

        def ended() -> tuple[int | None, ...] | None:
            c = b.read_counters()
            return (
                (c.full_scans, c.pages_scanned, c.pages_skipped) if c.full_scans != start else None
            )

        seen = wait_until(
            ended,
            max(0.0, deadline - time.monotonic()),
            interval=0.001,
            error=lambda: ScanTimeout(
                f"no full scan ended within the wait (full_scans stayed {start})",
                hint="is run=1? raise pages_to_scan or lower sleep_millisecs",
            ),
        )
        b.apply({"run": 0})  # returns once the batch in progress (if any) ended
        try:
            c = b.read_counters()
            if (c.full_scans, c.pages_scanned, c.pages_skipped) == seen:
                scans = (c.full_scans or 0) - self.scans_seen
                self._scan_log.append(
                    ScanPoint(self.scans_total + scans, c.as_dict(), time.monotonic() - self._t0)
                )
        finally:
            b.apply({"run": 1})

    def drain_scans(self) -> list[ScanPoint]:
        out, self._scan_log = self._scan_log, []
        return out

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    def clock(self) -> float:
        return time.monotonic()

    def ksmd_cpu_seconds(self) -> float | None:
        if self._ksmd is None:
            return None
        try:
            return procfs.task_cpu_seconds(self._ksmd, self.proc)  # schedstat: ns, not ticks
        except HarnessError:
            return None

    def exported(self) -> tuple[BackendBase, Mapping[int, str]]:
        return self.backend, dict(self.guests)
