"""What runs beside the runner: the model snapshot the exporter reads, the Prometheus
endpoint (KsmCollector for kernel + model, plus run-level series), and the kernel sampler.

The model is pure Python and not thread-safe, and the runner mutates it while stepping; so the
exporter never touches it: it reads a snapshot the runner publishes after every sync.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from harness.errors import HarnessError
from harness.exporter import ExportTarget, KsmCollector, serve_registry
from harness.ksm.backend import BackendBase
from harness.ksm.types import COUNTER_NAMES, KsmStat


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


class RunState:
    """Run-level facts the runner updates and RunCollector exports."""

    def __init__(self, run_id: str, playbook: str) -> None:
        self.run_id = run_id
        self.playbook = playbook
        self.phase = ""
        self.lock = threading.Lock()
        self.delta: dict[str, int] = {}  # kernel - model at the last sync
        self.guests: dict[tuple[str, str], dict[str, int | None]] = {}  # (source, guest) -> stat
        self.failed = 0


class RunCollector(Collector):
    """ksm_model_delta{counter}, per-guest series and the run's phase, at scrape time."""

    def __init__(self, state: RunState, host: str) -> None:
        self.state = state
        self.host = host

    def collect(self) -> Iterable[Metric]:
        s = self.state
        with s.lock:
            delta = dict(s.delta)
            guests = dict(s.guests)
            phase, failed = s.phase, s.failed
        fam = GaugeMetricFamily(
            "ksm_model_delta",
            "Kernel minus model for one KSM counter at the last sync point.",
            labels=("host", "counter"),
        )
        for name in COUNTER_NAMES:
            if name in delta:
                fam.add_metric([self.host, name], delta[name])
        yield fam
        for key, help_ in (
            ("merging_pages", "Pages of this guest merged by KSM (its QEMU's ksm_stat)."),
            ("rmap_items", "KSM rmap items of this guest's QEMU process."),
        ):
            g = GaugeMetricFamily(f"ksm_guest_{key}", help_, labels=("source", "host", "guest"))
            for (source, guest), stat in sorted(guests.items()):
                if stat.get(key) is not None:
                    g.add_metric([source, self.host, guest], stat[key] or 0)
            yield g
        info = GaugeMetricFamily(
            "ksm_run_phase",
            "1 for the phase the runner is in.",
            labels=("run_id", "playbook", "phase"),
        )
        info.add_metric([s.run_id, s.playbook, phase], 1)
        yield info
        f = GaugeMetricFamily("ksm_run_expectations_failed", "Expectations failed so far.")
        f.add_metric([], failed)
        yield f


def serve_run(targets: list[ExportTarget], state: RunState, host: str, listen: str) -> Any:
    """Start the run's endpoint; returns the server (call shutdown())."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(KsmCollector(targets))
    registry.register(RunCollector(state, host))
    server, _thread = serve_registry(registry, listen, hint="choose another --export address")
    return server


class Sampler(threading.Thread):
    """Calls `sample()` every `interval` seconds until stopped (kernel reads only: safe)."""

    def __init__(self, interval: float, sample: Callable[[], None]) -> None:
        super().__init__(name="sampler", daemon=True)
        self.interval = interval
        self.sample = sample
        self._stop_event = threading.Event()
        self.errors: list[str] = []

    def run(self) -> None:
        while not self._stop_event.is_set():
            t0 = time.monotonic()
            try:
                self.sample()
            except (HarnessError, OSError) as exc:
                self.errors.append(str(exc))
            self._stop_event.wait(max(0.0, self.interval - (time.monotonic() - t0)))

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=10)
