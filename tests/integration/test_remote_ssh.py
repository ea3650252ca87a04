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
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness.cli import main
from harness.run import run, spawn

pytestmark = pytest.mark.ssh

SSHD = "/usr/sbin/sshd"
KSM = Path("/sys/kernel/mm/ksm")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def keygen(path: Path) -> str:
    """Generate an unencrypted ed25519 key; returns the public key line."""
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", path.name, "-f", path])
    return path.with_suffix(".pub").read_text().strip()


@dataclass
class Sshd:
    name: str
    port: int
    host_pub: str  # "ssh-ed25519 AAAA... comment"
    prefix: Path
    exporter_port: int

    @property
    def known_hosts_line(self) -> str:
        kind, b64 = self.host_pub.split()[:2]
        return f"[127.0.0.1]:{self.port} {kind} {b64}"


def _wait_port(port: int, proc: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"sshd on port {port} did not start")


def _stop_supervisors(prefixes: list[Path]) -> None:
    """Kill any exporter supervisor left under the prefixes (local: the hosts are loopback)."""
    for prefix in prefixes:
        pidfile = prefix / "run" / "exporter.pid"
        try:
            pid = int(pidfile.read_text())
        except (OSError, ValueError):
            continue
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
        deadline = time.monotonic() + 10
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.1)


@dataclass
class Fleet:
    dir: Path
    hosts: list[Sshd]
    user_key: Path
    known_hosts: Path

    def inventory(
        self,
        name: str = "inventory.yaml",
        known_hosts: Path | None = None,
        extra: dict[str, dict[str, object]] | None = None,
        host_fields: dict[str, dict[str, object]] | None = None,
    ) -> Path:
        hosts: dict[str, dict[str, object]] = {}
        for h in self.hosts:
            hosts[h.name] = {
                "address": "127.0.0.1",
                "port": h.port,
                "prefix": str(h.prefix),
                "exporter": {"listen": f"127.0.0.1:{h.exporter_port}"},
                "labels": {"ksm_expected": "true"},
                **(host_fields or {}).get(h.name, {}),
            }
        hosts.update(extra or {})
        doc = {
            "known_hosts": str(known_hosts or self.known_hosts),
            "defaults": {
                "user": "root",
                "key_file": str(self.user_key),
                "python": "/usr/bin/python3",
            },
            "hosts": hosts,
        }
        path = self.dir / name
        path.write_text(json.dumps(doc, indent=2))  # JSON is YAML
        return path


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    d = tmp_path_factory.mktemp("remote")
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation dir
    user_key = d / "user_ed25519"
    user_pub = keygen(user_key)
    (d / "authorized_keys").write_text(user_pub + "\n")
    hosts: list[Sshd] = []
    procs = []
    try:
        for name in ("alpha", "bravo"):
            port = free_port()
            host_pub = keygen(d / f"host_{name}")
            cfg = d / f"sshd_{name}.conf"
            cfg.write_text(
                "\n".join(
                    [
                        f"Port {port}",
                        "ListenAddress 127.0.0.1",
                        f"HostKey {d / f'host_{name}'}",
                        f"PidFile {d / f'sshd_{name}.pid'}",
                        f"AuthorizedKeysFile {d / 'authorized_keys'}",
                        "PermitRootLogin prohibit-password",
                        "PasswordAuthentication no",
                        "KbdInteractiveAuthentication no",
                        "PubkeyAuthentication yes",
                        "UsePAM no",
                        "StrictModes no",
                        "AllowTcpForwarding yes",
                        "Subsystem sftp internal-sftp",
                        "LogLevel ERROR",
                        "",
                    ]
                )
            )
            log = (d / f"sshd_{name}.log").open("wb")
            procs.append(spawn([SSHD, "-D", "-e", "-f", cfg], stderr=log))
            _wait_port(port, procs[-1])
            hosts.append(Sshd(name, port, host_pub, d / f"prefix-{name}", free_port()))
        known_hosts = d / "known_hosts"
        known_hosts.write_text("".join(h.known_hosts_line + "\n" for h in hosts))
        yield Fleet(d, hosts, user_key, known_hosts)
    finally:
        _stop_supervisors([h.prefix for h in hosts])
        for p in procs:
            # Let per-connection children finish first, so none is orphaned mid-exit.
            deadline = time.monotonic() + 3
            while _children(p.pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except Exception:
                p.kill()
                p.wait()


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


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


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
        assert (
            f"into {h.prefix}/venv (prometheus-client, PyYAML, libvirt-python)" in steps["install"]
        )
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
        "ksmh: error: /nonexistent/inv.yaml: cannot read inventory (No such file or directory)"
    )
