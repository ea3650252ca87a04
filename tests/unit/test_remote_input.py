"""Remote-side input checks: probe replies (one bad host fails alone), results directory names,
loopback scrape targets in the monitoring config."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.cli import main
from harness.errors import RemoteCommandFailed
from harness.monitoring.config import loopback_targets
from harness.remote import fleet as remote_fleet
from harness.remote.inventory import Host, parse_inventory
from harness.remote.probe import Facts, read_facts
from harness.remote.run import results_dir_name

GOOD = {
    "version": [3, 11], "soabi": "cpython-311-x86_64-linux-gnu", "machine": "x86_64", "uid": 0,
    "systemd": False, "ksm_present": True, "ksm_writable": True, "ksm_run": "0",
    "kvm_exists": True, "kvm_rw": True, "digest": None, "venv": False, "supervisor": None,
    "state": None,
}  # fmt: skip


class Reply:
    def __init__(self, stdout: str) -> None:
        self.ok, self.stdout, self.stderr, self.exit_code = True, stdout, "", 0


class FakeSession:
    """What read_facts uses of a Session: host and run(); each host answers its own text."""

    def __init__(self, host: Host, answer: str) -> None:
        self.host, self.answer = host, answer

    def run(self, argv: list[str], check: bool = True) -> Reply:
        return Reply(self.answer)


def test_one_host_with_a_bad_probe_reply_fails_alone(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    inv = parse_inventory(
        "defaults: {user: u, key_file: k}\n"
        "hosts: {a: {address: 10.0.0.1}, b: {address: 10.0.0.2}, c: {address: 10.0.0.3}}\n",
        tmp_path / "inv.yaml",
    )
    answers = {"a": json.dumps(GOOD), "b": '{"version": "3.11"}', "c": "Welcome to host c!\n"}

    @contextlib.contextmanager
    def open_session(conn: object, host: Host, known_hosts: Path) -> Iterator[FakeSession]:
        yield FakeSession(host, answers[host.name])

    monkeypatch.setattr(remote_fleet, "open_session", open_session)
    result = remote_fleet.on_fleet(inv, lambda s: read_facts(s, "/opt/k"))  # type: ignore[arg-type]
    assert isinstance(result["a"].value, Facts) and result["a"].value.version == (3, 11)
    assert {r.name: r.error.message for r in result.failed if r.error} == {
        "b": "b: unexpected reply from the host probe (version: Input should be a valid array)",
        "c": "c: unexpected reply from the host probe (reply: Invalid JSON: expected value at "
        "line 1 column 1)",
    }
    assert all(isinstance(r.error, RemoteCommandFailed) and r.error.hint for r in result.failed)


@pytest.mark.parametrize("name", ["20261126-154727-quickstart", "r1", "a.b_c-d"])
def test_results_dir_names_accepted(name: str) -> None:
    assert results_dir_name("h", name) == name


@pytest.mark.parametrize(
    "name", ["..", ".", "/etc", "../x", "a/b", "", ".hidden", "a\nb", "x" * 200]
)
def test_results_dir_names_refused(name: str) -> None:
    with pytest.raises(RemoteCommandFailed) as info:
        results_dir_name("h", name)
    assert info.value.message == f"h: refusing results directory name {name[:80]!r}"
    assert info.value.hint


LOOPBACK = """defaults: {user: u, key_file: k}
hosts:
  local: {address: 127.0.0.1, port: 2201}
  far: {address: 10.0.0.2}
  wild: {address: 10.0.0.3, exporter: {listen: "0.0.0.0:9712"}}
  own: {address: 10.0.0.4, exporter: {listen: "10.0.0.4:9712"}}
  six: {address: 10.0.0.5, exporter: {listen: "[::1]:9712"}}
"""


def test_loopback_targets_of_remote_hosts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "inv.yaml"
    path.write_text(LOOPBACK)
    assert loopback_targets(parse_inventory(LOOPBACK, path)) == ["far", "six"]
    assert main(["monitoring", "config", str(path), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err == (
        "ksmh: error: 2 of 5 hosts (far, six) have a remote address but an exporter on "
        "loopback: Prometheus would scrape itself for each\n"
        "  hint: give them `exporter: {listen: ADDRESS:9712}` in the inventory (or "
        "0.0.0.0:9712), or pass --allow-loopback\n"
    )
    assert not (tmp_path / "o").exists()
    out = tmp_path / "o2"
    assert main(["monitoring", "config", str(path), "--out", str(out), "--allow-loopback"]) == 0
    assert capsys.readouterr().err.startswith("ksmh: warning: 2 of 5 hosts (far, six)")
    assert (out / "prometheus.yml").exists()
