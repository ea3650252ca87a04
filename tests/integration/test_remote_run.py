"""`ksmh run PLAYBOOK --inventory INVENTORY` against real sshd instances on loopback.

Two sshd "hosts" (this same machine) are prepared into temporary prefixes with
`ksmh hosts prepare`, then a tiny playbook (one 128 MiB TCG guest filling 16 MiB identical) runs
on both through SSH with the real kernel's KSM. Both share that KSM, and each remote runner
takes the host-wide KSM lock, so the two runs serialize on it: that is the correct behaviour.
A second run adds an unreachable host and one that was never prepared: both are reported,
the prepared host still completes. A third is interrupted (SIGINT, as Ctrl-C) once a guest is
up: the remote runs tear down, nothing is left running, the fleet report is still written.
"""

from __future__ import annotations

import functools
import json
import os
import queue
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.cli import main
from harness.ksm.lock import ksm_lock
from harness.ksm.sysfs import SysfsBackend
from harness.report.results import read_results
from harness.run import PIPE, spawn
from tests.integration.conftest import free_port
from tests.integration.sshd import Fleet, sshd_fleet

pytestmark = [pytest.mark.ssh, pytest.mark.ksm_kernel, pytest.mark.qemu]

PLAYBOOK = """\
name: remote-tiny
description: one small guest fills 16 MiB of identical pages; KSM merges them.
fleet: {count: 1, memory_mib: 128, image: busybox, backend: qemu, accel: auto}
ksm: {pages_to_scan: 4000, sleep_millisecs: 10, smart_scan: 1, use_zero_pages: 0}
sample_interval: 1.0
phases:
  - name: fill
    steps:
      - fill: {region: a, size: 16MiB, pattern: "byte:0x5a"}
      - ksm: {run: 1}
      - wait: {full_scans: +3}
      - verify: {region: a}
      - expect:
          - "verify: clean"
          - "saved_bytes >= 15MiB"   # 4096 identical pages in chains of 256: 4080 saved
          - "kernel ~= model within 2%: pages_shared, pages_sharing"
EXTRA
"""
IMPOSSIBLE = '          - "saved_bytes >= 1024GiB"'
PNG = b"\x89PNG\r\n\x1a\n"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    from harness.remote import bundle

    with sshd_fleet(tmp_path_factory.mktemp("remote-run")) as f:
        # One bundle build for both hosts even if the source tree changes meanwhile.
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(bundle, "build_bundle", functools.cache(bundle.build_bundle))
            code = main(["hosts", "prepare", str(f.inventory()), "--json"])
        assert code == 0
        yield f


def _playbook(d: Path, extra: str = "") -> Path:
    path = d / "remote-tiny.yaml"
    path.write_text(PLAYBOOK.replace("EXTRA\n", extra + "\n" if extra else ""))
    return path


def _ksmh(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _processes_matching(*needles: str) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if any(n in cmd for n in needles):
                found.append(f"{entry.name}: {cmd}")
    return found


def _knobs() -> dict[str, object]:
    with ksm_lock():  # between other agents' runs, whose knobs are restored by then
        return SysfsBackend().read_tunables().present()


def _fleet_dir(out: Path) -> Path:
    (d,) = sorted(out.glob("fleet-*"))
    return d


def test_remote_run_on_two_hosts(
    fleet: Fleet, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inv = fleet.inventory()
    out = tmp_path / "results"
    knobs_before = _knobs()
    code, stdout, stderr = _ksmh(
        capsys, "run", _playbook(tmp_path), "--inventory", inv, "--out", out, "--backend", "kernel"
    )
    assert code == 0, stdout + stderr
    knobs_after = _knobs()
    assert knobs_after == knobs_before

    doc = json.loads((_fleet_dir(out) / "fleet.json").read_text())
    assert doc["exit_status"] == 0
    assert doc["totals"]["hosts"] == 2 and doc["totals"]["passed"] == 2
    assert doc["totals"]["errored"] == 0 and doc["totals"]["failed"] == 0
    rows = {h["host"]: h for h in doc["hosts"]}
    assert list(rows) == ["alpha", "bravo"]
    saved = 0
    for h in fleet.hosts:
        row = rows[h.name]
        assert row["status"] == "passed" and row["exit_status"] == 0
        assert row["address"] == f"127.0.0.1:{h.port}"
        assert row["backend"] == "kernel" and row["guests"] == 1
        assert row["expectations"] == {"passed": 3}
        local = Path(row["directory"])
        assert local.parent == out / h.name and local.name == row["run_id"]
        # The run's own record, fetched over SFTP, and the plots rendered here.
        res = read_results(local)
        (phase,) = res.run["phases"]
        end = phase["counters"]["kernel"]["end"]
        assert res.run["verdict"]["status"] == "passed"
        assert row["pages_sharing"] == end["pages_sharing"] >= 4080
        assert row["saved_bytes"] == end["saved_bytes"] >= 4080 * 4096
        assert row["model_saved_bytes"] == phase["counters"]["model"]["end"]["saved_bytes"]
        assert row["peak_saved_bytes"] >= row["saved_bytes"]
        saved += end["saved_bytes"]
        # The playbook ran from the copy uploaded into the host's prefix.
        assert res.run["playbook"]["file"].startswith(f"{h.prefix}/runs/")
        for name in ("counters.png", "guests.png"):
            assert (local / name).read_bytes()[:8] == PNG
            assert f"]({name})" in (local / "report.md").read_text()
        assert not _processes_matching(res.run["fleet_run_id"])  # its guests are gone
        # Progress came back line by line, prefixed with the host.
        assert f"alpha: running remote-tiny.yaml on 127.0.0.1:{fleet.hosts[0].port}" in stderr
        assert f"{h.name}: [" in stderr and "waiting for the host KSM lock" in stderr
    assert doc["totals"]["saved_bytes"] == saved

    lines = stdout.splitlines()
    assert lines[0].split()[:3] == ["host", "verdict", "exit"]
    assert lines[1].split()[:3] == ["alpha", "PASSED", "0"]
    assert lines[2].split()[:3] == ["bravo", "PASSED", "0"]
    assert "fleet-wide saved: " in stdout and f"({saved} bytes)" in stdout
    report = (_fleet_dir(out) / "report.md").read_text()
    assert "**Verdict: PASSED** (exit status 0): 2 passed, 0 failed, 0 errored of 2 hosts" in report
    assert f"({saved} bytes at the end of each host's run" in report
    for h in fleet.hosts:
        run_id = rows[h.name]["run_id"]
        assert f"[{run_id}](../{h.name}/{run_id}/report.md)" in report
    assert "## Failures\n\nNone." in report
    assert not _processes_matching(f"{fleet.hosts[0].prefix}/venv/bin/ksmh run")
    assert not _processes_matching(f"{fleet.hosts[1].prefix}/venv/bin/ksmh run")


def test_failing_hosts_are_reported_and_the_others_complete(
    fleet: Fleet, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    alpha, bravo = fleet.hosts
    dead_port = free_port()
    extra = {
        "charlie": {
            "address": "127.0.0.1",
            "port": dead_port,
            "exporter": {"listen": f"127.0.0.1:{free_port()}"},
        },
        # bravo's sshd, but a prefix nothing was installed into
        "delta": {
            "address": "127.0.0.1",
            "port": bravo.port,
            "prefix": str(tmp_path / "empty"),
            "exporter": {"listen": f"127.0.0.1:{bravo.exporter_port}"},
        },
    }
    inv = fleet.inventory("failing.yaml", only=["alpha"], extra=extra)
    out = tmp_path / "results"
    # Nothing listens there: the controller's push of alpha's results fails, one line.
    push = f"http://127.0.0.1:{free_port()}"
    code, stdout, stderr = _ksmh(capsys, "run", _playbook(tmp_path, IMPOSSIBLE),
                                 "--inventory", inv, "--out", out, "--push", push)  # fmt: skip
    assert code == 2, stdout + stderr
    assert "ksmh: 2 of 3 hosts errored: charlie, delta" in stderr
    (push_line,) = [ln for ln in stderr.splitlines() if "push" in ln]
    assert push_line.startswith(f"alpha: ksmh: push to {push} failed: ")
    doc = json.loads((_fleet_dir(out) / "fleet.json").read_text())
    assert doc["exit_status"] == 2
    assert doc["totals"] | {"saved_bytes": 0, "peak_saved_bytes": 0} == {
        "hosts": 3, "passed": 0, "failed": 1, "errored": 2,
        "saved_bytes": 0, "peak_saved_bytes": 0, "hosts_with_results": 1,
    }  # fmt: skip
    rows = {h["host"]: h for h in doc["hosts"]}
    assert rows["alpha"]["status"] == "failed" and rows["alpha"]["exit_status"] == 1
    assert rows["alpha"]["expectations"] == {"passed": 3, "failed": 1}
    (failed,) = rows["alpha"]["failed"]
    assert failed.startswith("line 17: saved_bytes >= 1024GiB (")
    assert failed.endswith(" >= 1 TiB)")  # sizes as people read them
    assert doc["totals"]["saved_bytes"] == rows["alpha"]["saved_bytes"] >= 4080 * 4096
    alpha_run = json.loads((Path(rows["alpha"]["directory"]) / "run.json").read_text())
    assert alpha_run["push"]["ok"] is False
    assert alpha_run["push"]["grouping_key"] == {"playbook": "remote-tiny", "host": "alpha"}
    assert alpha_run["verdict"]["status"] == "failed"
    assert rows["charlie"]["status"] == "error" and rows["charlie"]["run_id"] is None
    assert rows["charlie"]["error"].startswith(f"cannot connect to 127.0.0.1:{dead_port}")
    assert rows["delta"]["status"] == "error"
    assert rows["delta"]["error"] == (
        f"ksm-harness is not installed under {tmp_path / 'empty'} "
        f"({tmp_path / 'empty'}/venv/bin/ksmh not found)"
    )
    assert rows["delta"]["hint"] == "run `ksmh hosts prepare INVENTORY` first"
    lines = stdout.splitlines()
    assert [ln.split()[:3] for ln in lines[1:4]] == [
        ["alpha", "FAILED", "1"], ["charlie", "ERROR", "2"], ["delta", "ERROR", "2"],
    ]  # fmt: skip
    assert f"alpha: expectation failed: {failed}" in lines
    assert any(ln.startswith("charlie: ERROR: cannot connect to 127.0.0.1:") for ln in lines)
    report = (_fleet_dir(out) / "report.md").read_text()
    assert "**Verdict: ERROR** (exit status 2): 0 passed, 1 failed, 2 errored of 3 hosts" in report
    assert f"- alpha: expectation failed: {failed}" in report
    assert "- delta: ERROR: ksm-harness is not installed" in report
    assert not _processes_matching(f"{alpha.prefix}/venv/bin/ksmh run")
    assert os.path.isdir(out / "alpha")
    assert not (out / "charlie").exists() and not (out / "delta").exists()


def test_ctrl_c_stops_the_remote_runs_and_still_reports(fleet: Fleet, tmp_path: Path) -> None:
    out = tmp_path / "results"
    argv = [sys.executable, "-m", "harness.cli", "run", _playbook(tmp_path), "--inventory",
            fleet.inventory(), "--out", out]  # fmt: skip
    proc = spawn(argv, cwd=ROOT, stdout=PIPE, stderr=PIPE)
    lines: queue.Queue[str] = queue.Queue()

    def read() -> None:
        assert proc.stderr is not None
        for raw in proc.stderr:
            lines.put(raw.decode())

    threading.Thread(target=read, daemon=True).start()
    try:
        # Once one host has its guest up (the other may still wait for the KSM lock).
        while "ready: 1 guest" not in (line := lines.get(timeout=240)):
            pass
        proc.send_signal(signal.SIGINT)
        stdout, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130
    text = stdout.decode()
    assert "fleet report: " in text
    doc = json.loads((_fleet_dir(out) / "fleet.json").read_text())
    assert doc["exit_status"] == 2
    for row in doc["hosts"]:
        # Each remote run ended as any interrupted run does: verdict error, exit 2. (The run's
        # verdict says "interrupted (signal SIGTERM)"; a host still waiting for its KSM lock
        # wrote no results and its last line says "run interrupted (signal SIGTERM): ...".)
        assert (row["status"], row["exit_status"]) == ("error", 2)
        assert "interrupted (signal SIGTERM)" in row["error"], row["error"]
        if row["directory"] is None:  # still waiting for the lock: it had nothing to write
            continue
        # A runner that had begun tore down and wrote its results, which were fetched.
        run = read_results(Path(row["directory"])).run
        assert run["verdict"]["status"] == "error"
        if run.get("fleet_run_id"):
            assert not _processes_matching(run["fleet_run_id"])
    assert line.split(":")[0] in {"alpha", "bravo"}
    # The host whose guest was up has its results.
    assert any(row["directory"] for row in doc["hosts"])
    for h in fleet.hosts:
        assert not _processes_matching(f"{h.prefix}/venv/bin/ksmh run")
