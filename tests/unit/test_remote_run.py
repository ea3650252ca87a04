"""`ksmh run --inventory`: the remote command, exit-status mapping and one host's run driven
through a fake SSH session (no hosts; the real ones are in tests/integration/test_remote_run.py).
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from harness.errors import RemoteCommandFailed
from harness.remote.inventory import Host
from harness.remote.run import (
    RemoteRunOptions,
    _Remote,
    _status,
    new_fleet_id,
    parse_error,
    remote_argv,
    remote_workdir,
    run_on_host,
)
from harness.remote.ssh import CommandResult, _LineWriter
from harness.report.results import Results, write_results

HOST = Host("kvm a", "10.0.0.1", "ksm", Path("/k"), port=2222, prefix="/opt/ksm h")


def test_remote_argv_is_the_wrapper_then_the_installed_ksmh() -> None:
    opts = RemoteRunOptions(backend="kernel", export="off")
    argv = remote_argv(HOST, "/opt/ksm h/runs/x/p b.yaml", "/opt/ksm h/runs/x/results", opts)
    assert argv == [
        "sh", "-c", 'echo "ksmh-remote-pid $$" >&2; exec "$@"', "ksmh-run",
        "env", "KSM_HARNESS_IMAGE_DIR=/opt/ksm h/guest-images",
        "/opt/ksm h/venv/bin/ksmh", "run", "/opt/ksm h/runs/x/p b.yaml",
        "--backend", "kernel", "--out", "/opt/ksm h/runs/x/results", "--export", "off",
        "--push", "off",
    ]  # fmt: skip
    # What the remote shell sees: every argument one word, the spaces quoted.
    assert shlex.split(shlex.join(argv)) == argv
    assert remote_workdir(HOST, "20261126-1-q", "ab12") == "/opt/ksm h/runs/20261126-1-q-ab12"


def test_parse_error_takes_ksmh_error_and_hint() -> None:
    err = (
        "ksmh-remote-pid 42\n[ 0.1s] booting\n"
        "ksmh: error: /sys/kernel/mm/ksm is not writable\n  hint: run as root\n"
    )
    assert parse_error(err) == ("/sys/kernel/mm/ksm is not writable", "run as root")
    assert parse_error("ksmh: error: bad\n") == ("bad", None)
    # A crash: the traceback's last line; the pid line never counts.
    assert parse_error("Traceback...\n  File x\nZeroDivisionError: boom\n\n") == (
        "ZeroDivisionError: boom",
        None,
    )
    assert parse_error("ksmh-remote-pid 42\n") == (None, None)
    assert parse_error("[ 7.0s] stopping the fleet\nksmh: interrupted\n") == ("interrupted", None)


@pytest.mark.parametrize(
    ("code", "verdict", "status"),
    [
        (0, "passed", 0),
        (1, "failed", 1),
        (1, None, 2),  # exit 1 without a failed verdict: Python crashed there
        (1, "error", 2),
        (2, "error", 2),
        (130, "error", 130),
    ],
)
def test_status_mapping(code: int, verdict: str | None, status: int) -> None:
    run = None if verdict is None else {"verdict": {"status": verdict}}
    assert _status(code, run) == status


def test_new_fleet_id_never_reuses_a_directory(tmp_path: Path) -> None:
    fid = new_fleet_id("quick", tmp_path, now=0.0)
    assert fid.endswith("-quick") and len(fid) == len("19700101-000000-quick")
    (tmp_path / f"fleet-{fid}").mkdir()
    assert new_fleet_id("quick", tmp_path, now=0.0) == f"{fid}.2"
    (tmp_path / f"fleet-{fid}.2").mkdir()
    assert new_fleet_id("quick", tmp_path, now=0.0) == f"{fid}.3"


def test_line_writer_hands_over_whole_lines() -> None:
    got: list[str] = []
    w = _LineWriter(got.append)
    w.write("one\r\ntw")
    w.write("o\nthree")
    assert got == ["one", "two"]
    w.close()
    assert got == ["one", "two", "three"]


# -- one host through a fake session ----------------------------------------------------------


def _run_json(status: str, exit_status: int, failed: Sequence[str] = ()) -> dict[str, Any]:
    end = {"pages_shared": 16, "pages_sharing": 4080, "saved_bytes": 4080 * 4096}
    return {
        "run_id": "20261126-000000-tiny",
        "backend": "kernel",
        "accelerator": "tcg",
        "guests": [{"name": "g0"}],
        "duration_seconds": 12.5,
        "host": {"kernel_release": "6.18"},
        "phases": [
            {
                "name": "fill",
                "counters": {"kernel": {"end": end}, "model": {"end": end}},
                "expectations": [{"text": "verify: clean", "line": 8, "status": "passed"}]
                + [{"text": f, "line": 9, "status": "failed"} for f in failed],
            }
        ],
        "verdict": {"status": status, "exit_status": exit_status, "failed": list(failed)},
    }


class FakeSession:
    """Plays a host: records commands and uploads, returns a canned result for `ksmh run`,
    and `fetch_dir` copies a results directory written by the test."""

    def __init__(self, exit_code: int, stderr: str, results: Path | None) -> None:
        self.host = HOST
        self.exit_code = exit_code
        self.stderr = stderr
        self.results = results
        self.commands: list[list[str]] = []
        self.uploads: dict[str, bytes] = {}

    def run(
        self,
        argv: Sequence[str],
        *,
        check: bool = True,
        timeout: float | None = 120.0,
        on_stderr: Callable[[str], None] | None = None,
    ) -> CommandResult:
        self.commands.append(list(argv))
        if argv[0] == "mkdir":
            return CommandResult(tuple(argv), 0, "", "")
        assert on_stderr is not None and not check
        for line in self.stderr.splitlines():
            on_stderr(line)
        return CommandResult(tuple(argv), self.exit_code, "", self.stderr)

    def put_bytes(self, data: bytes, remote_path: str, mode: int = 0o644) -> None:
        self.uploads[remote_path] = data

    def listdir(self, remote_dir: str) -> list[str]:
        return [] if self.results is None else [self.results.name]

    def fetch_dir(self, remote_dir: str, local_dir: Path) -> list[str]:
        assert self.results is not None and remote_dir.endswith(f"/results/{self.results.name}")
        local_dir.mkdir(parents=True)
        names = []
        for p in sorted(self.results.iterdir()):
            (local_dir / p.name).write_bytes(p.read_bytes())
            names.append(p.name)
        return names


def _drive(tmp_path: Path, session: FakeSession) -> tuple[Any, list[str], _Remote]:
    playbook = tmp_path / "tiny.yaml"
    playbook.write_text("name: tiny\n")
    lines: list[str] = []
    remote = _Remote()
    opts = RemoteRunOptions(out=tmp_path / "out")
    summary = run_on_host(session, playbook, "F", "t0", opts, lines.append, remote)  # type: ignore[arg-type]
    return summary, lines, remote


def _results(tmp_path: Path, run: dict[str, Any]) -> Path:
    d = tmp_path / "remote" / str(run["run_id"])
    res = Results(run=run)
    res.add_sample(1.0, "fill", "kernel", {"pages_sharing": 5000}, None)
    res.add_sample(2.0, "fill", "kernel", {"pages_sharing": 4080}, None)
    write_results(d, res)
    return d


def test_a_passing_host_is_uploaded_run_fetched_rendered_and_summarized(tmp_path: Path) -> None:
    results = _results(tmp_path, _run_json("passed", 0))
    s = FakeSession(0, "ksmh-remote-pid 4242\n[ 0.1s] booting\n[ 9.0s] done", results)
    summary, lines, remote = _drive(tmp_path, s)
    work = "/opt/ksm h/runs/F-t0"
    assert s.commands[0] == ["mkdir", "-p", f"{work}/results"]
    assert s.uploads == {f"{work}/tiny.yaml": b"name: tiny\n"}
    assert s.commands[1][-10:] == [
        "run", f"{work}/tiny.yaml", "--backend", "auto", "--out", f"{work}/results",
        "--export", "off", "--push", "off",
    ]  # fmt: skip
    local = tmp_path / "out" / "kvm a" / "20261126-000000-tiny"
    assert lines == [
        f"kvm a: running tiny.yaml on 10.0.0.1:2222 (workdir {work})",
        "kvm a: [ 0.1s] booting",
        "kvm a: [ 9.0s] done",  # the last line had no newline
        f"kvm a: exit 0, fetched 4 files into {local}",  # run.json and three CSVs
    ]
    assert remote.pids == {}  # known while it ran, forgotten after
    assert (local / "report.md").exists()  # rendered here
    assert summary.status == "passed" and summary.exit_status == 0
    assert summary.directory == str(local)
    assert (summary.pages_sharing, summary.saved_bytes) == (4080, 4080 * 4096)
    assert summary.peak_saved_bytes == 5000 * 4096  # the highest sample, not the end
    assert summary.expectations == {"passed": 1}


def test_a_failed_expectation_is_status_1_with_the_failures(tmp_path: Path) -> None:
    results = _results(tmp_path, _run_json("failed", 1, ["line 9: x >= 1 (0 >= 1)"]))
    summary, _, _ = _drive(tmp_path, FakeSession(1, "", results))
    assert (summary.status, summary.exit_status) == ("failed", 1)
    assert summary.failed == ["line 9: x >= 1 (0 >= 1)"]
    assert summary.expectations == {"passed": 1, "failed": 1}
    assert summary.error is None


def test_a_crash_that_exits_1_is_an_error_not_a_failure(tmp_path: Path) -> None:
    results = _results(tmp_path, _run_json("error", 2))
    err = "Traceback (most recent call last):\nKeyError: 'x'\n"
    summary, _, _ = _drive(tmp_path, FakeSession(1, err, results))
    assert (summary.status, summary.exit_status, summary.error) == ("error", 2, "KeyError: 'x'")


def test_an_error_before_any_results_keeps_the_message_and_hint(tmp_path: Path) -> None:
    err = "ksmh: error: real KSM is not available\n  hint: use --backend model\n"
    summary, lines, _ = _drive(tmp_path, FakeSession(2, err, None))
    assert (summary.status, summary.exit_status) == ("error", 2)
    assert (summary.error, summary.hint) == ("real KSM is not available", "use --backend model")
    assert summary.directory is None and summary.run_id is None
    assert lines[-1] == "kvm a: exit 2, no results written"
    assert not (tmp_path / "out").exists()


def test_a_host_without_the_harness_says_prepare_it(tmp_path: Path) -> None:
    err = "env: '/opt/ksm h/venv/bin/ksmh': No such file or directory\n"
    with pytest.raises(RemoteCommandFailed) as exc:
        _drive(tmp_path, FakeSession(127, err, None))
    assert exc.value.message == (
        "kvm a: ksm-harness is not installed under /opt/ksm h (/opt/ksm h/venv/bin/ksmh not found)"
    )
    assert exc.value.hint == "run `ksmh hosts prepare INVENTORY` first"


def test_the_remote_pid_is_known_while_the_run_lasts(tmp_path: Path) -> None:
    seen: dict[str, int] = {}
    results = _results(tmp_path, _run_json("passed", 0))
    s = FakeSession(0, "ksmh-remote-pid 77\n", results)
    remote = _Remote()
    original = s.run

    def spy(argv: Sequence[str], **kw: Any) -> CommandResult:
        r = original(argv, **kw)
        seen.update(remote.pids)  # as Ctrl-C would read it, before run() returns
        return r

    s.run = spy  # type: ignore[method-assign]
    playbook = tmp_path / "tiny.yaml"
    playbook.write_text("name: tiny\n")
    run_on_host(s, playbook, "F", "t0", RemoteRunOptions(out=tmp_path), lambda _: None, remote)  # type: ignore[arg-type]
    assert seen == {"kvm a": 77}
    assert remote.pids == {}
    assert json.loads((tmp_path / "kvm a" / "20261126-000000-tiny" / "run.json").read_text())
