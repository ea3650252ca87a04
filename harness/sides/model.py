"""The model side: a ModelBackend fed by shadow capture of the guests (harness.shadow).

It follows the kernel (capture, replay what changed, make as many full scans as ksmd made), or
leads in a model-only run (the playbook's waits step its ksmd in virtual time). The exporter
never touches the model, which is not thread-safe: it reads a ModelSnapshot that this side
publishes after every change.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from harness import procfs
from harness.errors import HarnessError, ScanTimeout
from harness.ksm.backend import BackendBase
from harness.ksm.model import ModelBackend
from harness.ksm.types import KsmStat
from harness.record import ScanPoint, Snapshot
from harness.shadow import ProcessCapture, Shadow


class ModelSnapshot(BackendBase):
    """A read-only backend over the model's last published counters, tunables and ksm_stat."""

    source = "model"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._files: dict[str, str] = {}
        self._stats: dict[int, KsmStat] = {}

    def publish(self, files: Mapping[str, str], stats: Mapping[int, KsmStat]) -> None:
        with self._lock:
            self._files = dict(files)
            self._stats = dict(stats)

    def _read(self, name: str) -> str | None:
        with self._lock:
            return self._files.get(name)

    def _write(self, name: str, text: str) -> None:
        raise PermissionError(13, "the model snapshot is read-only")

    def ksm_stat(self, pid: int) -> KsmStat:
        with self._lock:
            stat = self._stats.get(pid)
        if stat is None:
            raise HarnessError(f"no model process {pid} in the snapshot")
        return stat


class ModelSide:
    """One model Kernel, its shadow of the guests, and the snapshot the exporter reads."""

    source = "model"

    def __init__(
        self,
        model: ModelBackend,
        proc: Path = procfs.PROC,
        *,
        include_others: bool = True,
        fallback_hugepage: bool = False,
        max_scans_per_capture: int = 0,
    ) -> None:
        self.model = model
        self.page_size = model.page_size
        self.shadow = Shadow(model.kernel, proc, fallback_hugepage=fallback_hugepage)
        self.published = ModelSnapshot()
        self.proc = proc
        self.cap = max_scans_per_capture
        self.include_others = include_others
        self.guests: dict[int, str] = {}  # real pid -> guest name
        self.last_caps: list[ProcessCapture] = []
        self.scans_total = 0  # full scans made since the run began (the kernel's numbering)
        self._scan_log: list[ScanPoint] = []
        self.stats: dict[str, float] = {
            "captures": 0,
            "bytes": 0,
            "capture_seconds": 0.0,
            "replay_seconds": 0.0,
            "model_seconds": 0.0,
            "model_scans": 0,
            "skipped_scans": 0,
            "pages_vanished": 0,
            "others": 0,
        }
        self.publish()

    @property
    def profile(self) -> str:
        return self.model.profile

    def watch(self, guests: Mapping[int, str]) -> None:
        self.guests = dict(guests)

    def targets(self) -> dict[int, str]:
        """Guests first by name, plus every other process KSM scans (its pages count in the
        kernel's global counters too)."""
        t = dict(self.guests)
        if self.include_others:
            for user in procfs.ksm_users(self.proc, exclude=set(t)):
                t[user.pid] = f"{user.comm}-{user.pid}"
        return t

    def refresh(self, caps: list[ProcessCapture] | None = None) -> None:
        """Capture the targets and replay what changed into the model. `caps`: a capture
        already made (the exporter's twin replays one capture into several models)."""
        targets = self.targets() if caps is None else {c.pid: c.name for c in caps}
        t0 = time.perf_counter()
        if caps is None:
            caps = self.shadow.capture(targets)
        self.shadow.reap(c.pid for c in caps)
        t1 = time.perf_counter()
        st = self.shadow.replay(caps)
        self.last_caps = caps
        s = self.stats
        s["captures"] += 1
        s["bytes"] += sum(c.bytes_read for c in caps)
        s["capture_seconds"] += t1 - t0
        s["replay_seconds"] += st.seconds
        s["pages_vanished"] += st.pages_vanished
        s["others"] = max(s["others"], len([p for p in targets if p not in self.guests]))

    def _step(self, scans: int) -> int:
        """Make up to `scans` full scans, one at a time, recording the counters after each."""
        t0 = time.perf_counter()
        made = 0
        while made < scans and self.model.step(1):
            made += 1
            self.scans_total += 1
            self._scan_log.append(ScanPoint(self.scans_total, self.model.read_counters().as_dict()))
        self.stats["model_seconds"] += time.perf_counter() - t0
        self.stats["model_scans"] += made
        self.publish()
        return made

    def drain_scans(self) -> list[ScanPoint]:
        out, self._scan_log = self._scan_log, []
        return out

    # -- Side ------------------------------------------------------------------------------
    @contextmanager
    def hold(self) -> Iterator[int]:
        self.refresh()
        self.publish()
        yield 0

    def follow(self, scans: int, caps: list[ProcessCapture] | None = None) -> None:
        self.refresh(caps)
        n = min(scans, self.cap) if self.cap else scans
        self.stats["skipped_scans"] += scans - n
        self.scans_total += scans - n  # keep the kernel's numbering past the scans left out
        self._step(n)

    def counters(self) -> dict[str, int]:
        return self.model.counters()

    def snapshot(self) -> Snapshot:
        stats = {name: self.model.stat_record(pid) for pid, name in self.model_pids().items()}
        return Snapshot(self.model.read_counters().as_dict(), stats)

    def knobs(self) -> dict[str, int | str]:
        return self.model.read_tunables().present()

    def scanning(self) -> bool:
        return self.model.ksmd_would_run()

    def apply(self, values: Mapping[str, int | str]) -> None:
        # The kernel side already checked and wrote these; the model mirrors whatever it has.
        have = self.model.read_tunables().present()
        mirror = {k: v for k, v in values.items() if k in have}
        if mirror:
            self.model.apply(mirror, force=True)
        self.publish()

    def wait_full_scans(self, n: int, timeout: float) -> None:
        self.refresh()  # the guests keep running: look at them again first
        if self._step(n) < n:
            raise ScanTimeout(
                "the model's ksmd is not running",
                hint="the playbook must set run=1 (and some guest must have mergeable memory)",
            )

    def sleep(self, seconds: float) -> None:
        self.refresh()
        self.model.kernel.advance(seconds)
        self.publish()

    def clock(self) -> float:
        return float(self.model.kernel.now)

    def ksmd_cpu_seconds(self) -> float | None:
        return self.model.ksmd_cpu_seconds()

    def exported(self) -> tuple[BackendBase, Mapping[int, str]]:
        return self.published, self.model_pids()

    # -- for the runner's report -------------------------------------------------------------
    def model_pids(self) -> dict[int, str]:
        """Model pid -> guest name."""
        return {
            self.shadow.twins[pid].proc.pid: name
            for pid, name in self.guests.items()
            if pid in self.shadow.twins
        }

    def publish(self) -> None:
        stats = {pid: self.model.ksm_stat(pid) for pid in self.model_pids()}
        self.published.publish(self.model.files(), stats)

    def summary(self) -> dict[str, Any]:
        s = self.stats
        mib = s["bytes"] / 2**20
        return {
            "profile": self.profile,
            "captures": int(s["captures"]),
            "mib_hashed": round(mib, 1),
            "capture_seconds": round(s["capture_seconds"], 3),
            "capture_mib_per_s": round(mib / s["capture_seconds"], 1)
            if s["capture_seconds"]
            else None,
            "replay_seconds": round(s["replay_seconds"], 3),
            "model_scans": int(s["model_scans"]),
            "model_seconds": round(s["model_seconds"], 3),
            "scans_not_replayed": int(s["skipped_scans"]),
            "pages_vanished": int(s["pages_vanished"]),
            "other_processes": int(s["others"]),
        }
