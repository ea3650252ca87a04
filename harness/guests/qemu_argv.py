"""The QEMU command line for a GuestSpec: a pure function, golden-tested.

Guest RAM is QEMU's default: anonymous private memory (no memfd, no share=on, no hugepages,
which KSM could not merge); `mem-merge` decides whether QEMU marks it MADV_MERGEABLE.
"""

from __future__ import annotations

from harness.guests.spec import AGENT_PORT_NAME, GuestSpec
from harness.kinds import AccelKind, MachineKind

QEMU_BINARY = "qemu-system-x86_64"
# TCG's translation cache defaults to 1 GiB per guest in QEMU >= 5; a busybox guest needs far
# less: measured here, 16 MiB boots as fast as 64 MiB (~6 s) and cuts the host memory a guest
# costs beyond its RAM from ~94 to ~59 MiB (Pss).
TCG_TB_SIZE_MIB = 16


def accel_option(spec: GuestSpec) -> str:
    if spec.accel is AccelKind.TCG:
        return f"tcg,tb-size={TCG_TB_SIZE_MIB}"
    return "kvm"


def qemu_argv(spec: GuestSpec, binary: str = QEMU_BINARY) -> list[str]:
    """argv that boots `spec` headless, with a QMP socket, the agent port and a console log."""
    merge = "on" if spec.mem_merge else "off"
    # KVM passes the host CPU through; TCG keeps QEMU's default model (cheapest to emulate).
    cpu = ["-cpu", "host"] if spec.accel is AccelKind.KVM else []
    # Read-only: every guest of a fleet boots the same disk; writes go to a tmpfs overlay.
    disk = (
        ["-drive", f"file={spec.image.disk},if=virtio,format=raw,readonly=on"]
        if spec.image.disk is not None
        else []
    )
    # microvm (harness.guests.machine): virtio-mmio instead of PCI for the agent's port.
    micro = spec.machine is MachineKind.MICROVM
    if micro and disk:
        raise ValueError(f"{spec.name}: a microvm guest has no PCI disk (use the pc machine)")
    vser = "virtio-serial-device" if micro else "virtio-serial-pci"
    return [
        binary,
        "-name", f"guest={spec.name},process=qemu-{spec.name}",
        "-machine", f"{spec.machine},mem-merge={merge}",
        "-accel", accel_option(spec),
        *cpu,
        "-m", f"{spec.memory_mib}M",
        "-smp", str(spec.vcpus),
        "-nodefaults",
        "-no-user-config",
        "-display", "none",
        # A guest panic (panic=-1 reboots) ends the process, so a dead guest is visible.
        "-no-reboot",
        "-kernel", str(spec.image.kernel),
        "-initrd", str(spec.image.initrd),
        "-append", spec.cmdline,
        *disk,
        "-chardev", f"file,id=console,path={spec.console_log}",
        "-serial", "chardev:console",
        "-chardev", f"socket,id=qmp,path={spec.qmp_socket},server=on,wait=off",
        "-mon", "chardev=qmp,mode=control",
        "-device", f"{vser},id=vser0",
        "-chardev", f"socket,id=agent,path={spec.agent_socket},server=on,wait=off",
        "-device", f"virtserialport,bus=vser0.0,chardev=agent,name={AGENT_PORT_NAME}",
        "-pidfile", str(spec.pid_file),
    ]  # fmt: skip
