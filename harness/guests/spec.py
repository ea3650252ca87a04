"""Frozen descriptions of a guest, consumed by the pure builders (qemu_argv, libvirt_xml).

Everything a builder needs is in here, including the host paths of the guest's sockets and
logs, so the builders stay pure functions of a GuestSpec and can be golden-tested.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

Accel = Literal["kvm", "tcg"]
ACCELS: tuple[Accel, ...] = ("kvm", "tcg")

# The virtio-serial port the in-guest agent looks for (guest-images/agent/ksmh-agent.c).
AGENT_PORT_NAME = "org.ksmh.agent"
# Every guest name starts with this, then the run id: how leftovers are recognised.
NAME_PREFIX = "ksmh-"
MIN_MEMORY_MIB = 64
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


@dataclass(frozen=True)
class GuestImage:
    """A bootable kernel + initramfs pair (see harness.guests.image)."""

    kernel: Path
    initrd: Path
    kind: str = "busybox"
    kernel_release: str = ""
    digest: str = ""
    # The Debian kind boots a read-only root disk (an overlay with a tmpfs makes it writable).
    disk: Path | None = None
    cmdline: tuple[str, ...] = ()


@dataclass(frozen=True)
class GuestSpec:
    """One guest. RAM is always anonymous private memory (what KSM can merge)."""

    name: str
    memory_mib: int
    image: GuestImage
    runtime_dir: Path
    index: int = 0
    vcpus: int = 1
    accel: Accel = "tcg"
    mem_merge: bool = True
    extra_cmdline: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if not _NAME_RE.match(self.name):
            raise ValueError(f"bad guest name {self.name!r}: use [A-Za-z0-9_.-], max 63")
        if self.memory_mib < MIN_MEMORY_MIB:
            raise ValueError(
                f"memory_mib={self.memory_mib}: the guest needs at least {MIN_MEMORY_MIB} MiB"
            )
        if self.vcpus < 1:
            raise ValueError(f"vcpus={self.vcpus}: must be >= 1")
        if self.accel not in ACCELS:
            raise ValueError(f"accel={self.accel!r}: one of {', '.join(ACCELS)}")
        if self.index < 0:
            raise ValueError(f"index={self.index}: must be >= 0")

    # Host-side paths, all under the run's runtime directory.
    @property
    def qmp_socket(self) -> Path:
        return self.runtime_dir / f"{self.name}.qmp"

    @property
    def agent_socket(self) -> Path:
        return self.runtime_dir / f"{self.name}.agent"

    @property
    def console_log(self) -> Path:
        return self.runtime_dir / f"{self.name}.console.log"

    @property
    def pid_file(self) -> Path:
        return self.runtime_dir / f"{self.name}.pid"

    @property
    def cmdline(self) -> str:
        """Kernel command line: serial console, no reboot loops, our guest index."""
        parts = [
            "console=ttyS0",
            "panic=-1",
            "loglevel=4",
            "rdinit=/init",
            f"ksmh.index={self.index}",
            f"ksmh.name={self.name}",
            *self.image.cmdline,
            *self.extra_cmdline,
        ]
        return " ".join(parts)
