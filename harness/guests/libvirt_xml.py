"""The libvirt domain XML for a GuestSpec: a pure function, golden-tested.

`<domain type='qemu'>` is TCG, `type='kvm'` is KVM. mem-merge off is libvirt's
`<memoryBacking><nosharepages/></memoryBacking>`; with mem-merge on there is no memoryBacking
element at all, so RAM stays anonymous private memory (no memfd/shared/hugepages source).
The agent channel is a virtio-serial port on a unix socket that libvirt binds and we connect
to; the serial console goes to a file (through virtlogd).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

from harness.guests.spec import AGENT_PORT_NAME, GuestSpec
from harness.kinds import AccelKind


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    el = ET.SubElement(parent, tag, attrs)
    if text is not None:
        el.text = text
    return el


def libvirt_xml(spec: GuestSpec, emulator: str | None = None) -> str:
    """Domain XML for `spec`; `emulator` pins the QEMU binary (libvirt picks one otherwise)."""
    dom = ET.Element("domain", {"type": "kvm" if spec.accel is AccelKind.KVM else "qemu"})
    _sub(dom, "name", spec.name)
    _sub(dom, "memory", str(spec.memory_mib), unit="MiB")
    _sub(dom, "currentMemory", str(spec.memory_mib), unit="MiB")
    if not spec.mem_merge:
        _sub(_sub(dom, "memoryBacking"), "nosharepages")
    _sub(dom, "vcpu", str(spec.vcpus), placement="static")
    os_el = _sub(dom, "os")
    _sub(os_el, "type", "hvm", arch="x86_64", machine="pc")
    _sub(os_el, "kernel", str(spec.image.kernel))
    _sub(os_el, "initrd", str(spec.image.initrd))
    _sub(os_el, "cmdline", spec.cmdline)
    if spec.accel is AccelKind.KVM:
        _sub(dom, "cpu", mode="host-passthrough")
    # Any end of the guest is final: a crash or reboot destroys the domain (like -no-reboot).
    _sub(dom, "on_poweroff", "destroy")
    _sub(dom, "on_reboot", "destroy")
    _sub(dom, "on_crash", "destroy")
    devices = _sub(dom, "devices")
    if emulator:
        _sub(devices, "emulator", emulator)
    if spec.image.disk is not None:
        disk = _sub(devices, "disk", type="file", device="disk")
        _sub(disk, "driver", name="qemu", type="raw")
        source = _sub(disk, "source", file=str(spec.image.disk))
        # libvirt would chown a read-only disk to its QEMU user and never give it back; the
        # image is world-readable, so no relabelling is needed.
        _sub(source, "seclabel", model="dac", relabel="no")
        _sub(disk, "target", dev="vda", bus="virtio")
        _sub(disk, "readonly")
    serial = _sub(devices, "serial", type="file")
    _sub(serial, "source", path=str(spec.console_log))
    _sub(serial, "target", port="0")
    _sub(devices, "controller", type="virtio-serial", index="0")
    channel = _sub(devices, "channel", type="unix")
    _sub(channel, "source", mode="bind", path=str(spec.agent_socket))
    _sub(channel, "target", type="virtio", name=AGENT_PORT_NAME)
    _sub(devices, "memballoon", model="none")
    ET.indent(dom)
    return ET.tostring(dom, encoding="unicode") + "\n"
