"""`ksmh run playbooks/quickstart.yaml` end to end: real TCG guests, real KSM, the model.

The runner takes the host KSM lock and restores the knobs itself, so these tests do not use
the `ksm` fixture (a second flock in the same process would wait on the first).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import socket
import urllib.request
from pathlib import Path

import pytest

from harness.ksm.lock import ksm_lock
from harness.ksm.sysfs import SysfsBackend
from harness.playbook.runner import Runner, RunOptions
from harness.playbook.schema import load_playbook
from harness.report.results import read_results

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "playbooks" / "quickstart.yaml"
FILES = ("run.json", "samples.csv", "guests.csv", "report.md")
PLOTS = ("counters.png", "convergence.png", "guests.png", "heatmap.png")


def qemu_processes_of(run_id: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if run_id.encode() in cmdline and b"qemu" in cmdline:
                found.append(int(entry.name))
    return found


def check_results_dir(directory: Path) -> dict[str, object]:
    for name in FILES:
        assert (directory / name).stat().st_size > 0, name
    for name in PLOTS:
        data = (directory / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
        assert f"]({name})" in (directory / "report.md").read_text()
    res = read_results(directory)
    assert {r["source"] for r in res.samples} >= {"model"}
    run: dict[str, object] = res.run
    return run


def check_nothing_left(run: dict[str, object]) -> None:
    fleet_id = str(run["fleet_run_id"])
    assert qemu_processes_of(fleet_id) == []
    for guest in run["guests"]:  # type: ignore[attr-defined]
        assert not os.path.exists(f"/proc/{guest['pid']}")
    assert not (Path("/run/ksm-harness/fleet") / fleet_id).exists()


@pytest.mark.ksm_kernel
@pytest.mark.qemu
def test_quickstart_on_the_real_kernel(tmp_path: Path) -> None:
    kernel = SysfsBackend()
    scraped: list[str] = []
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    url = f"http://127.0.0.1:{port}/metrics"

    def echo(line: str) -> None:
        if "ok   verify: clean" in line:  # mid-run, after the first expectation
            scraped.append(urllib.request.urlopen(url, timeout=10).read().decode())

    opts = RunOptions(backend="kernel", out=tmp_path, export=f"127.0.0.1:{port}",
                      export_required=True, echo=echo, take_lock=False)  # fmt: skip
    # Hold the host lock across the run so the knobs read before and after are ours.
    with ksm_lock():
        knobs_before = kernel.read_tunables()
        outcome = Runner(load_playbook(QUICKSTART), opts).run()
        knobs_after = kernel.read_tunables()
    assert outcome.failed == []
    assert outcome.exit_status == 0
    run = check_results_dir(outcome.directory)
    (phase,) = run["phases"]  # type: ignore[misc]
    k, m = phase["counters"]["kernel"]["end"], phase["counters"]["model"]["end"]
    for name in ("pages_shared", "pages_sharing"):
        assert abs(k[name] - m[name]) <= 0.02 * k[name], (name, k[name], m[name])
    # 4 x 16384 identical pages at least, in chains of 256.
    assert k["pages_sharing"] >= 65280
    assert [e["status"] for e in phase["expectations"]] == ["passed"] * 4
    assert run["accelerator"] in ("tcg", "kvm")
    assert all(g["thp"] is False for g in run["guests"])  # type: ignore[attr-defined]
    check_nothing_left(run)
    assert knobs_after == knobs_before
    # While it ran, the exporter served both sources and the run's own series.
    (text,) = scraped
    assert 'source="kernel"' in text and 'source="model"' in text
    assert "ksm_model_delta{" in text
    assert 'ksm_guest_merging_pages{guest="ksmh-' in text
    print(json.dumps({"kernel": k, "model": m}))


def anon_huge_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    return 0


@pytest.mark.ksm_kernel
@pytest.mark.qemu
def test_quickstart_with_thp_kernel_and_model_within_half_a_percent(tmp_path: Path) -> None:
    # Production guests run on transparent huge pages (QEMU advises its RAM MADV_HUGEPAGE):
    # quickstart with fleet.thp true. The guests must really have huge pages when KSM
    # starts; at convergence the model must be within 0.5% of the kernel.
    pb = load_playbook(QUICKSTART)
    pb = dataclasses.replace(pb, fleet=dataclasses.replace(pb.fleet, thp=True))
    huge: dict[int, int] = {}
    fleet_id: list[str] = []

    def echo(line: str) -> None:
        m = re.search(r"fleet (\S+) ready", line)
        if m:
            fleet_id.append(m.group(1))
        if "ksm run=1" in line:  # the fill is done, KSM not started yet
            huge.update({pid: anon_huge_kb(pid) for pid in qemu_processes_of(fleet_id[0])})

    opts = RunOptions(backend="kernel", out=tmp_path, export=None, echo=echo)
    outcome = Runner(pb, opts).run()
    assert outcome.exit_status == 0, outcome.failed
    run = check_results_dir(outcome.directory)
    assert all(g["thp"] is True for g in run["guests"])  # type: ignore[attr-defined]
    assert len(huge) == 4 and all(kb >= 32 * 1024 for kb in huge.values()), huge
    (phase,) = run["phases"]  # type: ignore[misc]
    k, m = phase["counters"]["kernel"]["end"], phase["counters"]["model"]["end"]
    for name in ("pages_shared", "pages_sharing", "stable_node_dups"):
        assert abs(k[name] - m[name]) <= 0.005 * k[name], (name, k[name], m[name])
    check_nothing_left(run)
    print(json.dumps({"kernel": k, "model": m, "anon_huge_kb": huge}))


@pytest.mark.qemu
def test_quickstart_forced_onto_the_model(tmp_path: Path) -> None:
    opts = RunOptions(backend="model", out=tmp_path, export=None, echo=lambda s: None)
    outcome = Runner(load_playbook(QUICKSTART), opts).run()
    assert outcome.exit_status == 0
    run = check_results_dir(outcome.directory)
    assert run["backend"] == "model"
    (phase,) = run["phases"]  # type: ignore[misc]
    assert "kernel" not in phase["counters"]
    m = phase["counters"]["model"]["end"]
    assert m["pages_sharing"] >= 65280
    statuses = {e["text"]: e["status"] for e in phase["expectations"]}
    assert statuses["kernel ~= model within 2%: pages_shared, pages_sharing"] == "skipped"
    assert statuses["saved_bytes >= 240MiB"] == "passed"
    check_nothing_left(run)
