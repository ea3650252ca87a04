"""The closed sets of names the harness accepts, as StrEnums: one definition each.

A StrEnum member *is* its string (`BackendKind.MODEL == "model"`), so YAML, JSON, argparse
choices and labels keep working with plain strings while code compares against one spelling.
"""

from __future__ import annotations

from enum import StrEnum


class BackendKind(StrEnum):
    """Which KSM a command drives: the running kernel, the model, or auto (kernel if usable)."""

    AUTO = "auto"
    KERNEL = "kernel"
    MODEL = "model"


class AccelKind(StrEnum):
    """QEMU accelerator; auto probes kvm and falls back to tcg (harness.guests.accel)."""

    AUTO = "auto"
    KVM = "kvm"
    TCG = "tcg"


class GuestBackendKind(StrEnum):
    """How guests are started: plain QEMU processes or transient libvirt domains."""

    QEMU = "qemu"
    LIBVIRT = "libvirt"


class MachineKind(StrEnum):
    """QEMU machine type: auto is pc; microvm (virtio-mmio, no PCI or firmware probing) boots
    one guest sooner but idles at ~6 % of a host CPU under TCG (harness.guests.machine)."""

    AUTO = "auto"
    PC = "pc"
    MICROVM = "microvm"


class ImageKind(StrEnum):
    """Guest image: the busybox initramfs (fast) or a Debian root disk (mmdebstrap)."""

    BUSYBOX = "busybox"
    DEBIAN = "debian"


class ForeignPolicy(StrEnum):
    """What a comparison run does about other processes using KSM on the host."""

    REFUSE = "refuse"  # stop with exit 2, naming them
    CAPTURE = "capture"  # capture them into the model too


def choices(kind: type[StrEnum]) -> tuple[str, ...]:
    """The values of a StrEnum, for argparse `choices=` and error hints."""
    return tuple(m.value for m in kind)
