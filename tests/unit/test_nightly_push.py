"""The push of a run's summary (pure families, failures as one recorded line, the CLI wiring),
the playbook's push field, run provenance and boot records."""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest

from harness.cli import main
from harness.errors import GuestError, HarnessError, PlaybookError
from harness.guests.fleet import FleetResult, GuestResult
from harness.monitoring.push import check_url, families, push_run
from harness.playbook.schema import loads_playbook
from harness.report.nightly import boot_record, summarize
from harness.report.provenance import SOURCE_ROOT, gather, git_revision, of_run, playbook_digest
from harness.run import run
from tests.unit.synthetic_runs import night, write

ROOT = Path(__file__).resolve().parents[2]
MiB = 2**20


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again when the block ends


# -- URL -------------------------------------------------------------------------------------


def test_check_url_accepts_gateways_and_refuses_the_rest() -> None:
    assert check_url("127.0.0.1:9091") == "http://127.0.0.1:9091"
    assert check_url("https://pg.example/base/") == "https://pg.example/base"
    for bad, why in (
        ("ftp://pg:9091", "expected http(s)://HOST[:PORT]"),
        ("http://", "expected http(s)://HOST[:PORT]"),
        ("http://pg:99999", "Port out of range"),
        ("http://pg:9091/?x=1", "no query or fragment allowed"),
    ):
        with pytest.raises(HarnessError) as exc:
            check_url(bad)
        assert why in exc.value.message and exc.value.hint, bad


# -- what is pushed --------------------------------------------------------------------------


def _samples(run: dict[str, Any]) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for fam in families(summarize(run), run):
        for s in fam.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def test_families_carry_verdict_counters_sweeps_and_boot() -> None:
    run = night(3, sweep={500: (20.0, 3.0), 2000: (6.0, 2.5)})
    got = _samples(run)
    assert got["ksm_nightly_verdict"] == {
        (("status", "passed"),): 1.0,
        (("status", "failed"),): 0.0,
        (("status", "error"),): 0.0,
    }
    assert got["ksm_nightly_exit_status"] == {(): 0.0}
    assert got["ksm_nightly_duration_seconds"] == {(): 900.0}
    started = datetime(2026, 11, 4, 2, 0, tzinfo=UTC).timestamp()
    assert got["ksm_nightly_started_timestamp_seconds"] == {(): started}
    assert got["ksm_nightly_expectations"][(("status", "passed"),)] == 4
    assert got["ksm_nightly_saved_bytes"] == {(("source", "kernel"),): 400 * MiB,
                                              (("source", "model"),): 400 * MiB}  # fmt: skip
    pages = got["ksm_nightly_phase_pages"]
    assert pages[(("counter", "pages_shared"), ("phase", "fill"), ("source", "kernel"))] == 6645
    assert pages[(("counter", "pages_shared"), ("phase", "fill"), ("source", "model"))] == 6647
    assert (
        got["ksm_nightly_kernel_minus_model_pages"][
            (("counter", "pages_shared"), ("phase", "fill"))
        ]
        == -2
    )
    sweep = (("phase", "fill"), ("tunable", "pages_to_scan"), ("value", "500"))
    assert got["ksm_nightly_sweep_converge_seconds"][sweep] == 20.0
    assert got["ksm_nightly_sweep_ksmd_cpu_seconds"][sweep] == 3.0
    assert got["ksm_nightly_sweep_converged"][sweep] == 1.0
    assert got["ksm_nightly_wait_converge_seconds"] == {(("line", "14"), ("phase", "fill")): 2.5}
    assert got["ksm_nightly_guest_boot_seconds"] == {(): 5.5}
    assert got["ksm_nightly_guest_boot_max_seconds"] == {(): 6.0}
    ((labels, one),) = got["ksm_nightly_run_info"].items()
    info = dict(labels)
    assert one == 1.0 and info["run_id"] == run["run_id"] and info["qemu"] == "7.2.22"
    assert info["harness_revision"] == "a" * 40 and info["accelerator"] == "tcg"
    # No label may clash with the grouping key (the gateway would refuse the push).
    assert not any(k in ("job", "host", "playbook") for f in got.values() for ls in f
                   for k, _ in ls)  # fmt: skip


def test_an_errored_run_pushes_its_verdict() -> None:
    got = _samples(night(0, status="error"))
    assert got["ksm_nightly_verdict"][(("status", "error"),)] == 1.0
    assert got["ksm_nightly_exit_status"] == {(): 2.0}


# -- pushing -----------------------------------------------------------------------------------


def test_a_failed_push_is_one_line_recorded_and_changes_nothing_else(tmp_path: Path) -> None:
    d = write(tmp_path, night(0))
    before = json.loads((d / "run.json").read_text())
    url = f"http://127.0.0.1:{closed_port()}"
    out = push_run(d, url, timeout=2)
    assert not out.ok
    assert "\n" not in out.line
    assert out.line.startswith(f"ksmh: push to {url} failed: ")
    assert out.line.endswith("(the run's verdict stands)")
    after = json.loads((d / "run.json").read_text())
    record = after.pop("push")
    assert after == before
    assert record["ok"] is False and "Connection refused" in record["error"]
    assert record["grouping_key"] == {"playbook": "nightly", "host": "alpha"}
    assert record["job"] == "ksm_nightly" and record["series"] > 40


class _Refusing(BaseHTTPRequestHandler):
    """Answers every push like a Pushgateway refusing inconsistent metrics."""

    bodies: ClassVar[list[bytes]] = []
    paths: ClassVar[list[str]] = []

    def do_PUT(self) -> None:
        self.paths.append(self.path)
        self.bodies.append(self.rfile.read(int(self.headers["Content-Length"])))
        msg = b"pushed metrics are invalid or inconsistent with existing metrics\n"
        self.send_response(400)
        self.send_header("Content-Length", str(len(msg)))
        self.end_headers()
        self.wfile.write(msg)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def refusing_gateway() -> Iterator[str]:
    server = HTTPServer(("127.0.0.1", 0), _Refusing)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield f"127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def test_an_http_refusal_names_the_gateways_reason(tmp_path: Path, refusing_gateway: str) -> None:
    d = write(tmp_path, night(0))
    out = push_run(d, check_url(refusing_gateway), host="kvm-a")
    assert out.line == (
        f"ksmh: push to http://{refusing_gateway} failed: HTTP 400 Bad Request: pushed metrics "
        "are invalid or inconsistent with existing metrics (the run's verdict stands)"
    )
    # The PUT went to the group job/playbook/host, the host given (a fleet's inventory name).
    assert _Refusing.paths[-1] == "/metrics/job/ksm_nightly/host/kvm-a/playbook/nightly"
    assert b'ksm_nightly_verdict{status="passed"} 1.0' in _Refusing.bodies[-1]


# -- `ksmh run --push` and the playbook's push: ------------------------------------------------

PLAYBOOK = (ROOT / "playbooks" / "quickstart.yaml").read_text()


class FakeRunner:
    """Stands in for harness.playbook.runner.Runner: writes a run.json, then ends as told."""

    error: HarnessError | None = None

    def __init__(self, playbook: Any, opts: Any) -> None:
        self.dir = opts.out / "20261104-020000-quickstart"

    def run(self) -> Any:
        from harness.playbook.runner import Outcome

        doc = night(3, playbook="quickstart", expectations=("passed", "failed"))
        self.dir.mkdir(parents=True)
        (self.dir / "run.json").write_text(json.dumps(doc))
        if self.error is not None:
            raise self.error
        return Outcome(1, self.dir, ["line 21: x"])


@pytest.fixture
def fake_runner(monkeypatch: pytest.MonkeyPatch) -> type[FakeRunner]:
    import harness.playbook.runner as runner

    monkeypatch.setattr(runner, "Runner", FakeRunner)
    FakeRunner.error = None
    return FakeRunner


def _run(tmp_path: Path, playbook: str, *extra: str) -> int:
    pb = tmp_path / "pb.yaml"
    pb.write_text(playbook)
    return main(["run", str(pb), "--out", str(tmp_path / "r"), "--export", "off", *extra])


def test_cli_push_failure_keeps_the_exit_status(
    tmp_path: Path, fake_runner: type[FakeRunner], capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    assert _run(tmp_path, PLAYBOOK, "--push", url) == 1
    cap = capsys.readouterr()
    (line,) = cap.err.splitlines()
    assert line.startswith(f"ksmh: push to {url} failed: ")
    assert "Traceback" not in cap.err + cap.out
    run_json = json.loads((tmp_path / "r/20261104-020000-quickstart/run.json").read_text())
    assert run_json["push"]["ok"] is False
    assert run_json["verdict"]["status"] == "failed"


def test_cli_playbook_push_field_and_off(
    tmp_path: Path, fake_runner: type[FakeRunner], capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    assert _run(tmp_path, PLAYBOOK + f"push: {url}\n") == 1
    assert f"ksmh: push to {url} failed" in capsys.readouterr().err
    (tmp_path / "r").rename(tmp_path / "r1")
    assert _run(tmp_path, PLAYBOOK + f"push: {url}\n", "--push", "off") == 1
    assert "push" not in capsys.readouterr().err
    assert "push" not in json.loads(
        (tmp_path / "r/20261104-020000-quickstart/run.json").read_text()
    )


def test_cli_pushes_an_errored_run_then_reports_its_error(
    tmp_path: Path, fake_runner: type[FakeRunner], capsys: pytest.CaptureFixture[str]
) -> None:
    fake_runner.error = GuestError("boot failed on 1 of 4 guests")
    url = f"http://127.0.0.1:{closed_port()}"
    assert _run(tmp_path, PLAYBOOK, "--push", url) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith(f"ksmh: push to {url} failed: ")
    assert err[1] == "ksmh: error: boot failed on 1 of 4 guests"


def test_cli_refuses_a_bad_push_url_before_running(
    tmp_path: Path, fake_runner: type[FakeRunner], capsys: pytest.CaptureFixture[str]
) -> None:
    assert _run(tmp_path, PLAYBOOK, "--push", "ftp://x") == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "ksmh: error: push URL 'ftp://x': expected http(s)://HOST[:PORT]"
    assert not (tmp_path / "r").exists()


def test_playbook_push_field_is_validated_with_file_and_line() -> None:
    pb = loads_playbook(PLAYBOOK + "push: 127.0.0.1:9091\n", "q.yaml")
    assert pb.push == "http://127.0.0.1:9091"
    assert loads_playbook(PLAYBOOK, "q.yaml").push is None
    line = len(PLAYBOOK.splitlines()) + 1
    with pytest.raises(PlaybookError) as exc:
        loads_playbook(PLAYBOOK + "push: ftp://pg\n", "q.yaml")
    assert exc.value.message == (
        f"q.yaml:{line}: push: push URL 'ftp://pg': expected http(s)://HOST[:PORT]"
    )
    with pytest.raises(PlaybookError) as exc:
        loads_playbook(PLAYBOOK + "push: 9091\n", "q.yaml")
    assert exc.value.message == f"q.yaml:{line}: push: expected a string, got int 9091"


# -- provenance and boot -------------------------------------------------------------------


def test_playbook_digest_is_of_the_file_bytes_or_the_parsed_content(tmp_path: Path) -> None:
    f = tmp_path / "p.yaml"
    f.write_bytes(b"name: x\n")
    assert playbook_digest(str(f)) == "sha256:" + hashlib.sha256(b"name: x\n").hexdigest()
    canonical = json.dumps({"a": 1, "b": [2]}, sort_keys=True, separators=(",", ":"))
    expected = "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()
    assert playbook_digest(str(tmp_path / "gone.yaml"), {"b": [2], "a": 1}) == expected


def test_git_revision_of_a_checkout_and_of_anything_else(tmp_path: Path) -> None:
    assert git_revision(tmp_path) == ("unknown", None)
    rev, dirty = git_revision(SOURCE_ROOT)
    if (SOURCE_ROOT / ".git").exists():
        head = run(["git", "-C", str(SOURCE_ROOT), "rev-parse", "HEAD"]).stdout.strip()
        assert rev == head and dirty in (True, False)


def test_gather_records_what_a_trend_groups_and_explains(tmp_path: Path) -> None:
    f = tmp_path / "p.yaml"
    f.write_text(PLAYBOOK)
    pb = loads_playbook(PLAYBOOK, str(f))
    prov = gather(pb)
    assert prov["host"] == socket.gethostname()
    assert prov["kernel_release"] == os.uname().release
    assert prov["playbook_digest"] == "sha256:" + hashlib.sha256(PLAYBOOK.encode()).hexdigest()
    assert re.match(r"^6\.\d+", prov["model_profile"])  # a ksm_model profile name
    assert prov["harness_version"] == "0.1.0" and prov["model_version"] == "0.1.0"
    if prov["qemu"] is not None:
        assert re.fullmatch(r"\d+\.\d+(\.\d+)?", prov["qemu"])
    assert gather(pb, model=None)["model_profile"] is None


def test_of_run_falls_back_to_host_facts_of_older_runs() -> None:
    old = {"host": {"hostname": "h", "kernel_release": "6.1.0",
                    "qemu": "QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7)"}}  # fmt: skip
    prov = of_run(old)
    assert (prov["host"], prov["kernel_release"], prov["qemu"]) == ("h", "6.1.0", "7.2.22")
    assert prov["harness_revision"] == "unknown" and prov["playbook_digest"] is None
    assert of_run({**old, "shadow": {"profile": "6.1"}})["model_profile"] == "6.1"


def test_boot_record_keeps_the_guests_that_booted() -> None:
    result = FleetResult(
        "boot",
        [
            GuestResult("g0", seconds=4.0),
            GuestResult("g1", seconds=6.5),
            GuestResult("g2", seconds=5.0),
            GuestResult("g3", error=GuestError("died"), seconds=1.0),
        ],
    )
    assert boot_record(result) == {
        "seconds": {"g0": 4.0, "g1": 6.5, "g2": 5.0},
        "median": 5.0,
        "max": 6.5,
    }
    assert boot_record(None) is None
    assert boot_record(FleetResult("boot", [])) is None
