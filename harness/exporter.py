"""Prometheus exporter: a custom Collector that reads KSM at scrape time.

Every series carries `source` ("kernel" or "model") and `host`, so the real kernel and the model
of the same host sit side by side. Names follow node_exporter's ksmd collector, in base units,
with prefix `ksm_`. Each file is read on its own: a read error drops that one series and bumps
ksm_exporter_read_errors_total; it never fails the scrape.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from harness.errors import HarnessError
from harness.ksm.backend import KsmBackend
from harness.ksm.types import PAGE_SIZE, Counters, derive

LABELS = ("source", "host")
PROCESS_LABELS = ("source", "host", "pid", "name")


@dataclass(frozen=True)
class Metric_:
    """How one KSM file becomes one series: name, type, HELP and a scale to base units."""

    file: str
    name: str
    help: str
    counter: bool = False
    scale: float = 1.0


# (file, metric, help): the HELP texts paraphrase Documentation/admin-guide/mm/ksm.rst.
METRICS: tuple[Metric_, ...] = (
    Metric_("pages_shared", "ksm_pages_shared", "KSM pages in use: distinct merged contents."),
    Metric_("pages_sharing", "ksm_pages_sharing", "Extra mappings of KSM pages: pages saved."),
    Metric_("pages_unshared", "ksm_pages_unshared", "Pages unique but checked repeatedly."),
    Metric_("pages_volatile", "ksm_pages_volatile", "Pages changing too fast to be merged."),
    Metric_("full_scans", "ksm_full_scans", "Full passes ksmd made over mergeable memory.", True),
    Metric_("pages_scanned", "ksm_pages_scanned", "Pages ksmd compared or merged.", True),
    Metric_("pages_skipped", "ksm_pages_skipped", "Pages smart scan passed over.", True),
    Metric_("stable_node_chains", "ksm_stable_node_chains", "KSM pages over max_page_sharing."),
    Metric_("stable_node_dups", "ksm_stable_node_dups", "Duplicate KSM pages held in chains."),
    Metric_("ksm_zero_pages", "ksm_zero_pages", "Empty pages merged with the kernel zero page."),
    Metric_(
        "general_profit",
        "ksm_general_profit_bytes",
        "Memory KSM saves minus its metadata cost, in bytes (can be negative).",
    ),
    Metric_("run", "ksm_run", "ksmd state: 0 stopped, 1 merging, 2 unmerging."),
    Metric_("pages_to_scan", "ksm_pages_to_scan", "Pages ksmd scans per batch."),
    Metric_("sleep_millisecs", "ksm_sleep_seconds", "ksmd sleep between batches.", scale=1e-3),
    Metric_("max_page_sharing", "ksm_max_page_sharing", "Most mappings one KSM page may have."),
    Metric_("merge_across_nodes", "ksm_merge_across_nodes", "1 if pages merge across NUMA nodes."),
    Metric_("use_zero_pages", "ksm_use_zero_pages", "1 if empty pages merge with the zero page."),
    Metric_("smart_scan", "ksm_smart_scan", "1 if ksmd skips pages that did not merge recently."),
    Metric_(
        "stable_node_chains_prune_millisecs",
        "ksm_stable_node_chains_prune_seconds",
        "Interval between prunes of stale stable-node chains.",
        scale=1e-3,
    ),
    Metric_("advisor_max_cpu", "ksm_advisor_max_cpu_percent", "Advisor: ksmd CPU ceiling."),
    Metric_(
        "advisor_min_pages_to_scan",
        "ksm_advisor_min_pages_to_scan",
        "Advisor: lower bound it may set pages_to_scan to.",
    ),
    Metric_(
        "advisor_max_pages_to_scan",
        "ksm_advisor_max_pages_to_scan",
        "Advisor: upper bound it may set pages_to_scan to.",
    ),
    Metric_(
        "advisor_target_scan_time",
        "ksm_advisor_target_scan_time_seconds",
        "Advisor: the full-scan time it aims for.",
    ),
)

PROCESS_METRICS = (
    ("merging_pages", "ksm_process_merging_pages", "Pages of this process merged by KSM.", 1),
    ("rmap_items", "ksm_process_rmap_items", "KSM reverse-map items of this process.", 1),
    ("zero_pages", "ksm_process_zero_pages", "Pages of this process merged with zero page.", 1),
    ("process_profit", "ksm_process_profit_bytes", "KSM profit of this process, in bytes.", 1),
)


@dataclass
class ExportTarget:
    """One backend to export, the host it describes, and the processes to watch (pid -> name)."""

    backend: KsmBackend
    host: str = field(default_factory=socket.gethostname)
    watch: Callable[[], Mapping[int, str]] | None = None


class KsmCollector(Collector):
    """Reads every target at scrape time; see the module docstring."""

    def __init__(self, targets: Sequence[ExportTarget]) -> None:
        if not targets:
            raise HarnessError("the exporter needs at least one KSM backend")
        self.targets = list(targets)
        self._errors: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()  # scrapes may run concurrently in the HTTP server threads

    def _error(self, t: ExportTarget) -> None:
        key = (t.backend.source, t.host)
        self._errors[key] = self._errors.get(key, 0) + 1

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            yield from self._collect()

    def _collect(self) -> Iterable[Metric]:
        families: dict[str, GaugeMetricFamily | CounterMetricFamily] = {}
        for m in METRICS:
            cls = CounterMetricFamily if m.counter else GaugeMetricFamily
            families[m.file] = cls(m.name, m.help, labels=LABELS)
        saved = GaugeMetricFamily(
            "ksm_saved_bytes",
            "Memory saved by KSM: (pages_sharing + ksm_zero_pages) x page size, in bytes.",
            labels=LABELS,
        )
        advisor = GaugeMetricFamily(
            "ksm_advisor_mode", "1 for the selected advisor mode.", labels=(*LABELS, "mode")
        )
        procs = [
            GaugeMetricFamily(name, text, labels=PROCESS_LABELS)
            for _, name, text, _ in PROCESS_METRICS
        ]
        for t in self.targets:
            labels = [t.backend.source, t.host]
            values: dict[str, int | str | None] = {}
            for m in METRICS:
                try:
                    values[m.file] = t.backend.read_field(m.file)
                except HarnessError:
                    self._error(t)
                    continue
                v = values[m.file]
                if isinstance(v, int):
                    families[m.file].add_metric(labels, v * m.scale if m.scale != 1 else v)
            self._add_saved(saved, labels, values, t.backend.page_size)
            self._add_advisor(advisor, labels, t)
            self._add_processes(procs, labels, t)
        yield from families.values()
        yield saved
        yield advisor
        yield from procs
        errors = CounterMetricFamily(
            "ksm_exporter_read_errors",
            "KSM files or process stats the exporter failed to read.",
            labels=LABELS,
        )
        for t in self.targets:
            key = (t.backend.source, t.host)
            errors.add_metric(list(key), self._errors.get(key, 0))
        yield errors

    @staticmethod
    def _add_saved(
        fam: GaugeMetricFamily,
        labels: list[str],
        values: Mapping[str, int | str | None],
        page_size: int,
    ) -> None:
        sharing = values.get("pages_sharing")
        zero = values.get("ksm_zero_pages")
        if isinstance(sharing, int):
            c = Counters(pages_sharing=sharing, ksm_zero_pages=zero if isinstance(zero, int) else 0)
            fam.add_metric(labels, derive(c, page_size or PAGE_SIZE).saved_bytes or 0)

    def _add_advisor(self, fam: GaugeMetricFamily, labels: list[str], t: ExportTarget) -> None:
        try:
            mode = t.backend.read_field("advisor_mode")
        except HarnessError:
            self._error(t)
            return
        if isinstance(mode, str):
            for m in ("none", "scan-time"):
                fam.add_metric([*labels, m], 1 if m == mode else 0)

    def _add_processes(
        self, fams: list[GaugeMetricFamily], labels: list[str], t: ExportTarget
    ) -> None:
        if t.watch is None:
            return
        for pid, name in sorted(t.watch().items()):
            try:
                stat = t.backend.ksm_stat(pid)
            except (OSError, ValueError, HarnessError):
                self._error(t)
                continue
            for fam, (attr, *_rest) in zip(fams, PROCESS_METRICS, strict=True):
                value = getattr(stat, attr)
                if value is not None:
                    fam.add_metric([*labels, str(pid), name], value)


def parse_listen(listen: str) -> tuple[str, int]:
    """'127.0.0.1:9712' -> ('127.0.0.1', 9712); '[::1]:9712' and ':9712' (loopback) too."""
    host, sep, port = listen.rpartition(":")
    # isascii: str.isdigit() is also true of '²', which int() refuses.
    ok = sep and port.isascii() and port.isdigit() and len(port) <= 5
    if not ok or not 0 <= int(port) <= 65535:
        raise HarnessError(
            f"bad listen address {listen!r}", hint="use HOST:PORT, e.g. 127.0.0.1:9712"
        )
    host = host.strip("[]") or "127.0.0.1"
    return host, int(port)


def serve(
    targets: Sequence[ExportTarget], listen: str = "127.0.0.1:9712"
) -> tuple[WSGIServer, threading.Thread]:
    """Start the HTTP endpoint in a daemon thread; returns the server (shutdown() to stop)."""
    host, port = parse_listen(listen)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(KsmCollector(targets))
    try:
        return start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise HarnessError(
            f"cannot listen on {listen}: {exc.strerror}", hint="choose another --listen port"
        ) from None
