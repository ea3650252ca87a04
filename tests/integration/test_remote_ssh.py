"""`ksmh hosts check|prepare` against real sshd instances on loopback, each standing for a host.

Two sshd processes (own port, own generated host key, one generated user key) run as root
with UsePAM no on 127.0.0.1 only; they and every exporter `prepare` starts are stopped in
teardown, also when a test fails. `prepare` installs into temporary prefixes from the local
environment (no network: see harness.remote.bundle).
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.cli import main
from harness.run import run
from tests.integration.conftest import free_port
from tests.integration.sshd import Fleet, keygen, sshd_fleet
from tests.integration.sshd import children as _children

pytestmark = pytest.mark.ssh

KSM = Path("/sys/kernel/mm/ksm")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    with sshd_fleet(tmp_path_factory.mktemp("remote")) as f:
        yield f


def ksmh(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _check_json(capsys: pytest.CaptureFixture[str], inv: Path) -> tuple[int, dict[str, dict]]:  # type: ignore[type-arg]
    code, out, _ = ksmh(capsys, "hosts", "check", inv, "--json")
    return code, {row["host"]: row for row in json.loads(out)}


def _kvm_expected() -> str:
    if not Path("/dev/kvm").exists():
        return "absent"
    return "rw" if os.access("/dev/kvm", os.R_OK | os.W_OK) else "no access"


def _kvm_verdict() -> tuple[str, str]:
    from harness.guests.accel import cached_verdict, default_cache_path, host_key

    static = _kvm_expected()
    v = cached_verdict(default_cache_path(), host_key())
    if static != "rw" or v is None:
        return static, ""
    return ("usable" if v.usable else "unusable"), v.reason


def test_check_reports_every_host(fleet: Fleet, capsys: pytest.CaptureFixture[str]) -> None:
    # Own prefixes: nothing installed there, whatever order the tests run in.
    fresh = {h.name: {"prefix": str(fleet.dir / f"fresh-{h.name}")} for h in fleet.hosts}
    code, rows = _check_json(capsys, fleet.inventory("fresh.yaml", host_fields=fresh))
    assert code == 0
    assert sorted(rows) == ["alpha", "bravo"]
    for name, row in rows.items():
        assert row["reachable"] is True
        assert row["kernel"] == os.uname().release
        assert row["ksm_present"] is True
        assert row["ksm_writable"] is os.access(KSM / "run", os.W_OK)
        assert row["kvm"] == _kvm_expected()
        assert row["missing_packages"] == []
        assert row["harness"] == "absent"
        assert row["exporter"] == "down"
        assert row["usable"] is True, row["problems"]
        assert row["address"] == f"127.0.0.1:{fleet.hosts[['alpha', 'bravo'].index(name)].port}"


def test_unreachable_host_is_a_row_and_fails_the_check(
    fleet: Fleet, capsys: pytest.CaptureFixture[str]
) -> None:
    dead = {"charlie": {"address": "127.0.0.1", "port": free_port()}}
    inv = fleet.inventory("with-dead.yaml", extra=dead)
    code, out, err = ksmh(capsys, "hosts", "check", inv)
    assert code == 1
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["HOST", "ADDRESS", "SSH"]
    table = {ln.split()[0]: ln.split() for ln in lines[1:4]}
    assert table["alpha"][2] == "ok" and table["alpha"][-1] == "yes"
    assert table["bravo"][2] == "ok" and table["bravo"][-1] == "yes"
    assert table["charlie"][2] == "FAIL" and table["charlie"][-1] == "NO"
    assert any(ln.startswith("charlie: cannot connect to 127.0.0.1:") for ln in lines)
    assert "1 of 3 hosts unusable: charlie" in err


def test_unknown_host_key_refused_unless_trusted_on_first_use(
    fleet: Fleet, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = fleet.dir / "known_hosts.empty"
    empty.write_text("")
    inv = fleet.inventory(
        "tofu.yaml", known_hosts=empty, host_fields={"bravo": {"trust_on_first_use": True}}
    )
    code, rows = _check_json(capsys, inv)
    assert code == 1
    assert rows["alpha"]["reachable"] is False
    assert rows["alpha"]["problems"][0].startswith("alpha: unknown host key ssh-ed25519 SHA256:")
    bravo = fleet.hosts[1]
    assert rows["bravo"]["reachable"] is True and rows["bravo"]["usable"] is True
    # TOFU recorded exactly bravo's key, and nothing for the refused alpha.
    assert empty.read_text() == bravo.known_hosts_line + "\n"
    # Second time round bravo is known: same result without appending again.
    code, rows = _check_json(capsys, inv)
    assert rows["bravo"]["reachable"] is True
    assert empty.read_text() == bravo.known_hosts_line + "\n"


def test_changed_host_key_refused_even_with_tofu(
    fleet: Fleet, capsys: pytest.CaptureFixture[str]
) -> None:
    other = keygen(fleet.dir / "impostor").split()
    alpha = fleet.hosts[0]
    kh = fleet.dir / "known_hosts.wrong"
    kh.write_text(f"[127.0.0.1]:{alpha.port} {other[0]} {other[1]}\n")
    inv = fleet.inventory(
        "changed.yaml", known_hosts=kh, host_fields={"alpha": {"trust_on_first_use": True}}
    )
    code, out, _ = ksmh(capsys, "hosts", "check", inv)
    assert code == 1
    assert f"alpha: host key for [127.0.0.1]:{alpha.port} CHANGED" in out
    assert kh.read_text() == f"[127.0.0.1]:{alpha.port} {other[0]} {other[1]}\n"


def _metrics(port: int) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return str(r.read().decode())


def test_prepare_installs_starts_exporter_and_is_idempotent(
    fleet: Fleet, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Other work edits the source tree while this runs; a changed tree is (rightly) a new
    # bundle, so pin one build per ABI for the two prepare runs compared here.
    from harness.remote import bundle

    monkeypatch.setattr(bundle, "build_bundle", functools.cache(bundle.build_bundle))
    inv = fleet.inventory()
    code, out, err = ksmh(capsys, "hosts", "prepare", inv, "--json")
    assert code == 0, out + err
    first = json.loads(out)
    for h in fleet.hosts:
        r = first[h.name]
        assert r["ok"] and r["service"] == "background"
        steps = dict(r["steps"])
        assert steps["packages"] == "unchanged: all present"
        assert steps["install"].startswith("done: bundle ")
        shipped = bundle.build_bundle(bundle.local_soabi()).distributions  # the same (cached)
        assert {"prometheus-client", "PyYAML", "pydantic", "qemu.qmp", "rich"} <= set(shipped)
        assert f"into {h.prefix}/venv ({', '.join(shipped)})" in steps["install"]
        assert steps["exporter"] == (
            f"started: no systemd, supervised background process on 127.0.0.1:"
            f"{h.exporter_port}, pid file {h.prefix}/run/exporter.pid"
        )
        assert int((h.prefix / "run" / "exporter.pid").read_text()) == r["exporter_pid"]
        # The exporter serves the real kernel, bound to the inventory address, host label set.
        text = _metrics(h.exporter_port)
        assert f'ksm_run{{host="{h.name}",source="kernel"}} ' in text
        assert (h.prefix / "venv" / "bin" / "ksmh").exists()

    code, rows = _check_json(capsys, inv)
    assert code == 0
    for h in fleet.hosts:
        assert rows[h.name]["exporter"] == f"up (pid {first[h.name]['exporter_pid']})"
        digest = (h.prefix / ".bundle-sha256").read_text().strip()
        assert rows[h.name]["harness"] == digest[:12]
        # With the harness installed, KVM is the accel probe's cached verdict for this machine.
        assert (rows[h.name]["kvm"], rows[h.name]["kvm_reason"]) == _kvm_verdict()

    # Idempotent: nothing reinstalled, the same supervisor keeps running.
    code, out, _ = ksmh(capsys, "hosts", "prepare", inv, "--json")
    assert code == 0
    second = json.loads(out)
    for h in fleet.hosts:
        steps = dict(second[h.name]["steps"])
        assert steps["install"].startswith("unchanged: bundle ")
        assert steps["exporter"].startswith("unchanged: no systemd")
        assert second[h.name]["exporter_pid"] == first[h.name]["exporter_pid"]

    # Supervised: kill the exporter itself, the supervisor starts a new one.
    sup = first["alpha"]["exporter_pid"]
    (child,) = _children(sup)
    os.kill(child, signal.SIGKILL)
    deadline = time.monotonic() + 15
    new: list[int] = []
    while time.monotonic() < deadline:
        new = [c for c in _children(sup) if c != child]
        if new:
            try:
                if "ksm_run{" in _metrics(fleet.hosts[0].exporter_port):
                    break
            except OSError:
                pass
        time.sleep(0.2)
    assert new, "supervisor did not restart the exporter"

    code, out, _ = ksmh(capsys, "hosts", "stop-exporter", inv)
    assert code == 0
    assert sorted(out.splitlines()) == ["alpha: stopped", "bravo: stopped"]
    for h in fleet.hosts:
        assert not (h.prefix / "run" / "exporter.pid").exists()
        with pytest.raises(OSError):
            _metrics(h.exporter_port)


def test_missing_inventory_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = ksmh(capsys, "hosts", "check", "/nonexistent/inv.yaml")
    assert code == 2
    assert err.splitlines()[0] == (
        "ksmh: error: /nonexistent/inv.yaml: cannot read inventory: No such file or directory"
    )


def test_on_fleet_one_result_per_host_in_order_bounded_by_parallel(fleet: Fleet) -> None:
    import threading

    from harness.remote.fleet import on_fleet
    from harness.remote.inventory import load_inventory

    dead = {"charlie": {"address": "127.0.0.1", "port": free_port()}}
    inv = load_inventory(fleet.inventory("on-fleet.yaml", extra=dead))
    lock, busy, peak = threading.Lock(), [0], [0]

    def uname(s: Any) -> str:
        with lock:
            busy[0] += 1
            peak[0] = max(peak[0], busy[0])
        try:
            time.sleep(0.2)  # long enough for a second session to overlap, were it allowed
            return str(s.run(["uname", "-r"]).stdout.strip())
        finally:
            with lock:
                busy[0] -= 1

    result = on_fleet(inv, uname, parallel=1)
    assert list(result) == ["alpha", "bravo", "charlie"]
    assert {r.name: r.value for r in result.succeeded} == {
        "alpha": os.uname().release,
        "bravo": os.uname().release,
    }
    [failed] = result.failed
    assert failed.name == "charlie" and "cannot connect to 127.0.0.1:" in str(failed.error)
    assert peak[0] == 1
    with pytest.raises(Exception, match=r"^uname failed on 1 of 3 hosts: charlie: cannot"):
        result.raise_if_failed()


def test_on_fleet_reraises_a_bug_after_every_host_is_done(fleet: Fleet) -> None:
    from harness.remote.fleet import on_fleet
    from harness.remote.inventory import load_inventory

    inv = load_inventory(fleet.inventory("bug.yaml"))
    seen: list[str] = []

    def buggy(s: Any) -> None:
        seen.append(s.host.name)
        if s.host.name == "alpha":
            raise KeyError("a bug, not a host failure")

    with pytest.raises(KeyError, match="a bug"):
        on_fleet(inv, buggy)
    assert sorted(seen) == ["alpha", "bravo"]


def test_check_output_carries_no_paramiko_log_lines(fleet: Fleet) -> None:
    """The exporter is down on these hosts: paramiko logs the refused direct-tcpip channel
    ("Secsh channel 1 open FAILED: ...") at ERROR, which Python's last-resort handler would
    print to stderr in a process without logging configured, i.e. `ksmh` itself."""
    fresh = {h.name: {"prefix": str(fleet.dir / f"quiet-{h.name}")} for h in fleet.hosts}
    inv = fleet.inventory("quiet.yaml", host_fields=fresh)
    proc = run([sys.executable, "-m", "harness.cli", "hosts", "check", str(inv)], check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stderr == ""
    rows = proc.stdout.splitlines()
    assert [r.split()[0] for r in rows] == ["HOST", "alpha", "bravo"]
    assert all(r.split()[-2:] == ["down", "yes"] for r in rows[1:])
