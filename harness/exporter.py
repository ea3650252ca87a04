"""Prometheus exporter: a custom Collector that reads KSM at scrape time.

Every series carries `source` ("kernel" or "model") and `host`, so the real kernel and the model
of the same host sit side by side. Names follow node_exporter's ksmd collector, in base units,
with prefix `ksm_`. Each file is read on its own: a read error drops that one series and bumps
ksm_exporter_read_errors_total; it never fails the scrape.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from harness.errors import HarnessError
from harness.ksm.backend import KsmBackend
from harness.ksm.types import PAGE_SIZE, Counters, derive

LABELS = ("source", "host")
PROCESS_LABELS = ("source", "host", "pid", "name")
PAIR_LABELS = ("source", "host", "a", "b")


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
    # ksmd's CPU seconds so far: measured on the kernel, estimated for a model (None: unknown)
    cpu: Callable[[], float | None] | None = None
    # Opt-in (it reads every KSM user's page tables): the sharing matrix for
    # ksm_cross_group_shared_pages, e.g. harness.doctor.exposure.SharingProbe.
    sharing: Callable[[], Any] | None = None


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
        cpu = CounterMetricFamily(
            "ksm_ksmd_cpu_seconds",
            "CPU time of ksmd: measured (/proc/<ksmd>/schedstat) for the kernel, the model's "
            "estimate on the host's calibration for a model.",
            labels=LABELS,
        )
        pairs = GaugeMetricFamily(
            "ksm_cross_group_shared_pages",
            "Distinct KSM pages mapped by processes of both groups a and b (a < b).",
            labels=PAIR_LABELS,
        )
        for t in self.targets:
            labels = [t.backend.source, t.host]
            self._add_cpu(cpu, labels, t)
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
            self._add_pairs(pairs, labels, t)
        yield from families.values()
        yield saved
        yield cpu
        yield advisor
        yield from procs
        if any(t.sharing is not None for t in self.targets):
            yield pairs
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

    def _add_cpu(self, fam: CounterMetricFamily, labels: list[str], t: ExportTarget) -> None:
        if t.cpu is None:
            return
        try:
            value = t.cpu()
        except (OSError, HarnessError):
            self._error(t)
            return
        if value is not None:
            fam.add_metric(labels, value)

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

    def _add_pairs(self, fam: GaugeMetricFamily, labels: list[str], t: ExportTarget) -> None:
        if t.sharing is None:
            return
        try:
            matrix = t.sharing()
        except (OSError, HarnessError):
            self._error(t)
            return
        for a, b, pages in matrix.pairs():
            fam.add_metric([*labels, a, b], pages)


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


IDLE_TIMEOUT = 10.0  # seconds a connection may sit without completing its request
MAX_CONNECTIONS = 16  # connections served at once; more are answered 503 and closed


class _Handler(WSGIRequestHandler):
    """No request log on stderr; the socket timeout closes a connection that stalls."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


class BoundedServer(ThreadingMixIn, WSGIServer):
    """A thread per connection, at most `max_connections` at once, idle ones closed.

    prometheus_client's own server has neither bound: a client that opens connections and
    sends nothing (or sends slowly) would hold a thread each for ever.
    """

    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self, addr: tuple[str, int], family: int, idle_timeout: float, max_connections: int
    ) -> None:
        self.address_family = family
        self.idle_timeout = idle_timeout
        self.slots = threading.BoundedSemaphore(max_connections)
        super().__init__(addr, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            with contextlib.suppress(OSError):
                request.sendall(
                    b"HTTP/1.0 503 Service Unavailable\r\nContent-Length: 0\r\n"
                    b"Connection: close\r\n\r\n"
                )
            self.shutdown_request(request)
            return
        request.settimeout(self.idle_timeout)
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that timed out or went away is not worth a traceback on stderr."""


def serve_registry(
    registry: CollectorRegistry,
    listen: str,
    hint: str = "choose another --listen port",
    idle_timeout: float = IDLE_TIMEOUT,
    max_connections: int = MAX_CONNECTIONS,
) -> tuple[BoundedServer, threading.Thread]:
    """Serve `registry` on HOST:PORT in a daemon thread (server.shutdown() to stop)."""
    host, port = parse_listen(listen)
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        server = BoundedServer((host, port), family[0][0], idle_timeout, max_connections)
    except OSError as exc:
        raise HarnessError(f"cannot listen on {listen}: {exc.strerror or exc}", hint=hint) from None
    server.set_app(make_wsgi_app(registry))
    thread = threading.Thread(target=server.serve_forever, name="ksmh-exporter", daemon=True)
    thread.start()
    return server, thread


def serve(
    targets: Sequence[ExportTarget], listen: str = "127.0.0.1:9712", **limits: Any
) -> tuple[BoundedServer, threading.Thread]:
    """Start the HTTP endpoint in a daemon thread; returns the server (shutdown() to stop)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(KsmCollector(targets))
    return serve_registry(registry, listen, **limits)
