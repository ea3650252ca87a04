"""What runs beside the runner: the Prometheus endpoint (KsmCollector over every side, plus
run-level series) and the sampler of measured values between sync points.

The model is pure Python and not thread-safe, and the runner mutates it while stepping; so the
exporter never touches it: it reads the snapshot the model side publishes
(harness.sides.model.ModelSnapshot).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from harness.errors import HarnessError
from harness.exporter import ExportTarget, KsmCollector, serve_registry
from harness.ksm.types import COUNTER_NAMES
from harness.record import StatValue


class RunState:
    """Run-level facts the runner updates and RunCollector exports."""

    def __init__(self, run_id: str, playbook: str) -> None:
        self.run_id = run_id
        self.playbook = playbook
        self.phase = ""
        self.lock = threading.Lock()
        self.delta: dict[str, int] = {}  # kernel - model at the last sync
        self.guests: dict[tuple[str, str], dict[str, StatValue]] = {}  # (source, guest) -> stat
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
            field = f"ksm_{key}"  # the record format keeps the kernel's ksm_stat names
            g = GaugeMetricFamily(f"ksm_guest_{key}", help_, labels=("source", "host", "guest"))
            for (source, guest), stat in sorted(guests.items()):
                value = stat.get(field)
                if isinstance(value, int) and not isinstance(value, bool):
                    g.add_metric([source, self.host, guest], value)
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
