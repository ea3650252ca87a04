"""`ksmh hosts check`: is each host of an inventory usable for ksm-harness?

Per host, over SSH: reachable (a session opens and `uname -r` runs), kernel release, KSM present
(/sys/kernel/mm/ksm/run exists) and writable (`test -w` as the inventory's user: access(2),
which also sees a read-only sysfs; nothing is written), KVM (/dev/kvm present and read-write for
the user, then the verdict the guest accel probe (harness.guests.accel) cached on that host,
read through the installed harness: "usable"/"unusable"; "rw" when no probe ran there yet, as
this check boots no guest; TCG is the fallback either way), system packages, ksm-harness installed
at the prefix, and the exporter answering /metrics on the inventory's address (fetched from
the host itself through the SSH connection).

A host is unusable when it is unreachable, has no writable KSM, or lacks system packages;
KVM, the install and the exporter are reported but `hosts prepare` fixes the last two.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from harness.console import plain_table, rich_table
from harness.errors import HarnessError, RemoteCommandFailed
from harness.fleet_result import FleetResult
from harness.remote.inventory import Inventory
from harness.remote.prepare import Layout, missing_packages
from harness.remote.probe import KSM_RUN, Facts, read_facts
from harness.remote.ssh import Session


@dataclass
class HostCheck:
    """One row of the check table. Booleans are None when they could not be determined."""

    host: str
    address: str
    reachable: bool = False
    kernel: str = ""
    ksm_present: bool | None = None
    ksm_writable: bool | None = None
    ksm_run: str = ""
    kvm: str = ""  # "absent", "no access", "rw" (not probed), "usable", "unusable"
    kvm_reason: str = ""  # the accel probe's reason, when it has a verdict
    missing_packages: list[str] | None = None
    harness: str = ""  # installed digest prefix, or "absent"
    exporter: str = ""  # "up (pid N)", "up (systemd)", "down"
    problems: list[str] = field(default_factory=list)

    @property
    def usable(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "usable": self.usable}


# The guest accel probe's cached verdict (harness.guests.accel), read by the installed harness.
_ACCEL = (
    "import json; from harness.guests.accel import cached_verdict, default_cache_path, host_key; "
    "v = cached_verdict(default_cache_path(), host_key()); "
    "print(json.dumps(None if v is None else [v.usable, v.reason]))"
)


def check_host(s: Session) -> HostCheck:
    """Run every check on one open session (three to four round trips and one HTTP GET)."""
    h = s.host
    c = HostCheck(h.name, f"{h.address}:{h.port}", reachable=True)
    c.kernel = s.run(["uname", "-r"]).stdout.strip()
    c.missing_packages = missing_packages(s)
    if c.missing_packages:
        c.problems.append(f"missing packages: {' '.join(c.missing_packages)}")
    try:
        f = read_facts(s, h.prefix)
    except RemoteCommandFailed as exc:
        c.problems.append(_problem(exc))
        return c
    c.ksm_present = f.ksm_present
    if f.ksm_present:
        c.ksm_writable = f.ksm_writable
        c.ksm_run = str(f.ksm_run)
        if not f.ksm_writable:
            c.problems.append(f"{KSM_RUN} is not writable for {h.user} (needs root)")
    else:
        c.problems.append("no KSM in this kernel (CONFIG_KSM=n)")
    c.harness = f.digest[:12] if f.digest else "absent"
    c.kvm = _kvm(s, Layout(h.prefix), f, c)
    c.exporter = _exporter_state(s, f.supervisor)
    return c


def _kvm(s: Session, layout: Layout, f: Facts, c: HostCheck) -> str:
    """absent / no access / rw (never probed) / usable / unusable (the probe's cached verdict)."""
    if not f.kvm_exists:
        return "absent"
    if not f.kvm_rw:
        return "no access"
    if not f.venv:
        return "rw"
    r = s.run([layout.python, "-c", _ACCEL], check=False)
    verdict = json.loads(r.stdout) if r.ok and r.stdout.strip() else None
    if verdict is None:
        return "rw"
    c.kvm_reason = str(verdict[1])
    return "usable" if verdict[0] else "unusable"


def _exporter_state(s: Session, supervisor: int | None) -> str:
    try:
        body = s.http_get(s.host.exporter_listen)
    except RemoteCommandFailed:
        return "down"
    if "ksm_" not in body:
        return "not ksmh"
    return f"up (pid {supervisor})" if supervisor is not None else "up"


def rows(inventory: Inventory, result: FleetResult[HostCheck]) -> list[HostCheck]:
    """One HostCheck per host; an unreachable host becomes a row with its error as problem."""
    hosts = {h.name: h for h in inventory.hosts}
    out = []
    for name, o in result.items():
        if o.value is not None:
            out.append(o.value)
        else:
            h = hosts[name]
            c = HostCheck(name, f"{h.address}:{h.port}")
            assert o.error is not None
            c.problems.append(_problem(o.error))
            out.append(c)
    return out


def _problem(exc: HarnessError) -> str:
    """The error and its hint (e.g. how to record an unknown host key), as prepare prints."""
    return f"{exc.message} (hint: {exc.hint})" if exc.hint else exc.message


def _yn(v: bool | None) -> str:
    return "?" if v is None else ("yes" if v else "no")


HEADER = (
    "HOST",
    "ADDRESS",
    "SSH",
    "KERNEL",
    "KSM",
    "WRITABLE",
    "KVM",
    "PACKAGES",
    "HARNESS",
    "EXPORTER",
    "USABLE",
)


def table_rows(checks: list[HostCheck]) -> list[tuple[str, ...]]:
    """The cells of the check table, one tuple per host (HEADER's columns)."""
    out: list[tuple[str, ...]] = []
    for c in checks:
        pk = (
            "?"
            if c.missing_packages is None
            else (f"{len(c.missing_packages)} missing" if c.missing_packages else "ok")
        )
        ksm = "-" if not c.reachable else (f"run={c.ksm_run}" if c.ksm_present else "absent")
        out.append(
            (
                c.host,
                c.address,
                "ok" if c.reachable else "FAIL",
                c.kernel or "-",
                ksm,
                _yn(c.ksm_writable),
                c.kvm or "-",
                pk if c.reachable else "-",
                c.harness or "-",
                c.exporter or "-",
                "yes" if c.usable else "NO",
            )
        )
    return out


def problem_lines(checks: list[HostCheck]) -> list[str]:
    """One line per problem, so nothing is hidden by column widths."""
    return [f"{c.host}: {p.removeprefix(f'{c.host}: ')}" for c in checks for p in c.problems]


def format_table(checks: list[HostCheck]) -> str:
    """The check table as plain text (not a terminal), then one line per problem."""
    return "\n".join([*plain_table([HEADER, *table_rows(checks)]), *problem_lines(checks)])


def check_table(checks: list[HostCheck]) -> Any:
    """The check table for a terminal (rich)."""
    return rich_table(HEADER, table_rows(checks), title="hosts")
