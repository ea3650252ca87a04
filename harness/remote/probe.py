"""One round trip for every fact `check` and `prepare` need to read from a host.

Each SSH command costs a session setup (0.1-0.5 s here), so the read-only facts come from one
small program run by the host's own interpreter (argv: python -c FACTS PREFIX); it needs
nothing of ours installed there and only reads files.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import TypeAdapter, ValidationError

from harness.errors import RemoteCommandFailed
from harness.remote.ssh import Session

KSM_RUN = "/sys/kernel/mm/ksm/run"

_FACTS = """
import json, os, platform, sys, sysconfig
prefix = sys.argv[1]
ksm = "/sys/kernel/mm/ksm/run"
def read(path):
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None
pid = read(prefix + "/run/exporter.pid") or ""
cmd = (read("/proc/%s/cmdline" % pid) or "") if pid.isdigit() else ""
ours = "harness.remote.supervise" in cmd and prefix + "/run/exporter.pid" in cmd
print(json.dumps({
    "version": list(sys.version_info[:2]),
    "soabi": sysconfig.get_config_var("SOABI") or "",
    "machine": platform.machine(),
    "uid": os.getuid(),
    "systemd": os.path.isdir("/run/systemd/system"),
    "ksm_present": os.path.exists(ksm),
    "ksm_writable": os.access(ksm, os.W_OK),
    "ksm_run": read(ksm),
    "kvm_exists": os.path.exists("/dev/kvm"),
    "kvm_rw": os.access("/dev/kvm", os.R_OK | os.W_OK),
    "digest": read(prefix + "/.bundle-sha256"),
    "venv": os.access(prefix + "/venv/bin/python", os.X_OK),
    "supervisor": int(pid) if ours else None,
    "state": read(prefix + "/run/exporter.json"),
}))
"""


@dataclass(frozen=True)
class Facts:
    """What a host looks like to ksm-harness right now."""

    version: tuple[int, int]
    soabi: str
    machine: str
    uid: int
    systemd: bool  # sd_booted(): /run/systemd/system exists
    ksm_present: bool
    ksm_writable: bool  # access(2) W_OK as the SSH user: also sees a read-only sysfs
    ksm_run: str | None
    kvm_exists: bool
    kvm_rw: bool
    digest: str | None  # the installed bundle's SHA-256
    venv: bool
    supervisor: int | None  # our live exporter supervisor for this prefix
    state: str | None  # the exporter command line the supervisor was started with (JSON)


MAX_REPLY = 64 * 1024


def read_facts(s: Session, prefix: str) -> Facts:
    """Run the probe with the host's interpreter; RemoteCommandFailed if it cannot run."""
    r = s.run([s.host.python, "-c", _FACTS, prefix], check=False)
    if not r.ok:
        last = (r.stderr.strip().splitlines() or ["no output"])[-1]
        raise RemoteCommandFailed(
            f"{s.host.name}: {s.host.python} does not run there: {last}",
            hint="install python3 (>= 3.11) or set `python:` for this host in the inventory",
        )
    return parse_facts(s.host.name, r.stdout)


def parse_facts(host: str, reply: str) -> Facts:
    """The probe's JSON reply as Facts; a reply of the wrong shape fails this host alone."""
    try:
        return _FACTS_REPLY.validate_json(reply[:MAX_REPLY], strict=True)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in err["loc"]) or "reply"
        raise RemoteCommandFailed(
            f"{host}: unexpected reply from the host probe ({where}: {err['msg']})",
            hint="something on the host wraps or replaces its python; check `python:` in the "
            "inventory",
        ) from None


_FACTS_REPLY = TypeAdapter(Facts)
