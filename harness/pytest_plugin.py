"""pytest plugin (entry point pytest11): markers for host prerequisites and KSM fixtures.

Kept cheap to import: anything heavy is imported inside fixtures.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

from harness import prereqs

if TYPE_CHECKING:
    from harness.ksm.sysfs import SysfsBackend

MARKERS = {
    "ksm_kernel": "needs the real /sys/kernel/mm/ksm, writable (root)",
    "qemu": "boots real QEMU guests",
    "libvirt": "needs libvirtd and the libvirt Python binding",
    "ssh": "starts real sshd instances on loopback",
    "prometheus": "starts a real Prometheus server",
}


def pytest_configure(config: pytest.Config) -> None:
    for name, text in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {text}")


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Skip a test whose prerequisite is missing, or fail it if KSM_HARNESS_REQUIRE names it."""
    must = prereqs.required()
    for name, probe in prereqs.PROBES.items():
        if item.get_closest_marker(name) is None:
            continue
        reason = probe()
        if reason is None:
            continue
        if name in must:
            pytest.fail(f"KSM_HARNESS_REQUIRE includes {name} but: {reason}", pytrace=False)
        pytest.skip(f"{name}: {reason}")


@pytest.fixture
def ksm() -> Iterator[SysfsBackend]:
    """The real kernel's KSM, with the host-wide lock held and every tunable restored after."""
    from harness.ksm.lock import ksm_lock
    from harness.ksm.sysfs import SysfsBackend

    reason = prereqs.missing_ksm_kernel()
    if reason is not None:
        if "ksm_kernel" in prereqs.required():
            pytest.fail(f"KSM_HARNESS_REQUIRE includes ksm_kernel but: {reason}", pytrace=False)
        pytest.skip(f"ksm_kernel: {reason}")
    backend = SysfsBackend()
    with ksm_lock(), backend.saved():
        yield backend
        # Leave no merged pages behind for the next test (their processes are gone, but the
        # KSM pages stay until ksmd rescans); run=2 drops them, then saved() restores run.
        if backend.read_counters().pages_shared or backend.read_counters().ksm_zero_pages:
            backend.write_tunables(run=2, force=True)
