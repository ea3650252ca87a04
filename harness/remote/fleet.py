"""Do one thing on every host of an inventory, in parallel, with a result per host.

This is the remote execution API the rest of the harness builds on: `hosts check`,
`hosts prepare`, `hosts stop-exporter` and `ksmh run --inventory` (harness.remote.run) are
each one `on_fleet` call. The parallelism is fabric's: the hosts' connections form a
`ThreadingGroup` (one thread per host, at most `parallel` of them connected at once), and its
`GroupResult` (a value or the exception, per connection) becomes the harness's one per-member
result type, harness.fleet_result.FleetResult, as guest fleets use. A failing host yields its
error in its own slot; it never hides the other hosts' results and never stops them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import paramiko
from fabric import Connection, ThreadingGroup
from fabric.exceptions import GroupException

from harness.errors import HarnessError, RemoteCommandFailed
from harness.fleet_result import FleetResult, MemberResult
from harness.remote.inventory import Host, Inventory
from harness.remote.ssh import Session, configure, open_session

T = TypeVar("T")
__all__ = ["FleetResult", "HostConnection", "MemberResult", "on_fleet"]


class HostConnection(Connection):  # type: ignore[misc]  # fabric is untyped
    """The fabric Connection of one inventory host (unopened until `ksmh_call`).

    Configured by the inventory alone (harness.remote.ssh.configure); its identity is the
    inventory name, so two hosts never share a slot of a GroupResult.
    """

    # Class attributes, so that fabric's config proxy stores them as real attributes.
    ksmh_host: Host | None = None
    ksmh_known_hosts: Path | None = None

    def _identity(self) -> tuple[Any, ...]:
        host = self.ksmh_host
        return (host.name if host else "", self.host, self.user, self.port)

    def ksmh_call(self, fn: Callable[[Session], T], gate: threading.Semaphore) -> MemberResult[T]:
        """Open the session (host key checked), run fn(session) there, close it."""
        assert self.ksmh_host is not None and self.ksmh_known_hosts is not None
        host = self.ksmh_host
        with gate:
            t0 = time.monotonic()
            try:
                with open_session(self, host, self.ksmh_known_hosts) as session:
                    value = fn(session)
            except HarnessError as exc:
                return MemberResult(host.name, error=exc, seconds=time.monotonic() - t0)
            except (paramiko.SSHException, OSError, EOFError) as exc:
                # A connection that dies mid-way surfaces from paramiko: this host's failure.
                error = RemoteCommandFailed(f"{host.name}: {exc}")
                return MemberResult(host.name, error=error, seconds=time.monotonic() - t0)
            return MemberResult(host.name, value=value, seconds=time.monotonic() - t0)


def host_group(inventory: Inventory, known_hosts: Path | None = None) -> Any:
    """The inventory's hosts as a fabric ThreadingGroup of HostConnections, in file order."""
    kh = known_hosts or inventory.known_hosts
    connections = []
    for host in inventory.hosts:
        conn = configure(host, HostConnection)
        conn.ksmh_host = host
        conn.ksmh_known_hosts = kh
        connections.append(conn)
    return ThreadingGroup.from_connections(connections)


def on_fleet(
    inventory: Inventory,
    fn: Callable[[Session], T],
    *,
    known_hosts: Path | None = None,
    parallel: int = 8,
    operation: str = "",
) -> FleetResult[T]:
    """Open a session to every host and call fn(session) there, up to `parallel` at once.

    Host failures (HarnessError, SSH and socket errors) are per-host results. Anything else
    raised by fn is a bug, not a host's state: it is re-raised here once every host is done.
    """
    group = host_group(inventory, known_hosts)
    gate = threading.BoundedSemaphore(max(1, parallel))
    try:
        by_conn = group._do("ksmh_call", fn, gate)  # fabric's threaded fan-out
    except GroupException as exc:
        by_conn = exc.result
    results: list[MemberResult[T]] = []
    for conn in group:
        outcome = by_conn[conn]
        if isinstance(outcome, BaseException):
            raise outcome
        results.append(outcome)
    return FleetResult(operation or getattr(fn, "__name__", "call"), results, noun="hosts")
