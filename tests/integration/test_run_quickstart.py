"""`ksmh run playbooks/quickstart.yaml` end to end: real TCG guests, real KSM, the model.

The runner takes the host KSM lock and restores the knobs itself, so these tests do not use
the `ksm` fixture (a second flock in the same process would wait on the first).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from ksm_model.profiles import for_release

from harness.cli import main
from harness.ksm.lock import ksm_lock
from harness.ksm.sysfs import SysfsBackend
from harness.ksm.types import Tunables
from harness.playbook.runner import Outcome, Runner, RunOptions
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


def anon_huge_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    return 0


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


@dataclass
class Made:
    """One real quickstart run and what was observed around it."""

    outcome: Outcome
    knobs_before: Tunables
    knobs_after: Tunables
    scraped: list[str]
    huge_kb: dict[int, int]  # each QEMU's AnonHugePages once the guests filled their memory


class QuickstartRuns:
    """Real quickstart runs on the kernel, made on demand and shared by this module's tests
    (each costs 30-70 s): the first serves an exporter that is scraped mid-run."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.made: list[Made] = []

    def get(self, n: int) -> list[Made]:
        while len(self.made) < n:
            self.made.append(self._one(scrape=not self.made))
        return self.made[:n]

    def _one(self, scrape: bool) -> Made:
        kernel = SysfsBackend()
        scraped: list[str] = []
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        url = f"http://127.0.0.1:{port}/metrics"

        huge: dict[int, int] = {}
        fleet_id: list[str] = []

        def echo(line: str) -> None:
            if scrape and "ok   verify: clean" in line:  # mid-run, after the first expectation
                scraped.append(urllib.request.urlopen(url, timeout=10).read().decode())
            if m := re.search(r"fleet (\S+) ready", line):
                fleet_id.append(m.group(1))
            if "ksm run=1" in line and fleet_id:  # the fill is done, KSM not started yet
                huge.update({pid: anon_huge_kb(pid) for pid in qemu_processes_of(fleet_id[0])})

        opts = RunOptions(backend="kernel", out=self.out,
                          export=f"127.0.0.1:{port}" if scrape else None,
                          export_required=scrape, echo=echo, take_lock=False)  # fmt: skip
        # Hold the host lock across the run so the knobs read before and after are ours.
        with ksm_lock():
            knobs_before = kernel.read_tunables()
            outcome = Runner(load_playbook(QUICKSTART), opts).run()
            knobs_after = kernel.read_tunables()
        return Made(outcome, knobs_before, knobs_after, scraped, huge)


@pytest.fixture(scope="module")
def quickstart_runs(tmp_path_factory: pytest.TempPathFactory) -> QuickstartRuns:
    return QuickstartRuns(tmp_path_factory.mktemp("quickstart-runs"))


@pytest.mark.ksm_kernel
@pytest.mark.qemu
def test_quickstart_on_the_real_kernel(quickstart_runs: QuickstartRuns) -> None:
    (made,) = quickstart_runs.get(1)
    outcome = made.outcome
    assert outcome.failed == []
    assert outcome.exit_status == 0
    run = check_results_dir(outcome.directory)
    (phase,) = run["phases"]  # type: ignore[misc]
    k, m = phase["counters"]["kernel"]["end"], phase["counters"]["model"]["end"]
    # The guests run on transparent huge pages (fleet.thp defaults to true, as production
    # does), and really had them when KSM started: 64 MiB filled per guest.
    assert all(g["thp"] is True for g in run["guests"])  # type: ignore[attr-defined]
    assert len(made.huge_kb) == 4 and all(kb >= 32 * 1024 for kb in made.huge_kb.values())
    diff = {n: (k[n], m[n], k[n] - m[n]) for n in k if isinstance(k[n], int) and n in m}
    print(json.dumps({"kernel - model": diff, "anon_huge_kb": made.huge_kb}))
    for name in ("pages_shared", "pages_sharing", "stable_node_dups"):
        assert abs(k[name] - m[name]) <= 0.005 * k[name], (name, k[name], m[name])
    # 4 x 16384 identical pages at least, in chains of 256.
    assert k["pages_sharing"] >= 65280
    assert [e["status"] for e in phase["expectations"]] == ["passed"] * 4
    assert run["accelerator"] in ("tcg", "kvm")
    check_nothing_left(run)
    assert made.knobs_after == made.knobs_before
    # Sharing exposure, from the guests' page tables at the end of the phase: every guest maps
    # at least 16384 / 256 KSM pages (chains of max_page_sharing), shared with the others.
    e = run["sharing_exposure"]
    names = sorted(g["name"] for g in run["guests"])  # type: ignore[attr-defined]
    assert e["groups"] == names and e["phase"] == "fill"  # type: ignore[index]
    x = e["pages"]  # type: ignore[index]
    assert all(x[i][j] == x[j][i] for i in range(4) for j in range(4))
    assert all(x[i][i] >= 64 for i in range(4))
    assert all(0 < x[i][j] <= min(x[i][i], x[j][j]) for i in range(4) for j in range(4) if i != j)
    assert "## Sharing exposure" in (outcome.directory / "report.md").read_text()
    # While it ran, the exporter served both sources and the run's own series.
    (text,) = made.scraped
    assert 'source="kernel"' in text and 'source="model"' in text
    assert "ksm_model_delta{" in text
    assert 'ksm_guest_merging_pages{guest="ksmh-' in text
    print(json.dumps({"kernel": k, "model": m}))


@pytest.mark.ksm_kernel
@pytest.mark.qemu
def test_trend_over_three_real_quickstart_runs(
    quickstart_runs: QuickstartRuns, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Three nights on this machine, back to back: each records its provenance and boot
    times, and the third, judged against the first two, is within their spread."""
    made = quickstart_runs.get(3)
    assert [m.outcome.exit_status for m in made] == [0, 0, 0]
    runs = [check_results_dir(m.outcome.directory) for m in made]
    for run in runs:
        check_nothing_left(run)
        prov: dict[str, Any] = run["provenance"]  # type: ignore[assignment]
        assert prov["host"] == socket.gethostname()
        assert prov["kernel_release"] == os.uname().release
        digest = hashlib.sha256(QUICKSTART.read_bytes()).hexdigest()
        assert prov["playbook_digest"] == f"sha256:{digest}"
        # The mainline profile of the running release: 6.17 for this host's 6.18.
        assert prov["model_profile"] == for_release(os.uname().release).name
        assert prov["qemu"] and prov["harness_revision"]
        boot: dict[str, Any] = run["boot"]  # type: ignore[assignment]
        assert sorted(boot["seconds"]) == [g["name"] for g in run["guests"]]  # type: ignore[attr-defined]
        assert 0 < boot["median"] <= boot["max"] < 120
    out = tmp_path / "trend"
    code = main(["trend", str(quickstart_runs.out), "--out", str(out),
                 "--window", "2", "--min-nights", "2"])  # fmt: skip
    printed = capsys.readouterr().out
    doc = json.loads((out / "trend.json").read_text())
    (group,) = doc["groups"]
    figures = {m["name"]: m["values"] for m in group["metrics"]}
    print(json.dumps(figures, indent=1))  # the run-to-run spread on this machine
    assert code == 0, printed
    assert doc["flagged"] == 0 and group["flags"] == []
    assert (group["playbook"], group["host"]) == ("quickstart", socket.gethostname())
    assert [n["run_id"] for n in group["nights"]] == [m.outcome.directory.name for m in made]
    # The latest night was judged (two nights before it), for every metric.
    assert all(m["baseline"] is not None for m in group["metrics"]), group["metrics"]
    assert figures["expectation_pass_rate"] == [1.0, 1.0, 1.0]
    for i, run in enumerate(runs):
        (phase,) = run["phases"]  # type: ignore[misc]
        end = phase["counters"]
        assert figures["saved_bytes[kernel]"][i] == end["kernel"]["end"]["saved_bytes"]
        assert figures["kernel_minus_model[fill: pages_sharing]"][i] == (
            end["kernel"]["end"]["pages_sharing"] - end["model"]["end"]["pages_sharing"]
        )
        assert figures["boot_seconds[median guest]"][i] == run["boot"]["median"]  # type: ignore[index]
    assert "converge_seconds[fill: wait line 14]" in figures
    assert (out / "saved_bytes.png").read_bytes()[:4] == b"\x89PNG"
    assert "Nothing flagged" in (out / "trend.md").read_text()


# long (nightly): ~70 s of CI for a path test_non_root's model-only runs also take with guests.
@pytest.mark.qemu
@pytest.mark.long
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
    assert "sharing_exposure" not in run  # no real KSM side: nothing measured
