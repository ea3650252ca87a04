"""`ksmh export` scraped by a real Prometheus: the stored value equals sysfs."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from subprocess import Popen

import pytest

from harness.ksm.sysfs import KSM_ROOT, SysfsBackend
from harness.run import spawn
from tests.integration.conftest import free_port
from tests.integration.prom import prometheus, wait_http

Child = Callable[[int, int], Popen[bytes]]

CONFIG = """
global:
  scrape_interval: 1s
scrape_configs:
  - job_name: ksm
    static_configs:
      - targets: ["127.0.0.1:{port}"]
"""


@pytest.mark.ksm_kernel
@pytest.mark.prometheus
def test_prometheus_stores_the_sysfs_value(
    ksm: SysfsBackend, mergeable_child: Child, tmp_path: Path
) -> None:
    ksm.write_tunables(run=2, force=True)
    ksm.write_tunables(pages_to_scan=1000, sleep_millisecs=20, max_page_sharing=256)
    child = mergeable_child(40, 0x33)
    ksm.write_tunables(run=1)
    ksm.wait_full_scans(2, timeout=60)
    ksm.write_tunables(run=0)  # freeze: the value Prometheus stores must equal what we read
    sharing = int((KSM_ROOT / "pages_sharing").read_text())
    assert sharing == 39

    port = free_port()
    exporter = spawn(
        [
            sys.executable,
            "-m",
            "harness.cli",
            "export",
            "--backend",
            "kernel",
            "--listen",
            f"127.0.0.1:{port}",
            "--pid",
            str(child.pid),
            "--host",
            "testhost",
        ],
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/metrics", exporter, 20)
        with prometheus(CONFIG.format(port=port), tmp_path / "prom") as prom:
            result = prom.wait_for('ksm_pages_sharing{source="kernel"}')
            assert len(result) == 1
            assert result[0]["metric"]["host"] == "testhost"
            assert float(result[0]["value"][1]) == sharing
            merging = prom.wait_for(f'ksm_process_merging_pages{{pid="{child.pid}"}}')
            assert float(merging[0]["value"][1]) == 40
            profit = prom.query('ksm_general_profit_bytes{source="kernel"}')
            assert float(profit[0]["value"][1]) == 39 * 4096 - 40 * 64
    finally:
        exporter.terminate()
        exporter.wait(10)
