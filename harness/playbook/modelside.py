"""The model's half of a run: a ksm_model Kernel fed by shadow capture, stepped to follow the
kernel (or, in a model-only run, stepped by the playbook's waits on its own)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from harness.ksm.types import (
    COUNTER_NAMES,
    TUNABLE_NAMES,
    KsmStat,
    counters_from_mapping,
    derive,
)
from harness.playbook.live import ModelSnapshot
from harness.shadow import ProcessCapture, Shadow, registered_pids


class ModelSide:
    """One model Kernel, its shadow, its backend, and the snapshot the exporter reads."""

    def __init__(
        self,
        profile: str = "host",
        proc: Path = Path("/proc"),
        max_scans_per_capture: int = 0,
        include_others: bool = True,
        fallback_hugepage: bool = False,
    ) -> None:
        from ksm_model import Kernel
        from ksm_model.hostprobe import probe

        from harness.ksm.model import ModelBackend

        # The running kernel's CONFIG_HZ and THP mode; ksmd's CPU time so far (the advisor's
        # first step after it is switched on counts it, as the kernel does).
        host = probe(proc) if profile == "host" else None
        self.kernel = Kernel(profile=profile, **(host.kernel_args() if host else {}))
        if host is not None and host.ksmd_runtime_ns is not None:
            self.kernel.ksmd_runtime_ns = host.ksmd_runtime_ns
        self.backend = ModelBackend(self.kernel)
        self.shadow = Shadow(self.kernel, proc, fallback_hugepage=fallback_hugepage)
        self.snapshot = ModelSnapshot()
        self.proc = proc
        self.cap = max_scans_per_capture
        self.include_others = include_others
        self.guests: dict[int, str] = {}  # real pid -> guest name
        self.last_caps: list[ProcessCapture] = []
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

    @property
    def profile(self) -> str:
        return str(getattr(self.kernel.profile, "name", self.kernel.profile))

    def targets(self) -> dict[int, str]:
        """Guests first by name, plus every other process registered with the host's KSM (its
        pages count in the kernel's global counters too)."""
        t = dict(self.guests)
        if self.include_others:
            for pid, comm in registered_pids(self.proc).items():
                if pid not in t:
                    t[pid] = f"{comm}-{pid}"
        return t

    def sync(self, scans: int) -> None:
        """Capture, replay, then make `scans` full scans (capped; only while run=1)."""
        targets = self.targets()
        t0 = time.perf_counter()
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
        self.step(scans)

    def step(self, scans: int) -> int:
        """Run `scans` full scans (capped by max_scans_per_capture); returns scans made."""
        if scans <= 0 or self.kernel.run != 1 or not self.kernel.ksmd_should_run():
            self.publish()
            return 0
        n = min(scans, self.cap) if self.cap else scans
        self.stats["skipped_scans"] += scans - n
        t0 = time.perf_counter()
        self.kernel.run_until(full_scans=self.kernel.full_scans + n)
        self.stats["model_seconds"] += time.perf_counter() - t0
        self.stats["model_scans"] += n
        self.publish()
        return n

    def counters(self) -> dict[str, int]:
        c: dict[str, int] = self.kernel.counters()
        return c

    def guest_stats(self) -> dict[str, KsmStat]:
        """Guest name -> its model twin's ksm_stat."""
        out = {}
        for pid, name in self.guests.items():
            twin = self.shadow.twins.get(pid)
            if twin is not None:
                out[name] = self.backend.ksm_stat(twin.proc.pid)
        return out

    def model_pids(self) -> dict[int, str]:
        """Model pid -> guest name (for the exporter's per-process series)."""
        return {
            self.shadow.twins[pid].proc.pid: name
            for pid, name in self.guests.items()
            if pid in self.shadow.twins
        }

    def publish(self) -> None:
        files: dict[str, str] = {}
        for name in (*COUNTER_NAMES, *TUNABLE_NAMES):
            try:
                files[name] = self.kernel.sysfs.read(name)
            except FileNotFoundError:
                continue
        stats = {
            self.shadow.twins[pid].proc.pid: self.backend.ksm_stat(self.shadow.twins[pid].proc.pid)
            for pid in self.guests
            if pid in self.shadow.twins
        }
        self.snapshot.publish(files, stats)

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


def counters_with_derived(c: Mapping[str, int | None], page_size: int = 4096) -> dict[str, Any]:
    """Counters plus saved_bytes / sharing_ratio / waste_ratio (as in harness.ksm.types.derive)."""
    d = derive(counters_from_mapping(dict(c)), page_size)
    return {
        **c,
        "saved_bytes": d.saved_bytes,
        "sharing_ratio": d.sharing_ratio,
        "waste_ratio": d.waste_ratio,
    }
