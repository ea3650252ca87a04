"""The runner end to end in model-only mode, with a fake fleet of tiny child processes.

Each "guest" is a Python child holding one anonymous buffer advised MADV_HUGEPAGE (what QEMU
does to guest RAM; the model-only shadow falls back to such VMAs) and answering fill/verify on
stdin, so the whole path runs for real: playbook -> fleet -> shadow capture of live processes
-> model -> expectations -> results directory. No real KSM knob is touched (sysfs_root points
nowhere), so no host lock is needed.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from subprocess import Popen

import pytest

from harness.errors import GuestError, HarnessError
from harness.guests.agent import AgentReply, parse_fields
from harness.guests.fleet import FleetResult, GuestResult
from harness.playbook.live import RunState, serve_run
from harness.playbook.runner import Runner, RunOptions
from harness.playbook.schema import FleetSpec, loads_playbook
from harness.record import ScanPoint, Snapshot
from harness.report.provenance import playbook_digest
from harness.report.results import read_results
from harness.run import PIPE, spawn
from harness.sides.model import ModelSnapshot

CHILD = """
import ctypes, mmap, sys
ctypes.CDLL(None).prctl(41, 1, 0, 0, 0)  # PR_SET_THP_DISABLE: 4 KiB pages, like the runner
buf = mmap.mmap(-1, 256 * 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
buf.madvise(mmap.MADV_HUGEPAGE)
print("ready", flush=True)
for line in sys.stdin:
    cmd, *args = line.split()
    if cmd == "fill":
        size, value = int(args[1]), int(args[2].split(":")[1], 0)
        buf[:size] = bytes([value]) * size
        print("ok pages=%d" % (size // 4096), flush=True)
    elif cmd == "verify":
        print("ok mismatched=0 bad_pages=0", flush=True)
    else:
        print("err unknown command", flush=True)
"""


class FakeFleet:
    """The part of harness.guests.fleet.Fleet the runner uses, over local child processes."""

    def __init__(self, spec: FleetSpec, fail_on: str = "") -> None:
        self.spec = spec
        self.run_id = "rfake"
        self.accel = "none"
        self.children: dict[str, Popen[bytes]] = {}
        self.fail_on = fail_on
        self.downs = 0

    def up(self) -> FleetResult:
        for i in range(self.spec.count):
            proc = spawn([sys.executable, "-c", CHILD], stdin=PIPE, stdout=PIPE)
            self.children[f"ksmh-rfake-g{i:02d}"] = proc
            assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        return FleetResult("boot", [GuestResult(n) for n in self.children])

    def pids(self) -> dict[str, int]:
        return {n: p.pid for n, p in self.children.items()}

    def run(self, command: str, *args: str, guests: str | None = None) -> FleetResult:
        wanted = {int(i) for i in (guests or "").split(",") if i}
        results = []
        for i, (name, proc) in enumerate(self.children.items()):
            if wanted and i not in wanted:
                continue
            if command == self.fail_on and i == 1:
                results.append(GuestResult(name, None, GuestError(f"{name}: agent died")))
                continue
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write(f"{command} {' '.join(args)}\n".encode())
            proc.stdin.flush()
            text = proc.stdout.readline().decode().strip().removeprefix("ok ")
            results.append(GuestResult(name, AgentReply("1", text, parse_fields(text))))
        return FleetResult(command, results)

    def down(self) -> None:
        self.downs += 1
        for proc in self.children.values():
            proc.kill()
            proc.wait(10)


PLAYBOOK = """
name: tiny
fleet: {count: 3, memory_mib: 64}
ksm: {pages_to_scan: 100, max_page_sharing: 256}
phases:
  - name: fill
    steps:
      - fill: {region: a, size: 256KiB, pattern: "byte:0x5a"}
      - ksm: {run: 1}
      - wait: {full_scans: +2}
      - verify: {region: a}
      - expect:
          - "verify: clean"
          - "pages_shared == 1"
          - "pages_sharing == 191"
          - "delta.pages_sharing == 191"
          - "kernel == model: pages_sharing"
  - name: converge
    steps:
      - wait: {converged: {tolerance: 0, timeout: 30}}
      - expect: "pages_sharing >= 1000"
"""


@pytest.fixture
def fleets() -> Iterator[list[FakeFleet]]:
    made: list[FakeFleet] = []
    yield made
    for f in made:
        f.down()


def options(tmp_path: Path, fleets: list[FakeFleet], fail_on: str = "") -> RunOptions:
    def factory(spec: FleetSpec) -> FakeFleet:
        fleets.append(FakeFleet(spec, fail_on))
        return fleets[-1]

    lines: list[str] = []
    return RunOptions(
        backend="model",
        out=tmp_path / "results",
        sysfs_root=tmp_path / "no-ksm",
        lock_path=tmp_path / "lock",
        journal_dir=tmp_path / "journal",
        fleet_factory=factory,
        echo=lines.append,
    )


def test_model_only_run(tmp_path: Path, fleets: list[FakeFleet]) -> None:
    opts = options(tmp_path, fleets)
    outcome = Runner(loads_playbook(PLAYBOOK, "tiny.yaml"), opts).run()
    assert outcome.exit_status == 1
    assert outcome.failed == ["line 21: pages_sharing >= 1000 (191 >= 1000)"]
    assert fleets[0].downs == 1 and all(p.poll() is not None for p in fleets[0].children.values())
    res = read_results(outcome.directory)
    run = res.run
    assert run["backend"] == "model"
    assert run["banner"].startswith("KSM backend: the model alone")
    fill, converge = run["phases"]
    verdicts = [(e["text"], e["status"]) for e in fill["expectations"]]
    assert verdicts == [
        ("verify: clean", "passed"),
        ("pages_shared == 1", "passed"),
        ("pages_sharing == 191", "passed"),
        ("delta.pages_sharing == 191", "passed"),
        ("kernel == model: pages_sharing", "skipped"),
    ]
    assert fill["counters"]["model"]["end"]["pages_sharing"] == 191
    assert fill["counters"]["model"]["end"]["full_scans"] == 2
    assert fill["verify"] == {f"ksmh-rfake-g{i:02d}": 0 for i in range(3)}
    assert converge["waits"][0]["kind"] == "converged"
    assert not converge["waits"][0]["timed_out"]
    assert run["verdict"] == {
        "status": "failed",
        "exit_status": 1,
        "failed": outcome.failed,
        "expectations": {"passed": 4, "failed": 1, "skipped": 1},
        "error": None,
    }
    assert (outcome.passed, outcome.skipped) == (4, 1)
    assert list((tmp_path / "journal").iterdir()) == []  # a clean end removes the journal
    assert run["sharing_matrix"]["pages"] == [[64, 64, 64], [64, 64, 64], [64, 64, 64]]
    assert run["shadow"]["captures"] >= 4
    # What a trend groups and explains by; the boot record from the fleet's boot result.
    prov = run["provenance"]
    assert prov["playbook_digest"] == playbook_digest(None, run["playbook"]["source"])
    assert prov["host"] == socket.gethostname() and prov["kernel_release"] == os.uname().release
    assert run["boot"] == {
        "seconds": {f"ksmh-rfake-g{i:02d}": 0.0 for i in range(3)},
        "median": 0.0,
        "max": 0.0,
    }
    names = {p.name for p in outcome.directory.iterdir()}
    assert {
        "run.json",
        "samples.csv",
        "guests.csv",
        "scans.csv",
        "report.md",
        "counters.png",
    } <= names
    model_rows = [r for r in res.guests if r["source"] == "model"]
    assert model_rows[-1]["merging_pages"] == 64
    # Every full scan the model made is on record, numbered from the start of the run.
    scans = [r for r in res.scans if r["source"] == "model"]
    assert [r["scan"] for r in scans] == list(range(1, len(scans) + 1))
    assert len(scans) == converge["counters"]["model"]["end"]["full_scans"]
    assert (scans[0]["pages_sharing"], scans[1]["pages_sharing"]) == (0, 191)
    assert scans[1]["phase"] == "fill" and scans[-1]["phase"] == "converge"
    assert (outcome.directory / "scans.png").read_bytes()[:4] == b"\x89PNG"
    assert "*** KSM backend: the model alone" in "\n".join(opts.echo.__self__)  # type: ignore[attr-defined]


def test_agent_failure_is_an_error_and_still_tears_down(
    tmp_path: Path, fleets: list[FakeFleet]
) -> None:
    opts = options(tmp_path, fleets, fail_on="fill")
    with pytest.raises(GuestError, match=r"^line 8: fill failed on 1 of 3 guests: ksmh-rfake-g01"):
        Runner(loads_playbook(PLAYBOOK, "tiny.yaml"), opts).run()
    assert fleets[0].downs == 1
    (directory,) = (tmp_path / "results").iterdir()
    run = json.loads((directory / "run.json").read_text())
    assert run["verdict"]["status"] == "error"
    assert run["verdict"]["exit_status"] == 2
    assert run["phases"][0]["agent"][0]["guests"]["ksmh-rfake-g01"].startswith("error: ")
    assert (directory / "report.md").read_text().count("**Verdict: ERROR**") == 1


def test_exporter_serves_model_delta_and_guests(tmp_path: Path) -> None:
    from harness.exporter import ExportTarget

    snap = ModelSnapshot()
    snap.publish({"pages_sharing": "191\n", "pages_shared": "1\n"}, {})
    state = RunState("r1", "tiny")
    state.phase = "fill"
    state.delta = {"pages_sharing": -3}
    state.guests[("model", "g0")] = {"ksm_merging_pages": 64, "ksm_rmap_items": 64}
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    server = serve_run([ExportTarget(backend=snap, host="h")], state, "h", f"127.0.0.1:{port}")
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    finally:
        server.shutdown()
    text = body.decode()
    assert 'ksm_pages_sharing{host="h",source="model"} 191.0' in text
    assert 'ksm_model_delta{counter="pages_sharing",host="h"} -3.0' in text
    assert 'ksm_guest_merging_pages{guest="g0",host="h",source="model"} 64.0' in text
    assert 'ksm_run_phase{phase="fill",playbook="tiny",run_id="r1"} 1.0' in text


SWEEP = """
name: sweep
fleet: {count: 2, memory_mib: 64}
ksm: {pages_to_scan: 100, sleep_millisecs: 20}
phases:
  - name: s
    steps:
      - fill: {region: a, size: 256KiB, pattern: "byte:7"}
      - sweep: {pages_to_scan: [16, 256], tolerance: 0, timeout: 60}
      - expect: ["pages_sharing == 127", "pages_to_scan_is_not_a_counter >= 0"]
"""


def test_sweep_in_model_only_mode_uses_virtual_time(
    tmp_path: Path, fleets: list[FakeFleet]
) -> None:
    from harness.errors import PlaybookError

    with pytest.raises(PlaybookError, match=r"^sweep\.yaml:10: .*unknown quantity"):
        loads_playbook(SWEEP, "sweep.yaml")
    pb = loads_playbook(SWEEP.replace(', "pages_to_scan_is_not_a_counter >= 0"', ""), "sweep.yaml")
    outcome = Runner(pb, options(tmp_path, fleets)).run()
    assert outcome.exit_status == 0
    (sweep,) = read_results(outcome.directory).run["phases"][0]["sweeps"]
    assert sweep["tunable"] == "pages_to_scan"
    small, big = sweep["points"]
    assert (small["value"], big["value"]) == (16, 256)
    assert small["converged"] and big["converged"]
    assert small["pages_sharing"] == big["pages_sharing"] == 127
    # 128 pages: 16 per batch needs many more 20 ms sleeps than 256 per batch does.
    assert small["seconds"] > 4 * big["seconds"] > 0
    assert small["ksmd_cpu_seconds"] is not None


def test_interrupt_tears_down_and_records(tmp_path: Path, fleets: list[FakeFleet]) -> None:
    """Ctrl-C (or SIGTERM, turned into KeyboardInterrupt) in the middle of a step."""

    class Interrupted(FakeFleet):
        def run(self, command: str, *args: str, guests: str | None = None) -> FleetResult:
            raise KeyboardInterrupt("signal 15")

    def factory(spec: FleetSpec) -> FakeFleet:
        fleets.append(Interrupted(spec))
        return fleets[-1]

    opts = options(tmp_path, fleets)
    opts.fleet_factory = factory
    with pytest.raises(KeyboardInterrupt):
        Runner(loads_playbook(PLAYBOOK, "tiny.yaml"), opts).run()
    assert fleets[0].downs == 1
    assert all(p.poll() is not None for p in fleets[0].children.values())
    (directory,) = (tmp_path / "results").iterdir()
    verdict = json.loads((directory / "run.json").read_text())["verdict"]
    assert verdict == {
        "status": "error",
        "exit_status": 2,
        "failed": [],
        "expectations": {"passed": 0, "failed": 0, "skipped": 0},
        "error": "interrupted (signal 15)",
    }


def test_failed_samples_are_reported_at_the_end(tmp_path: Path) -> None:
    from harness.errors import HarnessError
    from harness.playbook.live import Sampler

    lines: list[str] = []
    runner = Runner(
        loads_playbook(PLAYBOOK, "tiny.yaml"), RunOptions(out=tmp_path, echo=lines.append)
    )
    failed = threading.Event()

    def sample() -> None:
        failed.set()
        raise HarnessError("cannot read pages_sharing")

    sampler = Sampler(0.01, sample)
    sampler.start()
    assert failed.wait(10)
    runner._stop_sampler(sampler)
    assert not sampler.is_alive()
    n = len(sampler.errors)
    assert n >= 1
    noun = "sample" if n == 1 else "samples"
    assert lines[-1].endswith(f"] {n} {noun} failed; the last: cannot read pages_sharing")


FORECAST = """
name: fc
fleet: {count: 3, memory_mib: 64}
ksm: {pages_to_scan: 100, max_page_sharing: 256, smart_scan: 0}
phases:
  - name: fill
    steps:
      - fill: {region: a, size: 512KiB, pattern: "byte:0x5a"}
  - name: forecast
    steps:
      - forecast:
          knobs: ["pages_to_scan=50", "pages_to_scan=400"]
          within: 0.2s
          apply: true
          timeout: 60
          check: {saved_bytes: 1%}
"""


def test_forecast_step_in_a_model_only_run(
    tmp_path: Path, fleets: list[FakeFleet], monkeypatch: pytest.MonkeyPatch
) -> None:
    from harness.twin import calibration

    cal = calibration.DEFAULT.__class__(**{**calibration.DEFAULT.__dict__, "release": "x"})
    monkeypatch.setenv("KSM_HARNESS_CALIBRATION_DIR", str(tmp_path / "cal"))
    monkeypatch.setattr(calibration, "release", lambda: "x")
    calibration.save(cal, tmp_path / "cal")
    outcome = Runner(loads_playbook(FORECAST, "fc.yaml"), options(tmp_path, fleets)).run()
    assert outcome.exit_status == 0, outcome.failed
    run = read_results(outcome.directory).run
    (rec,) = run["phases"][1]["forecasts"]
    f = rec["forecast"]
    assert f["calibration"]["release"] == "x" and f["captured_pages"] == 3 * 128
    slow, fast = f["results"]
    # 384 identical pages: one KSM page with 255 sharers and one with 127.
    assert slow["saved_bytes"] == fast["saved_bytes"] == 382 * 4096
    assert slow["seconds_to_target"] > 0.2 > fast["seconds_to_target"]
    assert f["recommended"] == "pages_to_scan=400"  # the slow one misses the 0.2 s budget
    applied = rec["applied"]
    assert applied["knobs"] == {"pages_to_scan": 400}
    assert applied["measured"]["saved_bytes"] == 382 * 4096 and applied["measured"]["converged"]
    assert applied["error"]["saved_bytes"] == 0.0
    assert applied["checks"] == {
        "saved_bytes": {"tolerance": 0.01, "error": 0.0, "status": "passed"}
    }
    report = (outcome.directory / "report.md").read_text()
    assert "| `pages_to_scan=400` (recommended) | 1.5 MiB |" in report
    assert "Forecast against measured (KSM turned on with `pages_to_scan=400`):" in report
    assert "| saved | 1.5 MiB | 1.5 MiB | +0.0% | passed (within 1%) |" in report


def test_forecast_step_needs_ksm_off(tmp_path: Path, fleets: list[FakeFleet]) -> None:
    text = FORECAST.replace("smart_scan: 0}", "smart_scan: 0, run: 1}")
    with pytest.raises(HarnessError, match=r"^line 11: forecast needs KSM off \(run=1\)"):
        Runner(loads_playbook(text, "fc.yaml"), options(tmp_path, fleets)).run()


class RecordingSide:
    """A side that records what the runner asks of it (the order is what is tested)."""

    page_size = 4096

    def __init__(self, source: str, log: list[tuple[str, ...]], running: bool = False) -> None:
        self.source = source
        self.log = log
        self.running = running

    @contextmanager
    def hold(self) -> Iterator[int]:
        self.log.append((self.source, "hold"))
        yield 0

    def follow(self, scans: int) -> None:
        self.log.append((self.source, "capture and follow"))

    def snapshot(self) -> Snapshot:
        return Snapshot({"full_scans": 0}, {})

    def drain_scans(self) -> list[ScanPoint]:
        return []

    def scanning(self) -> bool:
        return self.running

    def apply(self, values: Mapping[str, int | str]) -> None:
        self.log.append((self.source, "apply " + " ".join(f"{k}={v}" for k, v in values.items())))


def test_starting_ksmd_lets_the_model_capture_first(tmp_path: Path) -> None:
    # Issue 12: the model's first capture of a fill came only at the sync after `wait`, when
    # ksmd had already scanned (and split huge pages): its scans started from another state.
    pb = loads_playbook(PLAYBOOK.replace("name: tiny", "name: tiny\nforeign: capture"), "t.yaml")
    runner = Runner(pb, options(tmp_path, []))
    log: list[tuple[str, ...]] = []
    runner.sides = [RecordingSide("kernel", log), RecordingSide("model", log)]  # type: ignore[list-item]
    runner.write_knobs({"pages_to_scan": 100})  # ksmd stopped, not starting: nothing to catch up
    runner.guest_pids = {"ksmh-rfake-g00": os.getpid()}
    runner.write_knobs({"run": 1})
    assert log == [
        ("kernel", "apply pages_to_scan=100"),
        ("model", "apply pages_to_scan=100"),
        ("kernel", "hold"),
        ("model", "capture and follow"),
        ("kernel", "apply run=1"),
        ("model", "apply run=1"),
    ]
