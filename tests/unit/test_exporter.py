"""The Prometheus collector against fake sysfs trees, read through the text exposition."""

from __future__ import annotations

import socket
import time
import urllib.request
from collections.abc import Callable

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from harness.errors import HarnessError
from harness.exporter import ExportTarget, KsmCollector, parse_listen, serve
from harness.ksm.sysfs import SysfsBackend

Make = Callable[[str], SysfsBackend]


def scrape(*targets: ExportTarget) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(KsmCollector(list(targets)))
    text = generate_latest(registry).decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


K = (("host", "h1"), ("source", "kernel"))


def test_every_series_with_base_units(fake_backend: Make) -> None:
    m = scrape(ExportTarget(fake_backend("linux-6.18"), host="h1"))
    assert m[("ksm_pages_shared", K)] == 2
    assert m[("ksm_pages_sharing", K)] == 298
    assert m[("ksm_pages_unshared", K)] == 7
    assert m[("ksm_pages_volatile", K)] == 5
    assert m[("ksm_full_scans_total", K)] == 17
    assert m[("ksm_pages_scanned_total", K)] == 5100
    assert m[("ksm_pages_skipped_total", K)] == 40
    assert m[("ksm_stable_node_chains", K)] == 1
    assert m[("ksm_stable_node_dups", K)] == 2
    assert m[("ksm_zero_pages", K)] == 3
    assert m[("ksm_general_profit_bytes", K)] == 1201408
    assert m[("ksm_saved_bytes", K)] == (298 + 3) * 4096
    assert m[("ksm_run", K)] == 1
    assert m[("ksm_pages_to_scan", K)] == 100
    assert m[("ksm_sleep_seconds", K)] == pytest.approx(0.02)
    assert m[("ksm_stable_node_chains_prune_seconds", K)] == pytest.approx(2.0)
    assert m[("ksm_max_page_sharing", K)] == 256
    assert m[("ksm_merge_across_nodes", K)] == 1
    assert m[("ksm_use_zero_pages", K)] == 0
    assert m[("ksm_smart_scan", K)] == 1
    assert m[("ksm_advisor_max_cpu_percent", K)] == 70
    assert m[("ksm_advisor_min_pages_to_scan", K)] == 500
    assert m[("ksm_advisor_max_pages_to_scan", K)] == 30000
    assert m[("ksm_advisor_target_scan_time_seconds", K)] == 200
    assert m[("ksm_advisor_mode", (*K[:1], ("mode", "none"), K[1]))] == 1
    assert m[("ksm_advisor_mode", (*K[:1], ("mode", "scan-time"), K[1]))] == 0
    assert m[("ksm_exporter_read_errors_total", K)] == 0


def test_negative_profit_exports(fake_backend: Make) -> None:
    m = scrape(ExportTarget(fake_backend("negative-profit"), host="h1"))
    assert m[("ksm_general_profit_bytes", K)] == -19200


def test_old_kernel_exports_what_it_has(fake_backend: Make) -> None:
    m = scrape(ExportTarget(fake_backend("linux-5.14"), host="h1"))
    assert m[("ksm_pages_sharing", K)] == 90
    assert ("ksm_general_profit_bytes", K) not in m
    assert ("ksm_smart_scan", K) not in m
    assert m[("ksm_exporter_read_errors_total", K)] == 0


def test_unreadable_file_drops_one_series_and_counts(fake_backend: Make) -> None:
    target = ExportTarget(fake_backend("unreadable"), host="h1")
    registry = CollectorRegistry(auto_describe=False)
    registry.register(KsmCollector([target]))
    for expected_errors in (1, 2):
        text = generate_latest(registry).decode()
        assert "ksm_pages_volatile{" not in text
        assert 'ksm_pages_sharing{host="h1",source="kernel"} 298.0' in text
        assert (
            f'ksm_exporter_read_errors_total{{host="h1",source="kernel"}} {expected_errors}.0'
        ) in text


def test_watched_processes(fake_backend: Make) -> None:
    b = fake_backend("linux-6.18")
    m = scrape(ExportTarget(b, host="h1", watch=lambda: {4242: "guest-1", 4343: "old"}))
    lab = (("host", "h1"), ("name", "guest-1"), ("pid", "4242"), ("source", "kernel"))
    assert m[("ksm_process_merging_pages", lab)] == 100
    assert m[("ksm_process_rmap_items", lab)] == 100
    assert m[("ksm_process_zero_pages", lab)] == 0
    assert m[("ksm_process_profit_bytes", lab)] == 403200
    old = (("host", "h1"), ("name", "old"), ("pid", "4343"), ("source", "kernel"))
    assert m[("ksm_process_merging_pages", old)] == 57
    assert ("ksm_process_rmap_items", old) not in m


def test_vanished_process_counts_an_error(fake_backend: Make) -> None:
    m = scrape(ExportTarget(fake_backend("linux-6.18"), host="h1", watch=lambda: {999999: "x"}))
    assert m[("ksm_exporter_read_errors_total", K)] == 1


def test_two_backends_side_by_side(fake_backend: Make) -> None:
    a = fake_backend("linux-6.18")
    b = fake_backend("linux-5.14")
    b.source = "model"
    m = scrape(ExportTarget(a, host="h1"), ExportTarget(b, host="h1"))
    assert m[("ksm_pages_sharing", K)] == 298
    assert m[("ksm_pages_sharing", (("host", "h1"), ("source", "model")))] == 90


def test_serve_over_http(fake_backend: Make) -> None:
    server, thread = serve([ExportTarget(fake_backend("linux-6.18"), host="h1")], "127.0.0.1:0")
    try:
        port = server.server_port
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
        assert b'ksm_pages_sharing{host="h1",source="kernel"} 298.0' in body
    finally:
        server.shutdown()
        thread.join(5)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("127.0.0.1:9712", ("127.0.0.1", 9712)), (":9", ("127.0.0.1", 9)), ("[::1]:80", ("::1", 80))],
)
def test_parse_listen(text: str, expected: tuple[str, int]) -> None:
    assert parse_listen(text) == expected


@pytest.mark.parametrize(
    "text", ["9712", "host:", "h:99999", "h:x", "127.0.0.1:\u00b2", "h:\u0663", "h:" + "9" * 4000]
)
def test_parse_listen_rejects(text: str) -> None:
    with pytest.raises(HarnessError, match="bad listen address"):
        parse_listen(text)


def test_serve_reports_a_busy_port(fake_backend: Make) -> None:
    target = ExportTarget(fake_backend("linux-6.18"), host="h1")
    server, thread = serve([target], "127.0.0.1:0")
    try:
        with pytest.raises(HarnessError, match="cannot listen on"):
            serve([target], f"127.0.0.1:{server.server_port}")
    finally:
        server.shutdown()
        thread.join(5)


def _get(port: int) -> bytes:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()


def test_idle_connections_are_closed_and_concurrent_ones_bounded(fake_backend: Make) -> None:
    """Real sockets: two silent clients hold both slots, a third is answered 503 at once; the
    silent ones are closed after the idle timeout, and the endpoint serves again."""
    target = ExportTarget(fake_backend("linux-6.18"), host="h1")
    server, thread = serve([target], "127.0.0.1:0", idle_timeout=0.5, max_connections=2)
    port = server.server_port
    start = time.monotonic()
    idle = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(2)]
    try:
        idle[0].sendall(b"GET /metrics HTTP/1.0\r\n")  # a request that never completes
        time.sleep(0.2)  # both accepted and holding their slots
        with socket.create_connection(("127.0.0.1", port), timeout=5) as third:
            assert third.recv(100).startswith(b"HTTP/1.0 503 Service Unavailable")
        for s in idle:
            assert s.recv(100) == b""  # closed by the server, not by us
        assert 0.45 < time.monotonic() - start < 3
        time.sleep(0.1)  # the handler threads release their slots
        assert b'ksm_pages_sharing{host="h1",source="kernel"} 298.0' in _get(port)
    finally:
        for s in idle:
            s.close()
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_ksmd_cpu_seconds_per_target(fake_backend: Make) -> None:
    def gone() -> float | None:
        raise HarnessError("no ksmd")

    kernel = fake_backend("linux-6.18")
    m = scrape(
        ExportTarget(kernel, host="h1", cpu=lambda: 12.5),
        ExportTarget(fake_backend("linux-5.14"), host="h2", cpu=lambda: None),
        ExportTarget(fake_backend("negative-profit"), host="h3", cpu=gone),
    )
    assert m[("ksm_ksmd_cpu_seconds_total", K)] == 12.5
    assert not any(k[0] == "ksm_ksmd_cpu_seconds_total" and ("host", "h2") in k[1] for k in m)
    assert m[("ksm_exporter_read_errors_total", (("host", "h3"), ("source", "kernel")))] == 1
    # Without a cpu reader there is no series at all (a model backend without an estimate).
    assert not any(k[0].startswith("ksm_ksmd_cpu") for k in scrape(ExportTarget(kernel)))
