"""Probes for what a test or a run needs from the host, each with a precise reason when missing.

Used by the pytest plugin (skip, or fail under KSM_HARNESS_REQUIRE) and by `ksmh` to explain
why a backend cannot be used.
"""

from __future__ import annotations

import glob
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from harness.ksm.sysfs import KSM_ROOT


def missing_ksm_kernel() -> str | None:
    if not (KSM_ROOT / "run").exists():
        return f"no {KSM_ROOT}/run: this kernel has no KSM (CONFIG_KSM=n)"
    if os.geteuid() != 0:
        return "real KSM tests need root (they write /sys/kernel/mm/ksm)"
    if not os.access(KSM_ROOT / "run", os.W_OK):
        return f"{KSM_ROOT} is read-only here (container without a writable sysfs?)"
    return None


def missing_qemu() -> str | None:
    if shutil.which("qemu-system-x86_64") is None:
        return "qemu-system-x86_64 not found (apt-get install qemu-system-x86)"
    if not glob.glob("/boot/vmlinuz-*"):
        return "no guest kernel in /boot (apt-get install linux-image-amd64)"
    return None


def missing_libvirt() -> str | None:
    if shutil.which("libvirtd") is None:
        return "libvirtd not found (apt-get install libvirt-daemon-system)"
    try:
        import libvirt  # noqa: F401
    except ImportError:
        return "the libvirt Python binding is not importable (pip install libvirt-python)"
    if os.geteuid() != 0:
        return "libvirt tests need root (qemu:///system)"
    return missing_qemu()


def missing_fleet() -> str | None:
    """What booting our guest image needs: QEMU, a guest kernel, busybox and a C compiler."""
    reason = missing_qemu()
    if reason is not None:
        return reason
    if not Path("/bin/busybox").exists():
        return "/bin/busybox not found (apt-get install busybox-static)"
    if shutil.which("gcc") is None:
        return "gcc not found: the in-guest agent is compiled at image build (apt-get install gcc)"
    return None


def missing_kvm() -> str | None:
    """KVM that really runs a guest: /dev/kvm alone proves nothing (nested hosts hang guests).

    Uses the accelerator probe's cached verdict, probing once (about 15 s) when there is none.
    """
    reason = missing_fleet()
    if reason is not None:
        return reason
    from harness.errors import HarnessError
    from harness.guests.accel import resolve_accel, static_kvm_problem
    from harness.guests.image import ensure_image

    problem = static_kvm_problem()
    if problem is not None:
        return problem
    try:
        choice = resolve_accel("auto", ensure_image())
    except HarnessError as exc:
        return f"KVM probe failed: {exc}"
    return None if choice.accel == "kvm" else choice.reason


def missing_ssh() -> str | None:
    if not Path("/usr/sbin/sshd").exists():
        return "/usr/sbin/sshd not found (apt-get install openssh-server)"
    return None


def missing_prometheus() -> str | None:
    for tool in ("prometheus", "promtool"):
        if shutil.which(tool) is None:
            return f"{tool} not found (apt-get install prometheus)"
    return None


PROBES: dict[str, Callable[[], str | None]] = {
    "ksm_kernel": missing_ksm_kernel,
    "kvm": missing_kvm,
    "qemu": missing_qemu,
    "fleet": missing_fleet,
    "libvirt": missing_libvirt,
    "ssh": missing_ssh,
    "prometheus": missing_prometheus,
}


# `all` means everything but kvm: a host whose KVM cannot run guests is a supported host (the
# harness falls back to TCG), so a CI on a real KVM host opts in with KSM_HARNESS_REQUIRE=all,kvm.
NOT_IN_ALL = frozenset({"kvm"})


def required(env: str | None = None) -> set[str]:
    """The prerequisites KSM_HARNESS_REQUIRE makes mandatory ('all' and/or a comma list)."""
    value = os.environ.get("KSM_HARNESS_REQUIRE", "") if env is None else env
    names = {v.strip() for v in value.split(",") if v.strip()}
    if "all" in names:
        names |= set(PROBES) - NOT_IN_ALL
    return names & set(PROBES)
