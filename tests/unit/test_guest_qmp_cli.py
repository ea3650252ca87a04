"""QMP (qemu.qmp) against a fake monitor, and the fleet CLI's error paths (no guests booted)."""

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
from harness.guests.qemu_backend import qmp_command

GREETING = {
    "QMP": {
        "version": {"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": "Debian"},
        "capabilities": ["oob"],
    }
}


def fake_monitor(
    path: Path, answers: dict[str, list[dict[str, object]]]
) -> list[dict[str, object]]:
    """Serve one QMP client: greeting, then scripted messages per command; returns requests.

    A scripted message without "event" is the command's reply and gets the request's id.
    """
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    seen: list[dict[str, object]] = []

    def serve() -> None:
        conn, _ = server.accept()
        conn.sendall(json.dumps(GREETING).encode() + b"\n")
        # QMP is a stream of JSON objects: no newline is promised between them.
        decoder, buf = json.JSONDecoder(), ""
        while data := conn.recv(65536):
            buf += data.decode()
            while buf.strip():
                try:
                    req, end = decoder.raw_decode(buf.lstrip())
                except ValueError:
                    break  # an incomplete object: read more
                buf = buf.lstrip()[end:]
                seen.append(req)
                for msg in answers[str(req["execute"])]:
                    reply = msg if "event" in msg else {**msg, "id": req.get("id")}
                    conn.sendall(json.dumps(reply).encode() + b"\n")
        conn.close()
        server.close()

    threading.Thread(target=serve, daemon=True).start()
    return seen


@pytest.fixture
def short_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="kq", dir="/tmp") as d:
        yield Path(d)


def test_qmp_negotiates_skips_events_and_returns(short_dir: Path) -> None:
    answers: dict[str, list[dict[str, object]]] = {
        "qmp_capabilities": [{"return": {}}],
        "query-status": [
            {"event": "RESUME", "timestamp": {"seconds": 1, "microseconds": 0}},
            {"return": {"status": "running", "running": True}},
        ],
    }
    seen = fake_monitor(short_dir / "m", answers)
    assert qmp_command(short_dir / "m", "query-status", timeout=5) == {
        "status": "running",
        "running": True,
    }
    assert [r["execute"] for r in seen] == ["qmp_capabilities", "query-status"]


def test_qmp_refused_command_is_a_guest_error_with_class_and_description(short_dir: Path) -> None:
    answers: dict[str, list[dict[str, object]]] = {
        "qmp_capabilities": [{"return": {}}],
        "bad": [{"error": {"class": "CommandNotFound", "desc": "no bad"}}],
    }
    seen = fake_monitor(short_dir / "m", answers)
    with pytest.raises(GuestError, match=r"^QMP bad: CommandNotFound: no bad$"):
        qmp_command(short_dir / "m", "bad", timeout=5)
    assert [r["execute"] for r in seen] == ["qmp_capabilities", "bad"]


def test_qmp_missing_socket_is_a_guest_error(short_dir: Path) -> None:
    with pytest.raises(GuestError, match=r"^QMP .*/nope: "):
        qmp_command(short_dir / "nope", "quit", timeout=1)


def test_qmp_silent_monitor_times_out(short_dir: Path) -> None:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(short_dir / "m"))
    server.listen(1)  # accepts (in the backlog) but never greets: a wedged QEMU
    try:
        with pytest.raises(GuestError, match=r"no answer within 0.3 s"):
            qmp_command(short_dir / "m", "quit", timeout=0.3)
    finally:
        server.close()


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
