"""A real Prometheus scrapes fixture exporters, evaluates the generated rules, serves the dashboard.

The exporters are harness.exporter's KsmCollector over small fake backends (a real stalled
ksmd cannot be produced on demand): `alpha` is healthy (full_scans moves on every scrape, the
model agrees), `bravo` has a stalled ksmd (run=1, full_scans flat), mostly unmergeable and
volatile pages and a model 500 pages off, `charlie` has KSM off although its inventory label
says it should be on. The test asserts exactly which alerts fire on which host, and that every
dashboard query returns data. Alert for-durations and windows are shortened to seconds.
"""

from __future__ import annotations

import errno
import json
import time
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from harness.exporter import ExportTarget, KsmCollector
from harness.ksm.backend import BackendBase
from harness.ksm.types import KsmStat
from harness.monitoring.config import ScrapeSettings, write_config
from harness.monitoring.dashboard import dashboard, queries
from harness.monitoring.rules import RuleSettings
from harness.remote.inventory import parse_inventory
from harness.twin.collector import TwinCollector
from harness.twin.live import TwinStats
from tests.integration.prom import Prometheus, prometheus

pytestmark = pytest.mark.prometheus


class DictBackend(BackendBase):
    """A KSM backend over a dict; names in `ticking` grow by one on every read (a live ksmd)."""

    def __init__(
        self, values: dict[str, int | str], source: str = "kernel", ticking: Iterable[str] = ()
    ) -> None:
        self.values = dict(values)
        self.source = source
        self.ticking = set(ticking)
        self.stats: dict[int, KsmStat] = {}

    def _read(self, name: str) -> str | None:
        if name in self.ticking:
            self.values[name] = int(self.values[name]) + 1
        v = self.values.get(name)
        return None if v is None else str(v)

    def _write(self, name: str, text: str) -> None:
        raise OSError(errno.EROFS, "fixture backend is read-only")

    def ksm_stat(self, pid: int) -> KsmStat:
        return self.stats[pid]


class DeltaCollector(Collector):
    """What the runner will export: ksm_model_delta{counter, host} = model - kernel."""

    def __init__(self, host: str, deltas: dict[str, int]) -> None:
        self.host, self.deltas = host, deltas

    def collect(self) -> Iterable[Metric]:
        fam = GaugeMetricFamily(
            "ksm_model_delta", "model minus kernel, per counter", labels=["counter", "host"]
        )
        for counter, value in self.deltas.items():
            fam.add_metric([counter, self.host], value)
        yield fam


class FixtureTwin:
    """What TwinCollector reads from a live Twin (harness.twin.live), with fixed values."""

    def __init__(self, kernel: dict[str, int]) -> None:
        self.kernel = kernel
        self.cpu = 0.0

    def snapshot(self) -> tuple[TwinStats, list[tuple[str, dict[str, int], float]]]:
        self.cpu += 0.01  # the twin's CPU counter moves, so rate() has something to say
        stats = TwinStats(captures=3, capture_seconds=0.2, captured_pages=1060, every=1,
                          captured_processes=2, pages_read=60, cpu_seconds=self.cpu)  # fmt: skip
        return stats, [
            ("model", {"pages_sharing": 2, "pages_shared": 0}, 1.5),
            ("what-if:mps16", {"pages_sharing": 40, "pages_shared": -40}, 1.6),
        ]

    def last_kernel(self) -> dict[str, int]:
        return dict(self.kernel)


BASE: dict[str, int | str] = {
    "run": 1,
    "pages_to_scan": 100,
    "sleep_millisecs": 20,
    "full_scans": 7,
    "pages_scanned": 1000,
    "ksm_zero_pages": 0,
    "general_profit": 3_000_000,
    "advisor_mode": "[none] scan-time",
}


def _exporter(
    host: str,
    counters: dict[str, int],
    model: dict[str, int] | None,
    ticking: tuple[str, ...],
    deltas: dict[str, int] | None,
    stopper: list[Callable[[], None]],
    twin: bool = False,
) -> int:
    kernel = DictBackend({**BASE, **counters}, "kernel", ticking)
    kernel.stats[4242] = KsmStat(
        pid=4242, rmap_items=300, zero_pages=0, merging_pages=250, process_profit=900_000
    )
    ticks = iter(range(10**9))
    targets = [
        ExportTarget(
            kernel, host=host, watch=lambda: {4242: f"qemu-{host}"}, cpu=lambda: next(ticks) / 100
        )
    ]
    if model is not None:
        targets.append(ExportTarget(DictBackend({**BASE, **model}, "model", ticking), host=host))
    if twin:
        # A live twin beside the kernel: the model, a what-if, and the twin's own series.
        targets[1].cpu = lambda: next(ticks) / 120
        mps16 = {**BASE, **counters, "stable_node_chains": 3, "stable_node_dups": 60}
        targets.append(ExportTarget(DictBackend(mps16, "what-if:mps16", ticking), host=host))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(KsmCollector(targets))
    if deltas is not None:
        registry.register(DeltaCollector(host, deltas))
    if twin:
        registry.register(TwinCollector(FixtureTwin(counters), host))  # type: ignore[arg-type]
    server, _thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    stopper.append(server.shutdown)
    return int(server.server_port)


HEALTHY = {"pages_shared": 100, "pages_sharing": 900, "pages_unshared": 50, "pages_volatile": 10}
TROUBLED = {
    "pages_shared": 10,
    "pages_sharing": 100,
    "pages_unshared": 5000,
    "pages_volatile": 20000,
}
OFF = {"pages_shared": 0, "pages_sharing": 0, "pages_unshared": 0, "pages_volatile": 0, "run": 0}

SETTINGS = RuleSettings(rate_window="5s", stall_window="4s", interval=None).with_for("2s")
SCRAPE = ScrapeSettings(scrape_interval="1s", evaluation_interval="1s", file_sd_refresh="1s")


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


class Prom(Prometheus):
    def firing(self) -> dict[str, set[str]]:
        alerts = _get(f"{self.url}/api/v1/alerts")["data"]["alerts"]
        out: dict[str, set[str]] = {}
        for a in alerts:
            if a["state"] == "firing":
                out.setdefault(a["labels"].get("host", "?"), set()).add(a["labels"]["alertname"])
        return out


@pytest.fixture(scope="module")
def prom(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prom]:
    d = tmp_path_factory.mktemp("prom")
    stoppers: list[Callable[[], None]] = []
    try:
        ports = {
            "alpha": _exporter(
                "alpha",
                HEALTHY,
                HEALTHY,
                ("full_scans", "pages_scanned"),
                {"pages_sharing": 0, "pages_shared": 0},
                stoppers,
                twin=True,
            ),
            "bravo": _exporter(
                "bravo",
                TROUBLED,
                {**TROUBLED, "pages_sharing": 600},
                (),
                {"pages_sharing": 500, "pages_shared": 0},
                stoppers,
            ),
            "charlie": _exporter("charlie", OFF, None, (), None, stoppers),
        }
        hosts = "".join(
            f"  {name}:\n    address: 127.0.0.1\n    port: {2200 + i}\n"
            f"    exporter: {{listen: '127.0.0.1:{port}'}}\n"
            f"    labels: {{ksm_expected: '{'false' if name == 'alpha' else 'true'}'}}\n"
            for i, (name, port) in enumerate(ports.items())
        )
        text = f"defaults: {{user: root, key_file: /dev/null}}\nhosts:\n{hosts}"
        inventory = parse_inventory(text, d / "inventory.yaml")
        cfg = d / "cfg"
        write_config(inventory, cfg, SETTINGS, SCRAPE)
        # Rewritten in place: its rule and target paths are relative to cfg.
        with prometheus((cfg / "prometheus.yml").read_text(), cfg) as p:
            yield Prom(p.url, p.proc)
    finally:
        for stop in stoppers:
            stop()


def _until(what: str, fn: Callable[[], Any], timeout: float = 40.0) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(0.5)
    raise AssertionError(f"{what}: still {last!r} after {timeout} s")


EXPECTED_ALERTS = {
    "bravo": {"KsmdStalled", "KsmWastedEffort", "KsmVolatilePagesHigh", "KsmModelDelta"},
    "charlie": {"KsmOffWhereExpected"},
}


def test_alerts_fire_exactly_on_the_troubled_hosts(prom: Prom) -> None:
    _until("expected alerts", lambda: (f := prom.firing()) == EXPECTED_ALERTS and f)
    # Several more evaluations (for: 2s) later, still exactly these: alpha, healthy, has none.
    time.sleep(3.5)
    assert prom.firing() == EXPECTED_ALERTS
    # The stalled alert is about bravo's flat full_scans, while alpha's keeps moving.
    flat = prom.query('increase(ksm_full_scans_total{source="kernel"}[4s])')
    by_host = {r["metric"]["host"]: float(r["value"][1]) for r in flat}
    assert by_host["bravo"] == 0.0 and by_host["charlie"] == 0.0 and by_host["alpha"] > 0


def test_recording_rules_compute_the_documented_figures(prom: Prom) -> None:
    def one(expr: str) -> dict[str, float]:
        rows = _until(expr, lambda: prom.query(expr))
        return {r["metric"]["host"]: float(r["value"][1]) for r in rows}

    assert one('host:ksm_saved_bytes:sum{source="kernel"}') == {
        "alpha": 900 * 4096,
        "bravo": 100 * 4096,
        "charlie": 0.0,
    }
    assert one('host:ksm_sharing_ratio:ratio{source="kernel"}') == {"alpha": 9.0, "bravo": 10.0}
    assert one('host:ksm_waste_ratio:ratio{source="kernel"}') == {"alpha": 50 / 900, "bravo": 50.0}
    assert one('host:ksm_volatile_share:ratio{source="kernel"}') == {
        "alpha": 10 / 1060,
        "bravo": 20000 / 25110,
    }
    assert one('host:ksm_model_minus_kernel:pages{counter="pages_sharing"}') == {
        "alpha": 0.0,
        "bravo": 500.0,
    }
    # The runner's delta (no source label) and the live twin's (source="model", alpha only).
    runner = 'host:ksm_model_delta:abs{counter="pages_sharing", source=""}'
    assert one(runner) == {"alpha": 0, "bravo": 500}
    twin = 'host:ksm_model_delta:abs{counter="pages_shared", source="what-if:mps16"}'
    assert one(twin) == {"alpha": 40}
    cpu = one('host:ksm_ksmd_cpu:ratio{source="kernel"}')
    assert set(cpu) == {"alpha", "bravo", "charlie"} and cpu["alpha"] > 0
    fleet = _until("fleet sum", lambda: prom.query('fleet:ksm_saved_bytes:sum{source="kernel"}'))
    assert float(fleet[0]["value"][1]) == 1000 * 4096
    rate = one('host:ksm_full_scans:rate{source="kernel"}')
    assert rate["bravo"] == 0.0 and rate["charlie"] == 0.0 and rate["alpha"] > 0


def test_every_dashboard_query_returns_data(prom: Prom) -> None:
    model = dashboard()
    # The Nightly row reads pushed runs: tests/integration/test_nightly_push.py covers it.
    exprs = queries(model, rows=("Fleet overview", "Per host", "Per guest", "Kernel vs model"))
    assert len(exprs) >= 6
    # Grafana's "All" for the host variable is the regex .*
    for title, expr in exprs:
        concrete = expr.replace("$host", ".*")
        _until(f"panel {title!r}: {concrete}", lambda e=concrete: prom.query(e))  # type: ignore[misc]
    # The host variable's own query lists every inventory host.
    values = _get(f"{prom.url}/api/v1/label/host/values?match[]=ksm_run")["data"]
    assert values == ["alpha", "bravo", "charlie"]
