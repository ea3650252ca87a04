"""`ksmh hosts prepare`: install ksm-harness on a host and start its exporter there. Idempotent.

Per host, in order: read the host's facts (harness.remote.probe; needs python3 >= 3.11),
install missing system packages (apt-get, root only), make a venv at PREFIX/venv
(--system-site-packages, --without-pip: nothing is fetched from PyPI) and unpack the bundle
(harness.remote.bundle) into it unless the same digest is already installed, then run the
exporter bound to the inventory's address: as the systemd unit rendered from
harness/monitoring/templates/ksmh-exporter.service (package data) where systemd runs, else
under harness.remote.supervise with a pid file. Each step reports "done"/"started"/"restarted"
or "unchanged".
"""

from __future__ import annotations

import json
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from harness.errors import RemoteCommandFailed
from harness.paths import data_path
from harness.remote.bundle import SYSTEM_FALLBACK, Bundle
from harness.remote.inventory import Host
from harness.remote.probe import Facts, read_facts
from harness.remote.ssh import Session

# What a fleet host needs to run guests, KSM and the harness (Debian names).
REMOTE_PACKAGES = (
    "python3",
    "python3-venv",
    "qemu-system-x86",
    "busybox-static",
    "linux-image-amd64",
    "kmod",
    "cpio",
    "libvirt-daemon-system",
    "gcc",  # the guest image's agent is compiled on the host (gcc -static needs libc6-dev)
    "libc6-dev",
)
UNIT_NAME = "ksmh-exporter.service"
UNIT_TEMPLATE = ("harness.monitoring", f"templates/{UNIT_NAME}")  # package data
MIN_PYTHON = (3, 11)

# Run by the venv's python: replace our packages in its site-packages with the archive's.
# (Removing the old copy first means a module deleted upstream does not linger.)
_INSTALL = """
import shutil, sys, sysconfig, tarfile
site = sysconfig.get_paths()["purelib"]
for name in ("harness", "ksm_model"):
    shutil.rmtree(site + "/" + name, ignore_errors=True)
with tarfile.open(sys.argv[1]) as t:
    kw = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
    t.extractall(site, **kw)
print(site)
"""


@dataclass(frozen=True)
class Layout:
    """Where things live under a host's prefix."""

    prefix: str

    @property
    def venv(self) -> str:
        return f"{self.prefix}/venv"

    @property
    def python(self) -> str:
        return f"{self.venv}/bin/python"

    @property
    def digest_file(self) -> str:
        return f"{self.prefix}/.bundle-sha256"

    @property
    def pidfile(self) -> str:
        return f"{self.prefix}/run/exporter.pid"

    @property
    def state_file(self) -> str:
        return f"{self.prefix}/run/exporter.json"

    @property
    def log(self) -> str:
        return f"{self.prefix}/log/exporter.log"

    def supervise(self, *args: str) -> list[str]:
        return [self.python, "-m", "harness.remote.supervise", "--pidfile", self.pidfile, *args]


def exporter_argv(host: Host, layout: Layout) -> list[str]:
    """The exporter command line: `ksmh export` on the kernel, bound where the inventory says,
    with the live twin and its what-ifs when the inventory turns them on."""
    argv = [
        layout.python,
        "-m",
        "harness.cli",
        "export",
        "--backend",
        "kernel",
        "--listen",
        host.exporter_listen,
        "--host",
        host.name,
    ]
    if host.exporter_twin:
        argv += ["--twin", "--twin-cpu", host.exporter_twin_cpu]
        for w in host.exporter_what_if:
            argv += ["--what-if", w]
    return argv


# Who the exporter runs as. Reading KSM needs no privilege: a throwaway user. The twin reads
# the memory of the processes KSM scans (/proc/PID/mem needs ptrace rights over them;
# pagemap's PFNs and /proc/kpageflags need CAP_SYS_ADMIN): root, with only those capabilities.
IDENTITY_PLAIN = "DynamicUser=yes"
IDENTITY_TWIN = "User=root\nCapabilityBoundingSet=CAP_SYS_PTRACE CAP_SYS_ADMIN"


def render_unit(host: Host, layout: Layout) -> str:
    """The systemd unit for this host: the template with @EXEC@, @PREFIX@ and @IDENTITY@
    filled in.

    The first two are quoted: systemd splits ExecStart= and ReadOnlyPaths= at whitespace.
    """
    text = data_path(*UNIT_TEMPLATE).read_text()
    identity = IDENTITY_TWIN if host.exporter_twin else IDENTITY_PLAIN
    return (
        text.replace("@EXEC@", shlex.join(exporter_argv(host, layout)))
        .replace("@PREFIX@", shlex.quote(layout.prefix))
        .replace("@IDENTITY@", identity)
    )


@dataclass
class PrepareReport:
    """What prepare did on one host: steps as (name, outcome), and how the exporter runs."""

    host: str
    steps: list[tuple[str, str]] = field(default_factory=list)
    service: str = ""
    exporter_pid: int | None = None

    def step(self, name: str, outcome: str) -> None:
        self.steps.append((name, outcome))


def missing_packages(s: Session, packages: tuple[str, ...] = REMOTE_PACKAGES) -> list[str] | None:
    """Debian packages not installed on the host; None when the host has no dpkg."""
    fmt = "${Package} ${db:Status-Status}\n"
    r = s.run(["dpkg-query", "-W", f"-f={fmt}", *packages], check=False)
    if r.exit_code == 127:  # the remote shell found no dpkg-query
        return None
    installed = {ln.split()[0] for ln in r.stdout.splitlines() if ln.endswith(" installed")}
    return [p for p in packages if p not in installed]


def _install_packages(s: Session, facts: Facts, report: PrepareReport, extra: list[str]) -> None:
    missing = missing_packages(s, (*REMOTE_PACKAGES, *extra))
    if missing is None:
        report.step("packages", "skipped: no dpkg on this host, install them by hand")
        return
    if not missing:
        report.step("packages", "unchanged: all present")
        return
    if facts.uid != 0:
        raise RemoteCommandFailed(
            f"{s.host.name}: missing packages {' '.join(missing)} and {s.host.user} is not root",
            hint=f"on the host: sudo apt-get install -y {' '.join(missing)}",
        )
    env = ["env", "DEBIAN_FRONTEND=noninteractive"]
    s.run([*env, "apt-get", "update", "-qq"], timeout=600)
    s.run(
        [*env, "apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing], timeout=1800
    )
    report.step("packages", f"done: installed {' '.join(missing)}")


def _install_bundle(
    s: Session, facts: Facts, layout: Layout, bundle: Bundle, report: PrepareReport
) -> bool:
    """Unpack the bundle unless the same digest is installed; True when something changed."""
    if facts.digest == bundle.sha256 and facts.venv:
        report.step("install", f"unchanged: bundle {bundle.sha256[:12]} at {layout.venv}")
        return False
    s.run(["mkdir", "-p", f"{layout.prefix}/run", f"{layout.prefix}/log"])
    if not facts.venv:
        py = s.host.python
        s.run([py, "-m", "venv", "--without-pip", "--system-site-packages", layout.venv])
    archive = f"{layout.prefix}/bundle.tar.gz"
    s.put_bytes(bundle.data, archive)
    s.run([layout.python, "-c", _INSTALL, archive])
    script = f"#!{layout.python}\nimport sys\nfrom harness.cli import main\nsys.exit(main())\n"
    s.put_bytes(script.encode(), f"{layout.venv}/bin/ksmh", mode=0o755)
    s.put_bytes(f"{bundle.sha256}\n".encode(), layout.digest_file)  # last: marks it complete
    shipped = ", ".join(bundle.distributions) or "none"
    report.step("install", f"done: bundle {bundle.sha256[:12]} into {layout.venv} ({shipped})")
    return True


def _start_background(
    s: Session, facts: Facts, layout: Layout, argv: list[str], changed: bool
) -> tuple[str, int]:
    state = json.dumps({"argv": argv}, sort_keys=True)
    if facts.supervisor is not None and facts.state == state and not changed:
        return "unchanged", facts.supervisor
    if facts.supervisor is not None:
        s.run(layout.supervise("--stop"))
    s.put_bytes(f"{state}\n".encode(), layout.state_file)
    out = s.run(layout.supervise("--log", layout.log, "--", *argv)).stdout.strip()
    if not out.isdigit():
        raise RemoteCommandFailed(f"{s.host.name}: the exporter supervisor did not start: {out}")
    return ("restarted" if facts.supervisor is not None else "started"), int(out)


def _start_systemd(s: Session, host: Host, layout: Layout, changed: bool) -> str:
    unit = render_unit(host, layout)
    path = f"/etc/systemd/system/{UNIT_NAME}"
    same = s.run(["cat", path], check=False).stdout == unit
    if not same:
        s.put_bytes(unit.encode(), path)
        s.run(["systemctl", "daemon-reload"])
    s.run(["systemctl", "enable", "--quiet", UNIT_NAME])
    active = s.run(["systemctl", "is-active", "--quiet", UNIT_NAME], check=False).ok
    if active and same and not changed:
        return "unchanged"
    s.run(["systemctl", "restart", UNIT_NAME])
    return "restarted" if active else "started"


def wait_exporter(s: Session, address: str, timeout: float = 30.0) -> None:
    """Until the exporter answers /metrics with KSM series, as seen from the host."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if "ksm_" in s.http_get(address):
                return
        except RemoteCommandFailed as exc:
            last = exc
        time.sleep(0.2)
    raise RemoteCommandFailed(
        f"{s.host.name}: the exporter does not answer on {address} after {timeout:g} s ({last})",
        hint="see PREFIX/log/exporter.log (or journalctl -u ksmh-exporter) on the host",
    )


def prepare_host(s: Session, bundle_for: Callable[[str], Bundle]) -> PrepareReport:
    """Bring one host to the prepared state; see the module docstring."""
    host = s.host
    layout = Layout(host.prefix)
    report = PrepareReport(host.name)
    facts = read_facts(s, layout.prefix)
    if facts.version < MIN_PYTHON:
        raise RemoteCommandFailed(
            f"{host.name}: {host.python} is {'.'.join(map(str, facts.version))}, "
            "ksm-harness needs 3.11+",
            hint="set `python:` for this host to a 3.11+ interpreter",
        )
    if host.exporter_twin and facts.uid != 0:
        raise RemoteCommandFailed(
            f"{host.name}: the exporter's twin reads other processes' memory and needs root, "
            f"but {host.user} is not root",
            hint="connect as root (user: root), or turn the twin off for this host",
        )
    bundle = bundle_for(facts.soabi)
    _install_packages(
        s, facts, report, [SYSTEM_FALLBACK[d] for d in bundle.skipped if d in SYSTEM_FALLBACK]
    )
    changed = _install_bundle(s, facts, layout, bundle, report)
    argv = exporter_argv(host, layout)
    if facts.systemd:
        report.service = "systemd"
        outcome = _start_systemd(s, host, layout, changed)
        report.step("exporter", f"{outcome}: systemd unit {UNIT_NAME} on {host.exporter_listen}")
    else:
        report.service = "background"
        outcome, pid = _start_background(s, facts, layout, argv, changed)
        report.exporter_pid = pid
        report.step(
            "exporter",
            f"{outcome}: no systemd, supervised background process on {host.exporter_listen}, "
            f"pid file {layout.pidfile}",
        )
    wait_exporter(s, host.exporter_listen)
    return report


def stop_exporter(s: Session) -> str:
    """Stop the exporter prepare started (systemd unit or supervisor); says what it did."""
    layout = Layout(s.host.prefix)
    facts = read_facts(s, layout.prefix)
    if facts.systemd:
        s.run(["systemctl", "disable", "--now", "--quiet", UNIT_NAME], check=False)
        return f"stopped and disabled {UNIT_NAME}"
    if facts.supervisor is None:
        return "not running"
    return s.run(layout.supervise("--stop")).stdout.strip()
