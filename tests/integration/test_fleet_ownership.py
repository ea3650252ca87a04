"""`ksmh fleet down --all` stops only what is ours: real guests, real processes, real libvirt.

A fleet whose owner lives (another run) is left alone; once its owner dies (SIGKILL, so
nothing tore it down), the same command stops it. A persistent libvirt domain with our name
prefix is never touched (we only create transient ones). `--run` takes run ids, not paths.
"""

from __future__ import annotations

import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from harness.run import PIPE, spawn
from tests.integration.test_run_quickstart import qemu_processes_of

OWNER = """
import sys, time
from pathlib import Path
from harness.guests.fleet import Fleet
from harness.guests.spec import FleetSpec
spec = FleetSpec(1, 128, accel="tcg", mem_merge=False)
fleet = Fleet(spec, runtime_root=Path(sys.argv[1]), progress=False)
fleet.up().raise_if_failed()
print(fleet.run_id, flush=True)
time.sleep(600)
"""


def ksmh(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "harness.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.mark.qemu
def test_down_all_spares_a_live_owners_fleet_and_stops_it_once_the_owner_is_dead() -> None:
    # A short root: the guests' UNIX socket paths must stay under 108 bytes.
    root = tempfile.mkdtemp(prefix="ksmh-own-")
    owner = spawn([sys.executable, "-c", OWNER, root], stdout=PIPE)
    run_id = ""
    try:
        assert owner.stdout is not None
        run_id = owner.stdout.readline().decode().strip()
        assert run_id.startswith("r"), run_id
        down = ksmh("fleet", "--runtime-dir", root, "down", "--all")
        assert down.returncode == 0, down.stderr
        assert f"run {run_id}: left alone, a live process owns it: pid {owner.pid} (" in down.stdout
        assert len(qemu_processes_of(run_id)) == 1
        owner.send_signal(signal.SIGKILL)  # no teardown: the guest is orphaned
        owner.wait(30)
        assert len(qemu_processes_of(run_id)) == 1
        down = ksmh("fleet", "--runtime-dir", root, "down", "--all")
        assert down.returncode == 0, down.stderr
        assert f"run {run_id}: 1 guest stopped" in down.stdout
        assert qemu_processes_of(run_id) == []
        assert not (Path(root) / run_id).exists()
    finally:
        owner.kill()
        owner.wait(30)
        if run_id and qemu_processes_of(run_id):
            ksmh("fleet", "--runtime-dir", root, "down", "--run", run_id)
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.libvirt
def test_down_all_never_touches_a_persistent_libvirt_domain(tmp_path: Path) -> None:
    from harness.guests.libvirt_backend import LibvirtBackend

    name = f"ksmh-persist-{secrets.token_hex(3)}"
    xml = (
        f"<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory>"
        "<os><type arch='x86_64'>hvm</type></os></domain>"
    )
    backend = LibvirtBackend()  # starts virtlogd/libvirtd when they are not running
    backend.conn.defineXML(xml)
    try:
        down = ksmh("fleet", "--runtime-dir", str(tmp_path), "down", "--all")
        assert down.returncode == 0, down.stderr
        assert (
            f"left {name} alone: a persistent libvirt domain (ksm-harness creates only "
            "transient ones)" in down.stdout
        )
        assert name in [d.name() for d in backend.conn.listAllDomains(0)]
    finally:
        backend.conn.lookupByName(name).undefine()
        backend.close()


@pytest.mark.parametrize("bad", ["../../etc", "/tmp/x", "a/b", ".."])
def test_run_takes_run_ids_not_paths(bad: str) -> None:
    done = ksmh("fleet", "down", "--run", bad)
    assert done.returncode == 2
    assert f"{bad!r} is not a fleet run id" in done.stderr
