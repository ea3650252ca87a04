"""Real guests, real KSM: three guests fill the same 32 MiB and the host merges it.

Guests boot with mem-merge on, so their RAM is registered with KSM: the whole life of the fleet
is inside the `ksm` fixture (host-wide KSM lock held, every knob restored afterwards).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from harness.guests.fleet import Fleet
from harness.guests.spec import FleetSpec
from harness.kinds import AccelKind
from harness.ksm.sysfs import SysfsBackend
from harness.procfs import ksm_stat

PAGES_32M = 32 * 1024 * 1024 // 4096


def processes_mentioning(text: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if text.encode() in cmdline and stat.rpartition(")")[2].split()[0] != "Z":
            pids.append(int(entry.name))
    return pids


def walk_order(pids: dict[str, int], timeout: float = 30.0) -> list[str]:
    """Guest names in the order ksmd's first scan reaches them (their ksm_rmap_items become
    non-zero); at 1000 pages per 20 ms batch a guest takes about half a second."""
    first: dict[str, float] = {}
    deadline = time.monotonic() + timeout
    while len(first) < len(pids) and time.monotonic() < deadline:
        for name, pid in pids.items():
            if name not in first and ksm_stat(pid).rmap_items:
                first[name] = time.monotonic()
        time.sleep(0.002)
    return sorted(first, key=first.__getitem__)


@pytest.mark.ksm_kernel
@pytest.mark.qemu
@pytest.mark.parametrize("backend", ["qemu", pytest.param("libvirt", marks=pytest.mark.libvirt)])
def test_three_guests_filling_the_same_memory_get_merged(ksm: SysfsBackend, backend: str) -> None:
    # ksmd stopped while the guests register: each then joins the end of its list (a running
    # ksmd's moving cursor would interleave them).
    ksm.write_tunables(run=0)
    fleet = Fleet(FleetSpec(3, 160, backend=backend, accel=AccelKind.TCG, ready_timeout=120))
    with fleet:
        pids = fleet.pids()
        assert len(pids) == 3, f"not all guests came up: {fleet.guests}"
        fleet.fill("a", "32M", "byte:0x5a").raise_if_failed()
        before = ksm.read_counters().pages_sharing or 0
        # ksmd's first scan walks the guests in the order they registered with KSM: the
        # index order (they start in turn), which is the order the model's shadow uses.
        ksm.write_tunables(pages_to_scan=1000, sleep_millisecs=20)
        ksm.write_tunables(run=1)
        assert walk_order(pids) == list(pids), "ksmd walks the guests out of index order"
        ksm.write_tunables(pages_to_scan=5000, sleep_millisecs=10)

        deadline = time.monotonic() + 60
        sharing = before
        merging: dict[str, int] = {}
        while time.monotonic() < deadline:
            sharing = ksm.read_counters().pages_sharing or 0
            merging = {n: ksm.ksm_stat(p).merging_pages or 0 for n, p in pids.items()}
            if sharing - before >= 2 * PAGES_32M and min(merging.values()) >= PAGES_32M:
                break
            time.sleep(0.5)
        assert sharing - before >= 2 * PAGES_32M, f"pages_sharing grew by {sharing - before}"
        assert min(merging.values()) >= PAGES_32M, f"ksm_stat merging_pages: {merging}"

        # Merged memory must still read back exactly as written.
        assert fleet.verify("a").raise_if_failed().field("mismatched") == dict.fromkeys(pids, 0)
        sockets = [g.spec.agent_socket for g in fleet.guests]

    assert processes_mentioning(fleet.run_id) == []
    assert not any(s.exists() for s in sockets)
    assert not fleet.run_dir.exists()
    if backend == "libvirt":
        import libvirt

        conn = libvirt.open("qemu:///system")
        try:
            names = [d.name() for d in conn.listAllDomains(0)]
        finally:
            conn.close()
        assert not [n for n in names if fleet.run_id in n]
