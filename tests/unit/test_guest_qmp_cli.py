"""QMP client against a fake monitor, and the fleet CLI's error paths (no guests booted)."""

from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.errors import GuestError, HarnessError
from harness.guests import cli
from harness.guests.qmp import QmpClient


def fake_monitor(path: Path, answers: dict[str, str]) -> list[dict[str, object]]:
    """Serve one QMP client: greeting, then a scripted line per command; returns requests."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    seen: list[dict[str, object]] = []

    def serve() -> None:
        conn, _ = server.accept()
        conn.sendall(b'{"QMP": {"version": {}, "capabilities": []}}\n')
        f = conn.makefile("rb")
        for line in f:
            req = json.loads(line)
            seen.append(req)
            conn.sendall(answers[str(req["execute"])].encode() + b"\n")
        conn.close()
        server.close()

    threading.Thread(target=serve, daemon=True).start()
    return seen


@pytest.fixture
def short_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="kq", dir="/tmp") as d:
        yield Path(d)


def test_qmp_negotiates_skips_events_and_returns(short_dir: Path) -> None:
    seen = fake_monitor(
        short_dir / "m",
        {
            "qmp_capabilities": '{"return": {}}',
            "query-status": '{"event": "RESUME", "timestamp": {}}\n'
            '{"return": {"status": "running", "running": true}}',
            "bad": '{"error": {"class": "CommandNotFound", "desc": "no bad"}}',
        },
    )
    with QmpClient(short_dir / "m", timeout=5) as qmp:
        assert qmp.execute("query-status") == {"status": "running", "running": True}
        with pytest.raises(GuestError, match="QMP bad: CommandNotFound: no bad"):
            qmp.execute("bad")
    assert [r["execute"] for r in seen] == ["qmp_capabilities", "query-status", "bad"]


def test_qmp_missing_socket_is_a_guest_error(short_dir: Path) -> None:
    with pytest.raises(GuestError, match=r"QMP .*/nope"):
        QmpClient(short_dir / "nope", timeout=1)


def ksmh(root: Path, *argv: str) -> int:
    parser = argparse.ArgumentParser(prog="ksmh")
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["fleet", "--runtime-dir", str(root), *argv])
    return int(args.func(args))


def test_exec_without_a_command(short_dir: Path) -> None:
    with pytest.raises(HarnessError, match="no agent command given"):
        ksmh(short_dir, "exec", "--run", "r1", "--")


def test_exec_without_any_run(short_dir: Path) -> None:
    with pytest.raises(HarnessError, match="no fleet is running") as exc:
        ksmh(short_dir, "exec", "--", "ping")
    assert exc.value.hint == "start one with `ksmh fleet up --count N`"


def test_exec_with_several_runs_needs_run_id(short_dir: Path) -> None:
    for run_id, created in (("ra", 1), ("rb", 2)):
        (short_dir / run_id).mkdir()
        (short_dir / run_id / "run.json").write_text(
            json.dumps({"run_id": run_id, "created": created, "guests": []})
        )
    with pytest.raises(HarnessError, match=r"2 fleet runs exist \(ra, rb\)"):
        ksmh(short_dir, "exec", "--", "ping")


def test_down_of_unknown_run(short_dir: Path) -> None:
    with pytest.raises(HarnessError, match="no fleet run 'rzz'"):
        ksmh(short_dir, "down", "--run", "rzz")


def test_list_when_empty(short_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert ksmh(short_dir, "list", "--json") == 0
    data = json.loads(capsys.readouterr().out)
    assert data["runs"] == []
    assert all(lo["name"].startswith("ksmh-") for lo in data["leftovers"])


def test_down_all_removes_stale_dirs_and_skips_entries_that_vanish(
    short_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Never look for (and kill) real leftover guests from a unit test.
    monkeypatch.setattr(cli, "_leftovers", lambda root: [])
    stale, fresh = short_dir / "rstale", short_dir / "rfresh"
    stale.mkdir()
    fresh.mkdir()
    os.utime(stale, (1, 1))
    # An entry whose stat() fails like one another process removed after iterdir listed it
    # (before the fix, a FileNotFoundError traceback).
    (short_dir / "rgone").symlink_to(short_dir / "nowhere")
    assert ksmh(short_dir, "down", "--all") == 0
    assert not stale.exists() and fresh.exists()
    assert capsys.readouterr().out == ""
