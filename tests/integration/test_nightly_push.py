"""`ksmh run --push`: a real run on real KSM pushed to a real Pushgateway, scraped by a real
Prometheus through the generated config, the series queried back and the dashboard's nightly row
answered. Both servers listen on loopback at free ports and are stopped at the end."""

from __future__ import annotations

import json
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from harness.cli import main
from harness.monitoring.config import ScrapeSettings, write_config
from harness.monitoring.dashboard import dashboard, queries
from harness.monitoring.rules import RuleSettings
from harness.pytest_plugin import require
from harness.remote.inventory import parse_inventory
from harness.run import Popen, spawn
from tests.integration.conftest import free_port
from tests.integration.prom import Prometheus, prometheus, wait_http

pytestmark = [pytest.mark.prometheus, pytest.mark.ksm_kernel, pytest.mark.qemu]

GATEWAY = "prometheus-pushgateway"
# Small and quick (about 20 s here), with a sweep so every nightly panel has a series.
PLAYBOOK = """\
name: nightly-tiny
description: 2 guests fill 16 MiB identical; then a short pages_to_scan sweep.
fleet: {count: 2, memory_mib: 128, image: busybox, backend: qemu, accel: auto}
ksm: {pages_to_scan: 4000, sleep_millisecs: 10, smart_scan: 1, use_zero_pages: 0}
phases:
  - name: fill
    steps:
      - fill: {region: a, size: 16MiB, pattern: "byte:0x5a"}
      - ksm: {run: 1}
      - wait: {full_scans: +3}
      - expect: ["saved_bytes >= 15MiB", "kernel ~= model within 2%: pages_sharing"]
  - name: sweep
    steps:
      - sweep: {pages_to_scan: [2000, 8000], tolerance: 1%, timeout: 120}
"""
SCRAPE = ScrapeSettings(scrape_interval="1s", evaluation_interval="1s", file_sd_refresh="1s")


@contextmanager
def pushgateway(workdir: Path) -> Iterator[tuple[str, Popen[bytes]]]:
    """A Pushgateway on a free loopback port, its state in workdir, until the block ends."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log_path = workdir / "pushgateway.log"
    log = log_path.open("wb")
    # Debian's build persists to /var/lib/prometheus/pushgateway.data by default: keep it here.
    argv = [GATEWAY, f"--web.listen-address=127.0.0.1:{port}",
            f"--persistence.file={workdir / 'pushgateway.data'}"]  # fmt: skip
    proc = spawn(argv, stdout=log, stderr=log)
    try:
        wait_http(f"http://127.0.0.1:{port}/-/ready", proc, 30, log_path.read_text)
        yield f"127.0.0.1:{port}", proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except Exception:
            proc.kill()
            proc.wait(10)
        log.close()


def _value(rows: list[dict[str, Any]]) -> float:
    (row,) = rows
    return float(row["value"][1])


def _until(p: Prometheus, expr: str) -> list[dict[str, Any]]:
    rows = p.wait_for(expr, timeout=30)
    assert rows, f"no series for {expr}"
    return rows


def test_a_pushed_run_is_queried_back_from_prometheus(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    require("prometheus", None if shutil.which(GATEWAY) else
            f"{GATEWAY} not found (apt-get install prometheus-pushgateway)")  # fmt: skip
    inventory = parse_inventory(
        f"defaults: {{user: root, key_file: /dev/null}}\nhosts:\n  alpha:\n"
        f"    address: 127.0.0.1\n    exporter: {{listen: '127.0.0.1:{free_port()}'}}\n",
        tmp_path / "inventory.yaml",
    )
    pb = tmp_path / "nightly-tiny.yaml"
    pb.write_text(PLAYBOOK)
    with pushgateway(tmp_path / "pg") as (target, gateway):
        cfg = tmp_path / "cfg"
        write_config(inventory, cfg, RuleSettings(), SCRAPE, pushgateway=target)
        with prometheus((cfg / "prometheus.yml").read_text(), cfg) as prom:
            code = main(["run", str(pb), "--out", str(tmp_path / "r"), "--export", "off",
                         "--push", f"http://{target}"])  # fmt: skip
            out = capsys.readouterr().out
            assert code == 0, out
            (run_dir,) = (tmp_path / "r").iterdir()
            run = json.loads((run_dir / "run.json").read_text())
            push = run["push"]
            host = socket.gethostname()
            assert push["ok"] is True and push["error"] is None
            assert push["grouping_key"] == {"playbook": "nightly-tiny", "host": host}
            assert (
                f"pushed {push['series']} series to http://{target} "
                f"(job ksm_nightly, playbook=nightly-tiny, host={host})"
            ) in out.splitlines()
            figures = {"push": push, "boot": run["boot"], "sweeps": run["phases"][1]["sweeps"]}
            print(json.dumps(figures))
            _check_series(prom, run)
            _check_dashboard_row(prom)
        assert gateway.poll() is None  # still up until its block ends
    assert gateway.poll() is not None


def _check_series(prom: Prometheus, run: dict[str, Any]) -> None:
    sel = 'job="ksm_nightly", playbook="nightly-tiny"'
    rows = _until(prom, f'ksm_nightly_verdict{{{sel}, status="passed"}}')
    assert _value(rows) == 1.0
    assert rows[0]["metric"]["host"] == socket.gethostname()  # honor_labels kept the push's
    assert _value(prom.query(f'ksm_nightly_verdict{{{sel}, status="failed"}}')) == 0.0
    assert _value(prom.query(f"ksm_nightly_exit_status{{{sel}}}")) == 0.0
    assert _value(prom.query(f"ksm_nightly_duration_seconds{{{sel}}}")) == run["duration_seconds"]
    fill, sweep = run["phases"]
    kernel_end = sweep["counters"]["kernel"]["end"]
    saved = prom.query(f'ksm_nightly_saved_bytes{{{sel}, source="kernel"}}')
    assert _value(saved) == kernel_end["saved_bytes"]
    pages = prom.query(
        f'ksm_nightly_phase_pages{{{sel}, phase="fill", source="model", counter="pages_sharing"}}'
    )
    assert _value(pages) == fill["counters"]["model"]["end"]["pages_sharing"]
    delta = prom.query(f'ksm_nightly_kernel_minus_model_pages{{{sel}, phase="fill", '
                       'counter="pages_sharing"}')  # fmt: skip
    k, m = (fill["counters"][s]["end"]["pages_sharing"] for s in ("kernel", "model"))
    assert _value(delta) == k - m
    got = {
        r["metric"]["value"]: float(r["value"][1])
        for r in prom.query(f"ksm_nightly_sweep_converge_seconds{{{sel}}}")
    }
    (points,) = [s["points"] for s in sweep["sweeps"]]
    assert got == {str(p["value"]): p["seconds"] for p in points}
    cpu = prom.query(f"ksm_nightly_sweep_ksmd_cpu_seconds{{{sel}}}")
    assert {r["metric"]["value"] for r in cpu} == {"2000", "8000"}
    boot = prom.query(f"ksm_nightly_guest_boot_seconds{{{sel}}}")
    assert _value(boot) == run["boot"]["median"]
    (info,) = prom.query(f"ksm_nightly_run_info{{{sel}}}")
    assert info["metric"]["run_id"] == run["run_id"]
    assert info["metric"]["harness_revision"] == run["provenance"]["harness_revision"]
    assert info["metric"]["playbook_digest"] == run["provenance"]["playbook_digest"]
    assert prom.query(f"push_time_seconds{{{sel}}}")  # the gateway's own, per group


def _check_dashboard_row(prom: Prometheus) -> None:
    """Every query of the Nightly row answers, with Grafana's All for both variables."""
    exprs = queries(dashboard(), rows=("Nightly",))
    assert len(exprs) == 8
    for title, expr in exprs:
        concrete = expr.replace("$host", ".*").replace("$playbook", ".*")
        assert _until(prom, concrete), title
    (not_passing,) = prom.query(exprs[0][1].replace("$host", ".*").replace("$playbook", ".*"))
    assert float(not_passing["value"][1]) == 0.0
