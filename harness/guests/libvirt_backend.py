"""libvirt backend (libvirt-python): transient domains, so a destroyed guest leaves no definition.

`qemu:///system` by default; any URI is accepted. These machines have no systemd, so when the
URI is the local system daemon, we are root and it is not running, we start `virtlogd -d` and
`libvirtd -d` ourselves.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from harness.errors import GuestError, HarnessError
from harness.guests.backend import Leftover, is_ours, remove_quietly
from harness.guests.libvirt_xml import libvirt_xml
from harness.guests.spec import GuestSpec
from harness.kinds import GuestBackendKind
from harness.run import run
from harness.waiting import wait_until

DEFAULT_URI = "qemu:///system"
T = TypeVar("T")
RECONNECT_TIMEOUT = 30.0  # a restarted libvirtd answers within seconds
LIBVIRT_RUN = Path("/run/libvirt")


def _socket_answers(path: Path) -> bool:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(1.0)
        sock.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        sock.close()


def ensure_daemons(run_dir: Path = LIBVIRT_RUN, timeout: float = 15.0) -> list[str]:
    """Start virtlogd and libvirtd when they are not answering; return what was started."""
    started: list[str] = []
    if os.geteuid() != 0:
        return started
    for daemon, sock in (("virtlogd", "virtlogd-sock"), ("libvirtd", "libvirt-sock")):
        if _socket_answers(run_dir / sock):
            continue
        run([daemon, "-d"], timeout=30)
        started.append(daemon)
        deadline = time.monotonic() + timeout
        while not _socket_answers(run_dir / sock):
            if time.monotonic() > deadline:
                raise HarnessError(
                    f"{daemon} started but {run_dir / sock} does not answer",
                    hint=f"run `{daemon} -v` in a terminal to see why",
                )
            time.sleep(0.1)
    return started


def _quiet(_ctx: object, _error: object) -> None:
    """libvirt's default error handler prints every error to stderr ("libvirt: DBus Utils
    error : ..."), also those we expect and handle; the libvirtError we catch has the text."""


def _libvirt() -> Any:
    try:
        import libvirt
    except ImportError as exc:
        raise HarnessError(
            "the libvirt Python binding is not importable",
            hint="pip install libvirt-python (it is in pyproject.toml)",
        ) from exc
    libvirt.registerErrorHandler(_quiet, None)
    return libvirt


class LibvirtBackend:
    """Guests as transient libvirt domains."""

    name = GuestBackendKind.LIBVIRT.value

    def __init__(self, uri: str = DEFAULT_URI, start_daemons: bool = True) -> None:
        self.uri = uri
        self.libvirt = _libvirt()
        if start_daemons and uri in ("qemu:///system", "qemu+unix:///system"):
            ensure_daemons()
        self.start_daemons = start_daemons
        self._conn = self._open()

    def _open(self) -> Any:
        try:
            return self.libvirt.open(self.uri)
        except self.libvirt.libvirtError as exc:
            system = self.uri.endswith("/system")
            hint = (
                "is libvirtd running? (no systemd here: `libvirtd -d` as root)"
                if os.geteuid() == 0 or not system
                else f"{self.uri} is root's: run as root, or boot plain QEMU guests (backend "
                "qemu), which any user can"
            )
            raise HarnessError(
                f"cannot connect to libvirt at {self.uri}: {exc}", hint=hint
            ) from exc

    @property
    def conn(self) -> Any:
        """A live connection: libvirtd may have been restarted under a long run (its transient
        domains survive that), so a dead connection is opened again, waiting for the daemon."""
        try:
            alive = bool(self._conn.isAlive())
        except self.libvirt.libvirtError:
            alive = False
        if alive:
            return self._conn
        with contextlib.suppress(self.libvirt.libvirtError):
            self._conn.close()

        def reopened() -> Any:
            if self.start_daemons and self.uri in ("qemu:///system", "qemu+unix:///system"):
                ensure_daemons()
            try:
                return self.libvirt.open(self.uri)
            except self.libvirt.libvirtError:
                return None

        self._conn = wait_until(
            reopened,
            RECONNECT_TIMEOUT,
            interval=0.5,
            error=lambda: HarnessError(
                f"lost the libvirt connection to {self.uri} and could not open it again "
                f"within {RECONNECT_TIMEOUT:g} s",
                hint="is libvirtd running? (`libvirtd -d` as root)",
            ),
        )
        return self._conn

    def _local(self) -> bool:
        return "://" in self.uri and self.uri.split("://", 1)[1].startswith("/")

    def _lost(self, exc: Any) -> bool:
        """The error is the connection's (libvirtd went away), not the operation's. A restarted
        libvirtd shows only when the next call fails: isAlive() stays true until then."""
        return bool(exc.get_error_domain() == self.libvirt.VIR_FROM_RPC)

    def _call(self, fn: Callable[[Any], T]) -> T:
        """fn(connection), once more on a fresh connection when the old one was lost."""
        try:
            return fn(self.conn)
        except self.libvirt.libvirtError as exc:
            if not self._lost(exc):
                raise
            with contextlib.suppress(self.libvirt.libvirtError):
                self._conn.close()  # conn then opens a new one, waiting for the daemon
            return fn(self.conn)

    def _domain(self, name: str) -> Any | None:
        """The domain called `name`, None when there is none; GuestError when libvirt fails."""
        try:
            return self._call(lambda c: c.lookupByName(name))
        except self.libvirt.libvirtError as exc:
            if exc.get_error_code() == self.libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise GuestError(f"libvirt cannot look up {name}: {exc}") from exc

    def start(self, spec: GuestSpec) -> int | None:
        spec.runtime_dir.mkdir(parents=True, exist_ok=True)
        remove_quietly(spec.agent_socket)
        try:
            self._call(lambda c: c.createXML(libvirt_xml(spec), 0))
        except self.libvirt.libvirtError as exc:
            raise GuestError(f"libvirt refused to start {spec.name}: {exc}") from exc
        return self.pid(spec)

    def pid(self, spec: GuestSpec) -> int | None:
        return self._pid_of(spec.name)

    def _pid_of(self, name: str) -> int | None:
        """The QEMU PID from libvirt's pid file; None for a remote URI (no such file here)."""
        if not self._local():
            return None
        try:
            return int((LIBVIRT_RUN / "qemu" / f"{name}.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def alive(self, spec: GuestSpec) -> bool:
        dom = self._domain(spec.name)
        try:
            return bool(dom is not None and dom.isActive())
        except self.libvirt.libvirtError:
            return False

    def exit_reason(self, spec: GuestSpec) -> str:
        return f"libvirt domain {spec.name} is no longer running (destroyed, crashed or killed)"

    def stop(self, spec: GuestSpec, timeout: float = 5.0) -> None:
        dom = self._domain(spec.name)
        if dom is not None:
            try:
                dom.destroy()
            except self.libvirt.libvirtError as exc:
                if self.alive(spec):
                    raise GuestError(f"cannot destroy {spec.name}: {exc}") from exc
        remove_quietly(spec.agent_socket)

    def leftovers(self) -> list[Leftover]:
        found = []
        for dom in self._call(lambda c: c.listAllDomains(0)):
            name = dom.name()
            if is_ours(name):
                found.append(
                    Leftover(
                        name, self._pid_of(name), self.name, persistent=bool(dom.isPersistent())
                    )
                )
        return sorted(found, key=lambda lo: lo.name)

    def remove_leftover(self, leftover: Leftover) -> None:
        dom = self._domain(leftover.name)
        if dom is None:
            return
        try:
            if dom.isPersistent():
                raise GuestError(
                    f"libvirt domain {leftover.name} is persistent (defined): ksm-harness only "
                    "creates transient domains, so it is not ours to remove",
                    hint=f"if it is yours: virsh destroy {leftover.name}; virsh undefine "
                    f"{leftover.name}",
                )
            if dom.isActive():
                dom.destroy()
        except self.libvirt.libvirtError as exc:
            raise GuestError(f"cannot remove libvirt domain {leftover.name}: {exc}") from exc

    def close(self) -> None:
        with contextlib.suppress(self.libvirt.libvirtError):
            self._conn.close()
