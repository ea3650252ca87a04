"""The twin's own series, read at scrape time from Twin.snapshot() (harness.twin.live).

ksm_model_delta{host, source, counter}        kernel - model (or - what-if) at the last sync
ksm_model_delta_ratio{host, source, counter}  the same, relative to the kernel's value
ksm_twin_capture_seconds{host}                 the last capture's duration
ksm_twin_captured_pages{host}                  present pages it captured
ksm_twin_captured_processes{host}              processes it captured
ksm_twin_read_pages{host}                      of them, read (the rest: unchanged KSM pages)
ksm_twin_lag_full_scans{host}                  full scans the kernel is ahead of the models
ksm_twin_capture_every_full_scans{host}        N: a capture every N full scans now
ksm_twin_captures_total{host}
ksm_twin_scans_skipped_total{host}             kernel scans the model did not replay
ksm_twin_cpu_seconds_total{host}               the twin's own CPU time
ksm_twin_errors_total{host}
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from harness.twin.live import Twin, ratio


class TwinCollector(Collector):
    """See the module docstring."""

    def __init__(self, twin: Twin, host: str) -> None:
        self.twin = twin
        self.host = host

    def collect(self) -> Iterable[Metric]:
        stats, models = self.twin.snapshot()
        h = [self.host]
        delta = GaugeMetricFamily(
            "ksm_model_delta",
            "Kernel minus model for one KSM counter, at the twin's last sync.",
            labels=("host", "source", "counter"),
        )
        rel = GaugeMetricFamily(
            "ksm_model_delta_ratio",
            "Kernel minus model, relative to the kernel's value, at the twin's last sync.",
            labels=("host", "source", "counter"),
        )
        kernel = self.twin.last_kernel()
        for source, d, _cpu in models:
            for counter, value in sorted(d.items()):
                delta.add_metric([self.host, source, counter], value)
                rel.add_metric([self.host, source, counter], ratio(value, kernel.get(counter)))
        yield delta
        yield rel
        gauges = (
            ("ksm_twin_capture_seconds", "Duration of the twin's last capture.", "capture_seconds"),
            ("ksm_twin_captured_pages", "Present pages in the last capture.", "captured_pages"),
            ("ksm_twin_captured_processes", "Processes in the last capture.", "captured_processes"),
            ("ksm_twin_read_pages", "Pages the last capture read and hashed.", "pages_read"),
            ("ksm_twin_lag_full_scans", "Full scans the kernel is ahead of the twin.",
             "lag_full_scans"),
            ("ksm_twin_capture_every_full_scans", "The twin captures every N full scans.",
             "every"),
        )  # fmt: skip
        for name, text, attr in gauges:
            g = GaugeMetricFamily(name, text, labels=("host",))
            g.add_metric(h, getattr(stats, attr))
            yield g
        counters = (
            ("ksm_twin_captures", "Captures the twin made.", "captures"),
            ("ksm_twin_scans_skipped", "Kernel full scans the model did not replay (CPU budget).",
             "scans_skipped"),
            ("ksm_twin_cpu_seconds", "CPU time of the twin itself.", "cpu_seconds"),
            ("ksm_twin_errors", "Syncs that failed (the last error is logged).", "errors"),
        )  # fmt: skip
        for name, text, attr in counters:
            c = CounterMetricFamily(name, text, labels=("host",))
            c.add_metric(h, getattr(stats, attr))
            yield c
