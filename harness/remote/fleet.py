"""Do one thing on every host of an inventory, in parallel, with a result per host.

This is the remote execution API the rest of the harness builds on: `hosts check`,
`hosts prepare` and `ksmh run --inventory` (harness.remote.run) are each one `on_fleet` call.
Like fabric's GroupResult, a failing host yields its error in its own slot; it never hides
the other hosts' results and never stops them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

import paramiko

from harness.errors import HarnessError, RemoteCommandFailed
from harness.remote.inventory import Host, Inventory
from harness.remote.ssh import Session, connect

T = TypeVar("T")


@dataclass(frozen=True)
class HostOutcome(Generic[T]):
    """What happened on one host: a value, or the error that stopped it there."""

    host: Host
    value: T | None = None
    error: HarnessError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class FleetResult(Mapping[str, HostOutcome[T]]):
    """Per-host outcomes in inventory order (a read-only mapping host name -> outcome)."""

    def __init__(self, outcomes: list[HostOutcome[T]]) -> None:
        self._by_name = {o.host.name: o for o in outcomes}

    def __getitem__(self, name: str) -> HostOutcome[T]:
        return self._by_name[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_name)

    def __len__(self) -> int:
        return len(self._by_name)

    @property
    def succeeded(self) -> dict[str, T | None]:
        return {n: o.value for n, o in self._by_name.items() if o.ok}

    @property
    def failed(self) -> dict[str, HarnessError]:
        return {n: o.error for n, o in self._by_name.items() if o.error is not None}


def _one(host: Host, known_hosts: Path, fn: Callable[[Session], T]) -> HostOutcome[T]:
    try:
        with connect(host, known_hosts) as session:
            return HostOutcome(host, value=fn(session))
    except HarnessError as exc:
        return HostOutcome(host, error=exc)
    except (paramiko.SSHException, OSError, EOFError) as exc:
        # A connection that dies mid-way surfaces from paramiko; it is this host's failure.
        return HostOutcome(host, error=RemoteCommandFailed(f"{host.name}: {exc}"))


def on_fleet(
    inventory: Inventory,
    fn: Callable[[Session], T],
    *,
    known_hosts: Path | None = None,
    parallel: int = 8,
) -> FleetResult[T]:
    """Open a session to every host and call fn(session) there, up to `parallel` at once."""
    kh = known_hosts or inventory.known_hosts
    with ThreadPoolExecutor(max_workers=max(1, parallel), thread_name_prefix="ksmh-host") as ex:
        futures = [ex.submit(_one, h, kh, fn) for h in inventory.hosts]
        return FleetResult([f.result() for f in futures])
