"""Which QEMU machine a fleet's guests boot: `pc` unless `microvm` is asked for.

microvm has no PCI bus and no PC firmware tables to probe: the agent's virtio-serial port
sits on virtio-mmio (the busybox image loads virtio_mmio, see harness.guests.image). Measured
here under TCG with the unpacked PVH kernel (harness.guests.vmlinux), one 256 MiB guest was
ready in 3.9 s on microvm and 5.2 s on pc (host load ~3 on 2 cores). But an idle microvm
guest keeps its 250 Hz tick (~250 local timer interrupts/s: the guest finds no timer to go
tickless with; `-cpu qemu64,+arat`, pit=off and nohz/highres options did not change it) and
costs ~6 % of a host CPU, against ~0.8 % on pc: 16 idle guests take a whole CPU away from the
ones still booting, and 64 cannot all run on 2 cores. So `auto` is pc; microvm is there for
one or a few guests (`--machine microvm`). The libvirt backend and the Debian image (a
virtio-blk PCI disk) boot pc only; so does an image without virtio_mmio.

Under TCG a microvm guest cannot calibrate its TSC: the PIT's gate (the PC speaker port) is
absent, and without a reference the kernel marks the TSC unstable and waits for a timer that
never comes. The host's TSC frequency goes on the command line (`tsc_early_khz`): TCG's guest
TSC is the host's.
"""

from __future__ import annotations

from pathlib import Path

from harness.errors import HarnessError
from harness.guests.spec import GuestImage, parse_kind
from harness.kinds import AccelKind, GuestBackendKind, MachineKind

CPUINFO = Path("/proc/cpuinfo")


def host_tsc_khz(cpuinfo: Path = CPUINFO) -> int | None:
    """The host TSC frequency in kHz from /proc/cpuinfo, when the TSC is constant (the
    `constant_tsc` flag: `cpu MHz` is then the TSC rate the host kernel measured at boot on
    a VM, or close to it); None when unknown."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    mhz = flags = None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "cpu MHz" and mhz is None:
            try:
                mhz = float(value)
            except ValueError:
                return None
        elif key == "flags" and flags is None:
            flags = value.split()
        if mhz is not None and flags is not None:
            break
    if mhz is None or mhz <= 0 or flags is None or "constant_tsc" not in flags:
        return None
    return round(mhz * 1000)


def resolve_machine(
    requested: str,
    backend: GuestBackendKind,
    image: GuestImage,
    accel: AccelKind,
    tsc_khz: int | None = None,
) -> tuple[MachineKind, tuple[str, ...]]:
    """The machine for auto|pc|microvm and the kernel arguments it needs.

    auto is pc (see the module docstring). `tsc_khz` defaults to host_tsc_khz(); microvm
    where it cannot work is a HarnessError naming why.
    """
    want = parse_kind(MachineKind, requested)
    if want is not MachineKind.MICROVM:
        return MachineKind.PC, ()
    why = None
    if backend is not GuestBackendKind.QEMU:
        why = f"the {backend} backend boots pc guests"
    elif not image.microvm:
        why = f"the {image.kind} image has no virtio-mmio (or boots a PCI disk)"
    extra: tuple[str, ...] = ()
    if why is None and accel is AccelKind.TCG:
        khz = tsc_khz if tsc_khz is not None else host_tsc_khz(CPUINFO)
        if khz is None:
            why = "the host's TSC frequency is unknown (no constant_tsc in /proc/cpuinfo)"
        else:
            extra = (f"tsc_early_khz={khz}",)
    if why is not None:
        raise HarnessError(f"--machine microvm: {why}", hint="use --machine pc (or auto)")
    return MachineKind.MICROVM, extra
