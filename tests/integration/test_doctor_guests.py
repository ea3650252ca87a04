"""`ksmh doctor` against real QEMU guests whose RAM KSM cannot merge.

One fleet of three TCG guests, booted once for the module under the host KSM lock (their
option ROMs are still mergeable): guest 0's RAM is memory-backend-memfd (share=on), guest 1's
is hugetlbfs (memory-backend-memfd hugetlb=on, with vm.nr_hugepages reserved for it and
released afterwards), guest 2 runs with -machine mem-merge=off. Every guest fills 16 MiB of
identical pages through the agent; the doctor must name each case with its evidence.
The argv is harness.guests.qemu_argv's plus the memory-backend options (BackedQemu).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.doctor.catalog import Finding
from harness.doctor.diagnosis import Diagnosis, diagnose
from harness.doctor.facts import Options
from harness.guests.fleet import Fleet, new_run_id
from harness.guests.qemu_argv import qemu_argv
from harness.guests.qemu_backend import QemuBackend
from harness.guests.spec import FleetSpec, GuestSpec
from harness.kinds import AccelKind
from harness.ksm.select import choose_backend
from harness.ksm.sysfs import SysfsBackend
from harness.prereqs import missing_fleet, missing_ksm_kernel
from harness.pytest_plugin import require
from harness.recovery import run_session
from harness.run import run, spawn

pytestmark = [pytest.mark.ksm_kernel, pytest.mark.fleet, pytest.mark.qemu]

MEMORY_MIB = 128
FILL = 4096  # pages of 0x5a each guest writes (16 MiB)
HUGEPAGES = MEMORY_MIB // 2
NR_HUGEPAGES = Path("/proc/sys/vm/nr_hugepages")
BACKENDS = {
    0: f"memory-backend-memfd,id=ram0,size={MEMORY_MIB}M,share=on",
    1: f"memory-backend-memfd,id=ram0,size={MEMORY_MIB}M,hugetlb=on,hugetlbsize=2M",
}
MERGE_OFF = {2}


class BackedQemu(QemuBackend):
    """QemuBackend whose guests get another RAM backend (by guest index) or mem-merge=off."""

    def start(self, spec: GuestSpec) -> int:
        argv = qemu_argv(spec, self.binary)
        machine = argv.index("-machine") + 1
        if spec.index in MERGE_OFF:
            argv[machine] = argv[machine].replace("mem-merge=on", "mem-merge=off")
        if spec.index in BACKENDS:
            argv[machine] += ",memory-backend=ram0"
            argv[machine + 1 : machine + 1] = ["-object", BACKENDS[spec.index]]
        spec.runtime_dir.mkdir(parents=True, exist_ok=True)
        log = spec.runtime_dir / f"{spec.name}.qemu.log"
        with log.open("wb") as err:
            proc = spawn(argv, stderr=err, stdout=err)
        self._procs[spec.name] = proc
        return proc.pid


def _hugepages(n: int) -> int:
    NR_HUGEPAGES.write_text(f"{n}\n")
    return int(NR_HUGEPAGES.read_text())


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    require("ksm_kernel", missing_ksm_kernel())
    require("fleet", missing_fleet())
    backend = choose_backend("kernel", need_write=True).backend
    assert isinstance(backend, SysfsBackend)
    with run_session(backend, "pytest-doctor-guests", "pytest", echo=print):
        before = int(NR_HUGEPAGES.read_text())
        # thp off: zero-filled THP subpages would never merge (the fleet disables it in QEMU).
        spec = FleetSpec(3, MEMORY_MIB, accel=AccelKind.TCG, concurrency=3, thp=False)
        f = Fleet(spec, backend=BackedQemu(), run_id=new_run_id(), progress=False)
        try:
            if _hugepages(before + HUGEPAGES) < before + HUGEPAGES:
                pytest.fail(f"could not reserve {HUGEPAGES} huge pages (vm.nr_hugepages)")
            f.up().raise_if_failed()
            f.fill("a", "16M", "byte:0x5a").raise_if_failed()
            yield f
        finally:
            f.down()
            assert _hugepages(before) == before, "vm.nr_hugepages not restored"


@pytest.fixture(scope="module")
def diagnosis(fleet: Fleet) -> Diagnosis:
    pids = {pid: name for name, pid in fleet.pids().items()}
    return diagnose(pids, f"guests {fleet.run_id}", Options(window=0.2))


def pid_of(fleet: Fleet, index: int) -> int:
    return fleet.pids()[fleet.guests[index].spec.name]


def ram_finding(d: Diagnosis, kind: str, pid: int) -> Finding:
    """The finding about the guest's RAM: the largest VMA of that kind in that process."""
    found = [f for f in d.of_kind(kind) if f.pid == pid]
    assert found, [f.message for f in d.findings]
    return max(found, key=lambda f: f.data["end"] - f.data["start"])


def evidence(f: Finding, file: str) -> list[str]:
    return [e.value for e in f.evidence if e.file == file]


def test_memfd_guest_ram(fleet: Fleet, diagnosis: Diagnosis) -> None:
    pid = pid_of(fleet, 0)
    f = ram_finding(diagnosis, "shared-mapping", pid)
    assert f.data["end"] - f.data["start"] == MEMORY_MIB << 20
    assert f.data["name"] == "/memfd:memory-backend-memfd (deleted)"
    assert "sh" in f.data["flags"] and "mg" not in f.data["flags"]
    assert FILL <= f.data["would_merge"] <= f.data["present"] <= MEMORY_MIB * 256
    assert evidence(f, f"/proc/{pid}/cmdline") == [BACKENDS[0]]
    assert evidence(f, f"/proc/{pid}/smaps")[0].startswith(
        f"{f.data['start']:x}-{f.data['end']:x} {f.data['name']} VmFlags: "
    )
    assert f.fix.startswith("QEMU: use -object memory-backend-ram")


def test_hugetlbfs_guest_ram(fleet: Fleet, diagnosis: Diagnosis) -> None:
    pid = pid_of(fleet, 1)
    f = ram_finding(diagnosis, "hugetlb-mapping", pid)
    assert f.data["end"] - f.data["start"] == MEMORY_MIB << 20
    assert "ht" in f.data["flags"]
    assert f.data["name"].startswith("/memfd:memory-backend-memfd")
    assert FILL <= f.data["would_merge"] <= f.data["present"]
    assert evidence(f, f"/proc/{pid}/cmdline") == [BACKENDS[1]]
    assert "hugetlb" in f.fix


def test_guest_with_mem_merge_off(fleet: Fleet, diagnosis: Diagnosis) -> None:
    pid = pid_of(fleet, 2)
    f = ram_finding(diagnosis, "not-mergeable", pid)
    assert f.data["end"] - f.data["start"] >= MEMORY_MIB << 20
    assert "mg" not in f.data["flags"] and "sh" not in f.data["flags"]
    assert f.data["would_merge"] >= FILL
    assert evidence(f, f"/proc/{pid}/cmdline") == ["pc,mem-merge=off"]
    assert f.fix == "QEMU: -machine mem-merge=on (libvirt: remove <nosharepages/>)"
    # The guest RAM KSM could have scanned: none of it is.
    assert diagnosis.analysis.summaries[pid].scanned_pages == 0


def test_cli_guests_grouped_by_label(fleet: Fleet) -> None:
    out = run(
        [sys.executable, "-m", "harness.cli", "doctor", "--guests", fleet.run_id, "--json",
         "--window", "0", "--label", "0-1:tenant=acme", "--label", "2:tenant=globex",
         "--group-by", "tenant"],
        check=False,
        timeout=120,
    )  # fmt: skip
    assert out.returncode == 1, out.stderr
    doc = json.loads(out.stdout)
    assert doc["selection"] == f"guests {fleet.run_id}"
    names = sorted(p["name"] for p in doc["processes"])
    assert names == sorted(g.spec.name for g in fleet.guests)
    kinds = {(f["kind"], f["pid"]) for f in doc["findings"]}
    assert {("shared-mapping", pid_of(fleet, 0)), ("hugetlb-mapping", pid_of(fleet, 1)),
            ("not-mergeable", pid_of(fleet, 2))} <= kinds  # fmt: skip
    e = doc["exposure"]
    assert e["groups"] == ["acme", "globex"]
    assert e["members"] == {"acme": sorted([pid_of(fleet, 0), pid_of(fleet, 1)]),
                            "globex": [pid_of(fleet, 2)]}  # fmt: skip
