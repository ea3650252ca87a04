"""Real sshd instances on loopback standing for fleet hosts (shared by the remote tests).

`sshd_fleet(dir)` starts one sshd per name (own port, own generated host key, one generated
user key for all) as root with UsePAM no on 127.0.0.1 only, writes a known_hosts for them, and
on exit stops them and every exporter supervisor `hosts prepare` started under their prefixes,
also when the test failed.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from harness.run import run, spawn
from tests.integration.conftest import free_port

SSHD = "/usr/sbin/sshd"


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


def _wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"sshd on port {port} did not start")


def children(pid: int) -> list[int]:
    """Pids whose parent is pid."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def stop_supervisors(prefixes: list[Path]) -> None:
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
        only: list[str] | None = None,
    ) -> Path:
        """Write an inventory of the hosts (or `only` those), plus `extra` ones."""
        hosts: dict[str, dict[str, object]] = {}
        for h in self.hosts:
            if only is not None and h.name not in only:
                continue
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


@contextmanager
def sshd_fleet(d: Path, names: tuple[str, ...] = ("alpha", "bravo")) -> Iterator[Fleet]:
    """Start one sshd per name under directory d; see the module docstring."""
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation dir
    user_key = d / "user_ed25519"
    user_pub = keygen(user_key)
    (d / "authorized_keys").write_text(user_pub + "\n")
    hosts: list[Sshd] = []
    procs = []
    try:
        for name in names:
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
            _wait_port(port)
            hosts.append(Sshd(name, port, host_pub, d / f"prefix-{name}", free_port()))
        known_hosts = d / "known_hosts"
        known_hosts.write_text("".join(h.known_hosts_line + "\n" for h in hosts))
        yield Fleet(d, hosts, user_key, known_hosts)
    finally:
        stop_supervisors([h.prefix for h in hosts])
        for p in procs:
            # Let per-connection children finish first, so none is orphaned mid-exit.
            deadline = time.monotonic() + 3
            while children(p.pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except Exception:
                p.kill()
                p.wait()
