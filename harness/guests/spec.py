"""Frozen descriptions: a fleet (FleetSpec), a guest image (GuestImage) and one guest (GuestSpec).

FleetSpec is what a fleet *is*, whoever asks for it: a playbook's `fleet:` section
(harness.playbook.schema), `ksmh fleet up`'s options (harness.guests.cli) and the pytest
plugin's `guest_fleet` fixture all build one and hand it to `Fleet(spec)`. GuestSpec holds
everything the pure builders (qemu_argv, libvirt_xml) need, including the host paths of the
guest's sockets and logs, so they stay pure functions and can be golden-tested.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

from harness.errors import HarnessError
from harness.kinds import AccelKind, GuestBackendKind, ImageKind, MachineKind, choices

# The virtio-serial port the in-guest agent looks for (harness/guests/data/ksmh-agent.c).
AGENT_PORT_NAME = "org.ksmh.agent"
# Every guest name starts with this, then the run id: how leftovers are recognised.
NAME_PREFIX = "ksmh-"
MIN_MEMORY_MIB = 64
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_WHAT = {
    AccelKind: "accelerator",
    GuestBackendKind: "guest backend",
    ImageKind: "image kind",
    MachineKind: "machine type",
}
_E = TypeVar("_E", bound=StrEnum)


def parse_kind(kind: type[_E], value: str) -> _E:
    """value as a member of the StrEnum `kind`, or a HarnessError naming the choices."""
    try:
        return kind(value)
    except ValueError:
        names = choices(kind)
        raise HarnessError(
            f"unknown {_WHAT.get(kind, kind.__name__)} {value!r}",
            hint=f"use {', '.join(names[:-1])} or {names[-1]}",
        ) from None


def default_concurrency(cpus: int | None = None) -> int:
    """Guests booting at once when not asked: twice the host's CPUs, 2 to 16. A TCG boot keeps
    one CPU busy (measured: QEMU's CPU seconds ~= its wall seconds to ready), so more at once
    only share the same CPUs, and fewer leave one idle while a QEMU starts or loads files."""
    n = cpus if cpus is not None else (os.cpu_count() or 1)
    return max(2, min(2 * n, 16))


@dataclass(frozen=True)
class FleetSpec:
    """N identical guests: the description a Fleet boots (see the module docstring).

    Strings are accepted for the kinds and turned into their StrEnums; impossible values are
    a HarnessError here, before any image is built or guest started.
    """

    count: int
    memory_mib: int = 256
    image: ImageKind = ImageKind.BUSYBOX
    backend: GuestBackendKind = GuestBackendKind.QEMU
    uri: str | None = None  # libvirt connection URI; None: qemu:///system
    accel: AccelKind = AccelKind.AUTO
    vcpus: int = 1
    mem_merge: bool = True  # QEMU marks guest RAM MADV_MERGEABLE (KSM can merge it)
    # False: QEMU starts with transparent huge pages disabled (PR_SET_THP_DISABLE, inherited
    # by the qemu backend's processes; libvirtd starts its own). True leaves THP as the host
    # has it: QEMU advises guest RAM MADV_HUGEPAGE, and zero-filled THP subpages never merge.
    thp: bool = True
    concurrency: int = field(default_factory=lambda: default_concurrency())  # booting at once
    machine: MachineKind = MachineKind.AUTO  # QEMU machine type (harness.guests.machine)
    ready_timeout: float = 180.0  # seconds from start to the agent's `ready`
    command_timeout: float = 600.0  # default seconds per agent command

    def __post_init__(self) -> None:
        object.__setattr__(self, "image", parse_kind(ImageKind, self.image))
        object.__setattr__(self, "backend", parse_kind(GuestBackendKind, self.backend))
        object.__setattr__(self, "accel", parse_kind(AccelKind, self.accel))
        object.__setattr__(self, "machine", parse_kind(MachineKind, self.machine))
        # Checked here (GuestSpec would refuse them later, as a traceback after the build).
        if self.count < 1:
            raise HarnessError(f"--count {self.count}: a fleet needs at least one guest")
        if self.memory_mib < MIN_MEMORY_MIB:
            raise HarnessError(
                f"--memory {self.memory_mib}: a guest needs at least {MIN_MEMORY_MIB} MiB"
            )
        if self.vcpus < 1:
            raise HarnessError(f"--vcpus {self.vcpus}: a guest needs at least one")
        if self.concurrency < 1:
            raise HarnessError(f"--concurrency {self.concurrency}: must be at least 1")
        if self.ready_timeout <= 0 or self.command_timeout <= 0:
            raise HarnessError("fleet timeouts must be positive")

    def as_json(self) -> dict[str, Any]:
        """Plain JSON values (the StrEnums are strings), for run.json."""
        return {k: (str(v) if isinstance(v, StrEnum) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FleetSpec:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True)
class GuestImage:
    """A bootable kernel + initramfs pair (see harness.guests.image)."""

    kernel: Path
    initrd: Path
    kind: str = ImageKind.BUSYBOX
    kernel_release: str = ""
    digest: str = ""
    # The Debian kind boots a read-only root disk (an overlay with a tmpfs makes it writable).
    disk: Path | None = None
    cmdline: tuple[str, ...] = ()
    # The initramfs loads virtio_mmio: the image boots on QEMU's `microvm` machine too.
    microvm: bool = False


@dataclass(frozen=True)
class GuestSpec:
    """One guest. RAM is always anonymous private memory (what KSM can merge)."""

    name: str
    memory_mib: int
    image: GuestImage
    runtime_dir: Path
    index: int = 0
    vcpus: int = 1
    accel: AccelKind = AccelKind.TCG
    mem_merge: bool = True
    extra_cmdline: tuple[str, ...] = field(default_factory=tuple)
    machine: MachineKind = MachineKind.PC  # resolved: pc or microvm

    def __post_init__(self) -> None:
        if not _NAME_RE.match(self.name):
            raise ValueError(f"bad guest name {self.name!r}: use [A-Za-z0-9_.-], max 63")
        if self.memory_mib < MIN_MEMORY_MIB:
            raise ValueError(
                f"memory_mib={self.memory_mib}: the guest needs at least {MIN_MEMORY_MIB} MiB"
            )
        if self.vcpus < 1:
            raise ValueError(f"vcpus={self.vcpus}: must be >= 1")
        # A guest runs under one real accelerator; `auto` is resolved before (guests.accel).
        if self.accel not in (AccelKind.KVM, AccelKind.TCG):
            raise ValueError(f"accel={self.accel!r}: one of kvm, tcg")
        object.__setattr__(self, "accel", AccelKind(self.accel))
        if self.machine not in (MachineKind.PC, MachineKind.MICROVM):
            raise ValueError(f"machine={self.machine!r}: one of pc, microvm")
        object.__setattr__(self, "machine", MachineKind(self.machine))
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
