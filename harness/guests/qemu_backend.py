"""Plain QEMU backend: one qemu-system-x86_64 process per guest, with a QMP socket.

QEMU runs in its own session (harness.run.spawn), so it outlives `ksmh fleet up`; later
commands find it again through its pid file and command line (`-name guest=NAME`). QMP is
spoken through QEMU's own library (`qemu.qmp`), used for a clean `quit` at teardown.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness import procfs
from harness.errors import GuestError
from harness.guests.backend import Leftover, is_ours, pid_alive, remove_quietly
from harness.guests.qemu_argv import QEMU_BINARY, qemu_argv
from harness.guests.spec import GuestSpec
from harness.kinds import GuestBackendKind
from harness.run import spawn

if TYPE_CHECKING:  # processes are started only by harness.run
    from subprocess import Popen


def qmp_command(socket_path: Path, command: str, timeout: float = 5.0, **arguments: Any) -> Any:
    """Connect to a QMP socket, negotiate, run one command and return its `return` value.

    Every step shares one deadline, so a wedged QEMU cannot hang teardown (the caller then
    falls back to signals). A fresh event loop per call: boot and stop run in worker threads.
    Errors are GuestError: `QMP COMMAND: CLASS: DESCRIPTION` for a refused command.
    """

    from qemu.qmp import ExecuteError, QMPClient, QMPError  # only where guests are stopped

    async def one() -> Any:
        qmp = QMPClient(f"qmp:{socket_path.name}")
        await qmp.connect(str(socket_path))
        try:
            return await qmp.execute(command, arguments or None)
        finally:
            await qmp.disconnect()

    try:
        return asyncio.run(asyncio.wait_for(one(), timeout))
    except ExecuteError as exc:
        raise GuestError(f"QMP {command}: {exc.error_class}: {exc}") from None
    except TimeoutError:
        raise GuestError(f"QMP {socket_path}: no answer within {timeout:g} s") from None
    except (QMPError, OSError, EOFError) as exc:
        raise GuestError(f"QMP {socket_path}: {exc}") from None


def _cmdline(pid: int, proc: Path = Path("/proc")) -> list[str]:
    try:
        raw = (proc / str(pid) / "cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode("utf-8", "replace") for a in raw.split(b"\0") if a]


def guest_name_of(argv: list[str]) -> str | None:
    """The guest name in a QEMU argv (`-name guest=NAME,...`), or None."""
    for flag, value in itertools.pairwise(argv):
        if flag == "-name":
            for part in value.split(","):
                if part.startswith("guest="):
                    return part.removeprefix("guest=")
    return None


class QemuBackend:
    """Guests as local QEMU processes."""

    name = GuestBackendKind.QEMU.value

    def __init__(self, binary: str = QEMU_BINARY, proc: Path = Path("/proc")) -> None:
        self.binary = binary
        self.proc = proc
        self._procs: dict[str, Popen[bytes]] = {}

    def start(self, spec: GuestSpec) -> int:
        spec.runtime_dir.mkdir(parents=True, exist_ok=True)
        remove_quietly(spec.qmp_socket, spec.agent_socket, spec.pid_file)
        log = spec.runtime_dir / f"{spec.name}.qemu.log"
        with log.open("wb") as err:
            proc = spawn(qemu_argv(spec, self.binary), stderr=err, stdout=err)
        self._procs[spec.name] = proc
        return proc.pid

    def pid(self, spec: GuestSpec) -> int | None:
        if spec.name in self._procs:
            return self._procs[spec.name].pid
        try:
            pid = int(spec.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        # Guard against a recycled pid: it must still be this guest's QEMU.
        return pid if guest_name_of(_cmdline(pid, self.proc)) == spec.name else None

    def alive(self, spec: GuestSpec) -> bool:
        proc = self._procs.get(spec.name)
        if proc is not None:
            return proc.poll() is None
        pid = self.pid(spec)
        return pid is not None and pid_alive(pid)

    def exit_reason(self, spec: GuestSpec) -> str:
        proc = self._procs.get(spec.name)
        code = proc.poll() if proc is not None else None
        if code is None:
            return "QEMU process is gone"
        if code < 0:
            return f"QEMU was killed by signal {-code}"
        log = spec.runtime_dir / f"{spec.name}.qemu.log"
        tail = log.read_text(errors="replace").strip().splitlines()[-1:] if log.exists() else []
        return f"QEMU exited with status {code}" + (f": {tail[0]}" if tail else "")

    def stop(self, spec: GuestSpec, timeout: float = 5.0) -> None:
        pid = self.pid(spec)
        if pid is not None and pid_alive(pid):
            self._quit(spec, pid, timeout)
        proc = self._procs.pop(spec.name, None)
        if proc is not None:
            deadline = time.monotonic() + timeout
            while proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        remove_quietly(spec.qmp_socket, spec.agent_socket, spec.pid_file)

    def _quit(self, spec: GuestSpec, pid: int, timeout: float) -> None:
        # Polite first (QMP quit), then SIGTERM, then SIGKILL: never leave a process behind.
        with contextlib.suppress(GuestError):
            qmp_command(spec.qmp_socket, "quit", timeout=min(timeout, 2.0))
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if self._wait_gone(pid, timeout / 2):
                return
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                return
        if not self._wait_gone(pid, timeout):
            raise GuestError(f"QEMU pid {pid} ({spec.name}) survived SIGKILL")

    def _wait_gone(self, pid: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            proc = next((p for p in self._procs.values() if p.pid == pid), None)
            if proc is not None:
                proc.poll()  # reap our own child, or it stays a zombie
            if not pid_alive(pid):
                return True
            time.sleep(0.05)
        return not pid_alive(pid)

    def leftovers(self) -> list[Leftover]:
        """Our user's QEMU processes whose guest name carries our prefix. Another user's
        guests are theirs to stop (each user has its own runtime directory, so they would
        otherwise look like leftovers here)."""
        found = []
        uid = os.geteuid()
        for entry in self.proc.iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if entry.stat().st_uid != uid:
                    continue
            except OSError:
                continue  # exited meanwhile
            argv = _cmdline(int(entry.name), self.proc)
            if not argv or "qemu-system" not in Path(argv[0]).name:
                continue
            name = guest_name_of(argv)
            # libvirt's QEMUs are the libvirt backend's business (it destroys them cleanly).
            if name and is_ours(name) and "libvirt" not in " ".join(argv):
                pid = int(entry.name)
                parent = procfs.parent_pid(pid, self.proc)
                found.append(
                    Leftover(
                        name, pid, self.name, parent=parent if parent not in (None, 1) else None
                    )
                )
        return sorted(found, key=lambda lo: lo.name)

    def remove_leftover(self, leftover: Leftover) -> None:
        if leftover.pid is None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.kill(leftover.pid, sig)
            except ProcessLookupError:
                return
            if self._wait_gone(leftover.pid, 3.0):
                return
