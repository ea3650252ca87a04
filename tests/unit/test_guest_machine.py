"""Machine choice (microvm or pc), the host TSC rate it needs, boot concurrency, and the
PVH vmlinux the image build unpacks from a bzImage."""

from __future__ import annotations

import gzip
import lzma
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from harness.errors import HarnessError
from harness.guests import machine
from harness.guests.machine import host_tsc_khz, resolve_machine
from harness.guests.spec import FleetSpec, GuestImage, default_concurrency
from harness.guests.vmlinux import bzimage_payload, has_pvh_note, pvh_vmlinux
from harness.kinds import AccelKind, GuestBackendKind, MachineKind

MICRO = GuestImage(Path("/i/vmlinux"), Path("/i/initrd"), "busybox", "6.1.0-t", microvm=True)
PLAIN = GuestImage(Path("/i/vmlinuz"), Path("/i/initrd"), "debian", "6.1.0-t")
QEMU, LIBVIRT = GuestBackendKind.QEMU, GuestBackendKind.LIBVIRT
TCG, KVM = AccelKind.TCG, AccelKind.KVM


def test_microvm_on_qemu_gets_the_host_tsc_rate_under_tcg_and_auto_is_pc() -> None:
    assert resolve_machine("microvm", QEMU, MICRO, TCG, tsc_khz=2445402) == (
        MachineKind.MICROVM,
        ("tsc_early_khz=2445402",),
    )
    # KVM guests have kvmclock: nothing to add.
    assert resolve_machine("microvm", QEMU, MICRO, KVM, tsc_khz=None) == (MachineKind.MICROVM, ())
    # auto: idle microvm guests cost ~6 % CPU each here against ~0.8 % on pc.
    assert resolve_machine("auto", QEMU, MICRO, TCG, tsc_khz=2445402) == (MachineKind.PC, ())


@pytest.mark.parametrize(
    ("backend", "image", "why"),
    [
        (LIBVIRT, MICRO, "the libvirt backend boots pc guests"),
        (QEMU, PLAIN, "the debian image has no virtio-mmio"),
    ],
)
def test_microvm_where_it_cannot_work_says_why(
    backend: GuestBackendKind, image: GuestImage, why: str
) -> None:
    assert resolve_machine("auto", backend, image, TCG, tsc_khz=1000) == (MachineKind.PC, ())
    with pytest.raises(HarnessError, match=f"--machine microvm: {why}"):
        resolve_machine("microvm", backend, image, TCG, tsc_khz=1000)
    assert resolve_machine("pc", QEMU, MICRO, TCG, tsc_khz=1000) == (MachineKind.PC, ())


def test_unknown_tsc_rate_refuses_microvm_under_tcg(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\ncpu MHz\t\t: 2445.402\nflags\t\t: fpu tsc\n")
    assert host_tsc_khz(cpuinfo) is None  # no constant_tsc: cpu MHz is not the TSC rate
    assert host_tsc_khz(tmp_path / "missing") is None
    cpuinfo.write_text("processor\t: 0\ncpu MHz\t\t: 2445.402\nflags\t\t: fpu constant_tsc\n")
    assert host_tsc_khz(cpuinfo) == 2445402
    monkeypatch.setattr(machine, "CPUINFO", tmp_path / "missing")
    with pytest.raises(HarnessError, match="TSC frequency is unknown"):
        resolve_machine("microvm", QEMU, MICRO, TCG)
    assert FleetSpec(1, machine="microvm").machine is MachineKind.MICROVM
    with pytest.raises(HarnessError, match="unknown machine type 'q35'"):
        FleetSpec(1, machine="q35")


def test_default_concurrency_is_two_per_cpu_from_2_to_16() -> None:
    assert [default_concurrency(n) for n in (1, 2, 3, 8, 64)] == [2, 4, 6, 16, 16]


def elf_with_notes(notes: bytes) -> bytes:
    """A minimal ELF64 with one PT_NOTE program header over `notes`."""
    ehdr = (
        b"\x7fELF\x02\x01\x01"
        + b"\0" * 9
        + struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, 0, 64, 0, 0, 64, 56, 1, 0, 0, 0)
    )
    off = 64 + 56
    phdr = struct.pack("<IIQQQQQQ", 4, 4, off, 0, 0, len(notes), len(notes), 4)
    return ehdr + phdr + notes


def note(name: bytes, kind: int, desc: bytes) -> bytes:
    n = name + b"\0"
    return (
        struct.pack("<III", len(n), len(desc), kind)
        + n.ljust((len(n) + 3) // 4 * 4, b"\0")
        + desc.ljust((len(desc) + 3) // 4 * 4, b"\0")
    )


def bzimage(payload: bytes, setup_sects: int = 2) -> bytes:
    """A bzImage header (protocol 2.08 fields) whose payload follows the setup sectors."""
    head = bytearray((setup_sects + 1) * 512)
    head[0x1F1] = setup_sects
    head[0x202:0x206] = b"HdrS"
    struct.pack_into("<II", head, 0x248, 16, len(payload))
    return bytes(head) + b"\0" * 16 + payload + b"tail"


PVH = elf_with_notes(note(b"Xen", 6, b"linux") + note(b"Xen", 18, b"\0\0\0\x01"))
NOT_PVH = elf_with_notes(note(b"Xen", 6, b"linux") + note(b"GNU", 18, b"\0" * 4))


def test_pvh_note_is_found_only_under_the_xen_name() -> None:
    assert has_pvh_note(PVH)
    assert not has_pvh_note(NOT_PVH)
    assert not has_pvh_note(b"MZ not an elf" * 10)


def test_xz_and_gzip_payloads_unpack_to_the_pvh_vmlinux() -> None:
    # The kernel appends the unpacked size after the compressed stream.
    for packed in (lzma.compress(PVH, format=lzma.FORMAT_XZ), gzip.compress(PVH, mtime=0)):
        image = bzimage(packed + struct.pack("<I", len(PVH)))
        assert bzimage_payload(image) == packed + struct.pack("<I", len(PVH))
        assert pvh_vmlinux(image) == PVH
    assert pvh_vmlinux(bzimage(lzma.compress(NOT_PVH, format=lzma.FORMAT_XZ))) is None
    assert pvh_vmlinux(bzimage(b"LZ4 or garbage")) is None
    assert pvh_vmlinux(b"old kernel") is None  # what the fake trees of the image tests hold


@pytest.mark.skipif(shutil.which("zstd") is None, reason="the zstd program unpacks zstd kernels")
def test_zstd_payload_unpacks_through_the_zstd_program() -> None:
    packed = subprocess.run(["zstd", "-q", "-c"], input=PVH, capture_output=True, check=True)
    image = bzimage(packed.stdout + struct.pack("<I", len(PVH)))
    assert pvh_vmlinux(image) == PVH
