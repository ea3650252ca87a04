"""Golden tests for the pure builders: QEMU argv and libvirt domain XML from a GuestSpec.

Regenerate the golden files after an intended change with KSMH_UPDATE_GOLDEN=1.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from harness.guests.libvirt_xml import libvirt_xml
from harness.guests.qemu_argv import qemu_argv
from harness.guests.spec import GuestImage, GuestSpec

GOLDEN = Path(__file__).resolve().parents[1] / "fixtures" / "golden"
IMAGE = GuestImage(Path("/img/vmlinuz"), Path("/img/initramfs.cpio.gz"), "busybox", "6.1.0-t")


def spec(**kw: object) -> GuestSpec:
    base: dict[str, object] = {
        "name": "ksmh-rtest-g01",
        "memory_mib": 256,
        "image": IMAGE,
        "runtime_dir": Path("/run/ksm-harness/fleet/rtest"),
        "index": 1,
    }
    base.update(kw)
    return GuestSpec(**base)  # type: ignore[arg-type]


DEBIAN = GuestImage(
    Path("/img/debian/vmlinuz"),
    Path("/img/debian/initramfs.cpio.gz"),
    "debian",
    "6.1.0-t",
    disk=Path("/img/debian/disk.img"),
    cmdline=("ksmh.root=/dev/vda",),
)

CASES = {
    "debian": spec(image=DEBIAN),
    "tcg-merge": spec(),
    "tcg-nomerge": spec(mem_merge=False),
    "kvm-2cpu": spec(accel="kvm", vcpus=2, memory_mib=1024),
}


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("KSMH_UPDATE_GOLDEN"):
        path.write_text(text)
    assert path.exists(), f"missing golden file {path}; run with KSMH_UPDATE_GOLDEN=1"
    assert text == path.read_text()


@pytest.mark.parametrize("case", sorted(CASES))
def test_qemu_argv_golden(case: str) -> None:
    check_golden(f"qemu-argv-{case}.txt", "\n".join(qemu_argv(CASES[case])) + "\n")


@pytest.mark.parametrize("case", sorted(CASES))
def test_libvirt_xml_golden(case: str) -> None:
    check_golden(f"libvirt-{case}.xml", libvirt_xml(CASES[case]))


@pytest.mark.parametrize("case", sorted(CASES))
def test_guest_ram_is_anonymous_private(case: str) -> None:
    argv = " ".join(qemu_argv(CASES[case]))
    xml = libvirt_xml(CASES[case])
    for forbidden in ("memfd", "share=on", "hugepages", "memory-backend-file", "mem-path"):
        assert forbidden not in argv
    for forbidden in ("<hugepages", "<source type=", "<access mode=", "memfd"):
        assert forbidden not in xml


def test_mem_merge_maps_to_machine_option_and_nosharepages() -> None:
    on, off = spec(), spec(mem_merge=False)
    assert "pc,mem-merge=on" in qemu_argv(on)
    assert "pc,mem-merge=off" in qemu_argv(off)
    assert "<nosharepages />" not in libvirt_xml(on)
    assert "<memoryBacking>\n    <nosharepages />\n  </memoryBacking>" in libvirt_xml(off)


def test_accel_maps_to_domain_type_and_accel_flag() -> None:
    assert libvirt_xml(spec()).startswith('<domain type="qemu">')
    assert libvirt_xml(spec(accel="kvm")).startswith('<domain type="kvm">')
    argv = qemu_argv(spec(accel="kvm"))
    assert argv[argv.index("-accel") + 1] == "kvm"
    argv = qemu_argv(spec())
    assert argv[argv.index("-accel") + 1] == "tcg,tb-size=16"


def test_paths_and_cmdline_come_from_the_spec() -> None:
    s = spec(index=7, name="ksmh-rx-g07")
    argv = qemu_argv(s)
    assert argv[argv.index("-append") + 1] == (
        "console=ttyS0 panic=-1 loglevel=4 rdinit=/init ksmh.index=7 ksmh.name=ksmh-rx-g07"
    )
    assert f"socket,id=agent,path={s.agent_socket},server=on,wait=off" in argv
    assert str(s.agent_socket) == "/run/ksm-harness/fleet/rtest/ksmh-rx-g07.agent"


def test_builders_are_pure() -> None:
    s = spec()
    assert qemu_argv(s) == qemu_argv(s)
    assert libvirt_xml(s) == libvirt_xml(s)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"name": "bad name"}, "bad guest name"),
        ({"memory_mib": 32}, "at least 64 MiB"),
        ({"vcpus": 0}, "must be >= 1"),
        ({"accel": "hvf"}, "one of kvm, tcg"),
        ({"index": -1}, "must be >= 0"),
    ],
)
def test_spec_rejects_bad_values(kw: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        spec(**kw)


def test_spec_is_frozen() -> None:
    s = spec()
    with pytest.raises(AttributeError):
        s.memory_mib = 512  # type: ignore[misc]


def test_debian_disk_is_read_only_and_root_is_on_the_command_line() -> None:
    s = spec(image=DEBIAN)
    argv = qemu_argv(s)
    assert argv[argv.index("-drive") + 1] == (
        "file=/img/debian/disk.img,if=virtio,format=raw,readonly=on"
    )
    assert argv[argv.index("-append") + 1].endswith("ksmh.name=ksmh-rtest-g01 ksmh.root=/dev/vda")
    assert "<readonly />" in libvirt_xml(s)
    assert "-drive" not in qemu_argv(spec())
    assert "<disk" not in libvirt_xml(spec())


def test_microvm_argv_golden_puts_the_agent_port_on_virtio_mmio() -> None:
    s = spec(machine="microvm", extra_cmdline=("tsc_early_khz=2445402",))
    argv = qemu_argv(s)
    check_golden("qemu-argv-microvm.txt", "\n".join(argv) + "\n")
    assert argv[argv.index("-machine") + 1] == "microvm,mem-merge=on"
    assert "virtio-serial-device,id=vser0" in argv
    assert not any("pci" in a for a in argv)


def test_microvm_refuses_a_pci_disk_and_the_spec_an_unresolved_machine() -> None:
    with pytest.raises(ValueError, match="no PCI disk"):
        qemu_argv(spec(image=DEBIAN, machine="microvm"))
    with pytest.raises(ValueError, match="one of pc, microvm"):
        spec(machine="auto")
