"""The interface both guest backends (plain QEMU, libvirt) implement, and shared helpers."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from harness.guests.spec import NAME_PREFIX, GuestSpec
from harness.ksm.lock import private_dir
from harness.paths import is_root, runtime_dir

# Runtime state of fleets (sockets, pid files, console logs, run.json), one directory per run,
# under the runtime directory (harness.paths: root's /run/ksm-harness, or a per-user one).
RUNTIME_ROOT = runtime_dir() / "fleet"


def prepare_runtime_root(root: Path) -> Path:
    """Create a fleet runtime root (and, for the default one, the runtime directory above it),
    checked to be ours alone: a non-root user's is 0700 and must not be another user's (a
    planted /tmp/ksm-harness-UID), since guest sockets there accept commands."""
    mode = 0o755 if is_root() else 0o700
    hint = "set KSM_HARNESS_RUNTIME to a directory of yours"
    if root == RUNTIME_ROOT:
        private_dir(root.parent, mode, hint)
    return private_dir(root, mode, hint)


@dataclass(frozen=True)
class Leftover:
    """A guest of ours still running (by name prefix), possibly from a crashed run.

    `parent` is the live process that started it (a run, a fleet, an accelerator probe), None
    when that process is gone (the QEMU was re-parented to init) or cannot be known (libvirt);
    `persistent` marks a defined libvirt domain, which we never create and never remove.
    """

    name: str
    pid: int | None
    backend: str
    parent: int | None = None
    persistent: bool = False


class GuestBackend(Protocol):
    """Start, watch and stop single guests; Fleet adds parallelism and the agent."""

    name: str

    def start(self, spec: GuestSpec) -> int | None:
        """Start the guest; return its QEMU PID (None if it cannot be known, e.g. remote)."""
        ...

    def alive(self, spec: GuestSpec) -> bool: ...

    def exit_reason(self, spec: GuestSpec) -> str:
        """Why a guest that is no longer alive ended, for error messages."""
        ...

    def stop(self, spec: GuestSpec, timeout: float = 5.0) -> None:
        """Stop the guest and remove its host-side sockets; idempotent."""
        ...

    def leftovers(self) -> list[Leftover]: ...

    def remove_leftover(self, leftover: Leftover) -> None: ...


def is_ours(name: str) -> bool:
    return name.startswith(NAME_PREFIX)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers kill(0); it is not a running guest.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def remove_quietly(*paths: Path) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
