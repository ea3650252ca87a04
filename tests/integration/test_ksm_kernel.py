"""SysfsBackend and `ksmh` against the real kernel's KSM (root, /sys/kernel/mm/ksm)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import stat
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from subprocess import Popen

import pytest

from harness import procfs
from harness.errors import KsmWriteRefused
from harness.ksm.sysfs import KSM_ROOT, SysfsBackend
from harness.run import run
from harness.waiting import wait_until

pytestmark = pytest.mark.ksm_kernel
Child = Callable[[int, int], Popen[bytes]]
REPO = Path(__file__).resolve().parents[2]


def start_clean(ksm: SysfsBackend, **tunables: object) -> None:
    """Drop all KSM state (run=2 also resets full_scans) and set the knobs for a test."""
    ksm.write_tunables(run=2, force=True)
    ksm.write_tunables(
        advisor_mode="none",
        pages_to_scan=1000,
        sleep_millisecs=20,
        smart_scan=1,
        max_page_sharing=256,
        use_zero_pages=0,
        merge_across_nodes=1,
        **tunables,
    )


def merged_child(ksm: SysfsBackend, mergeable_child: Child, pages: int = 100) -> tuple[int, int]:
    """A child with `pages` pages of 'a', after 2 full scans: (pid, pages_scanned before)."""
    start_clean(ksm)
    scanned = ksm.read_counters().pages_scanned or 0
    child = mergeable_child(pages, 0x61)
    ksm.write_tunables(run=1)
    ksm.wait_full_scans(2, timeout=60)
    return child.pid, scanned


def test_identical_pages_merge_with_exact_counters(
    ksm: SysfsBackend, mergeable_child: Child
) -> None:
    pid, scanned_before = merged_child(ksm, mergeable_child)
    s = ksm.frozen_sample()
    c = s.counters
    # 100 pages of 'a' in one process: one KSM page mapped 100 times (spec, Example 1 N=100
    # with one process). pages_scanned: every page is visited once per scan, never skipped.
    assert c.full_scans is not None and c.full_scans >= 2 and c.pages_scanned is not None
    assert (c.pages_shared, c.pages_sharing, c.pages_unshared, c.pages_volatile) == (1, 99, 0, 0)
    assert (c.stable_node_chains, c.stable_node_dups, c.ksm_zero_pages) == (0, 0, 0)
    # run=2 resets full_scans but not pages_scanned (spec, Example 7), hence the delta.
    assert c.pages_scanned == scanned_before + 100 * c.full_scans
    assert c.general_profit == 99 * 4096 - 100 * 64
    assert s.tunables.run == 1 and ksm.read_tunables().run == 1
    st = ksm.ksm_stat(pid)
    assert (st.rmap_items, st.zero_pages, st.merging_pages) == (100, 0, 100)
    assert st.process_profit == 100 * 4096 - 100 * 64
    assert (st.merge_any, st.mergeable) == (False, True)


def test_saved_restores_every_tunable() -> None:
    from harness.ksm.lock import ksm_lock

    backend = SysfsBackend()
    with ksm_lock():
        before = backend.read_tunables()
        with backend.saved():
            backend.write_tunables(run=2, force=True)  # max_page_sharing needs nothing merged
            backend.write_tunables(
                pages_to_scan=4321,
                sleep_millisecs=7,
                smart_scan=1 - (before.smart_scan or 0),
                use_zero_pages=1 - (before.use_zero_pages or 0),
                max_page_sharing=3,
                stable_node_chains_prune_millisecs=1234,
                advisor_max_cpu=11,
                advisor_min_pages_to_scan=12,
                advisor_max_pages_to_scan=13000,
                advisor_target_scan_time=14,
                run=1,
            )
            assert backend.read_tunables().pages_to_scan == 4321
            backend.write_tunables(advisor_mode="scan-time")
            assert backend.read_tunables().pages_to_scan == 12  # the advisor's minimum
        assert backend.read_tunables() == before


def test_ebusy_on_max_page_sharing_while_merged(ksm: SysfsBackend, mergeable_child: Child) -> None:
    merged_child(ksm, mergeable_child, pages=20)
    before = ksm.read_tunables()
    # The kernel itself refuses it (what our check foresees)...
    with pytest.raises(OSError) as info:
        ksm._write("max_page_sharing", "10")
    assert info.value.errno == errno.EBUSY
    # ...so `ksmh set` refuses the whole assignment before writing any of it.
    sleep = (before.sleep_millisecs or 0) + 7
    cmd = [sys.executable, "-m", "harness.cli", "set", f"sleep_millisecs={sleep}"]
    proc = run([*cmd, "max_page_sharing=10"], check=False)
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()
    # This test holds the host lock, so `ksmh set` warns that a run is in progress first.
    assert lines[0].startswith("ksmh: warning: a ksm-harness run is in progress")
    assert lines[1] == (
        "ksmh: error: max_page_sharing: the kernel refuses changes while pages are merged "
        "(pages_shared 1)"
    )
    assert "ksmh set run=2" in lines[2]
    assert ksm.read_tunables() == before


def test_pages_to_scan_refused_under_the_advisor(ksm: SysfsBackend) -> None:
    ksm.write_tunables(advisor_mode="scan-time")
    with pytest.raises(KsmWriteRefused, match="while advisor_mode is scan-time"):
        ksm.write_tunables(pages_to_scan=777)
    assert ksm.read_tunables().pages_to_scan == ksm.read_tunables().advisor_min_pages_to_scan


NOBODY_SCRIPT = """
from harness.errors import HarnessError
from harness.ksm.sysfs import SysfsBackend
try:
    SysfsBackend().write_tunables(pages_to_scan=4242)
except HarnessError as exc:
    print(type(exc).__name__, exc, "|", exc.hint)
"""


@pytest.fixture
def world_readable_copy() -> Iterator[Path]:
    """The harness package where user nobody can read it (the checkout may be under /root)."""
    top = Path(tempfile.mkdtemp(prefix="ksmh-nobody-"))
    try:
        shutil.copytree(REPO / "harness", top / "harness")
        for p in [top, *top.rglob("*")]:
            p.chmod(p.stat().st_mode | stat.S_IROTH | stat.S_IXOTH)
        yield top
    finally:
        shutil.rmtree(top)


def test_non_root_write_is_refused_with_a_hint(
    ksm: SysfsBackend, world_readable_copy: Path
) -> None:
    before = ksm.read_tunables()
    proc = run(
        [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "/usr/bin/python3",
            "-c",
            NOBODY_SCRIPT,
        ],
        cwd=world_readable_copy,
        env={"PYTHONPATH": str(world_readable_copy), "PATH": "/usr/bin:/bin"},
    )
    assert proc.stdout.strip() == (
        "KsmPermissionDenied pages_to_scan: permission denied writing KSM tunables "
        "| run as root (sysfs KSM knobs are root-only)"
    )
    assert ksm.read_tunables() == before


def test_status_json_equals_sysfs(ksm: SysfsBackend, mergeable_child: Child) -> None:
    merged_child(ksm, mergeable_child, pages=30)
    ksm.write_tunables(run=0)  # hold the counters still while both sides read
    proc = run([sys.executable, "-m", "harness.cli", "status", "--json", "--backend", "kernel"])
    data = json.loads(proc.stdout)
    for name, value in data["counters"].items():
        assert value == int((KSM_ROOT / name).read_text()), name
    assert data["counters"]["pages_sharing"] == 29
    assert data["tunables"]["run"] == 0
    assert data["derived"]["saved_bytes"] == 29 * 4096


def test_status_says_counters_are_stale_once_ksmd_stopped_and_the_process_is_gone(
    ksm: SysfsBackend, mergeable_child: Child
) -> None:
    """What ksmh status warns about, measured: with run=0 nothing recounts when the merged
    process exits; run=1, as the note says, lets ksmd drop what the exit left."""
    child_pid, _ = merged_child(ksm, mergeable_child, pages=50)
    ksm.write_tunables(run=0)
    os.kill(child_pid, signal.SIGKILL)
    wait_until(lambda: not procfs.pid_alive(child_pid), 10)
    assert procfs.ksm_users() == []
    cmd = [sys.executable, "-m", "harness.cli", "status", "--backend", "kernel"]
    data = json.loads(run([*cmd, "--json"]).stdout)
    assert data["counters"]["pages_sharing"] == 49  # the dead process's merges, still counted
    assert data["stale"] is True and data["note"].startswith("the counters are stale: ksmd")
    plain = run(cmd).stdout.splitlines()
    assert plain[2].startswith("note: the counters are stale: ksmd is stopped (run=0)")
    assert "  saved                               196.0 KiB (stale)" in plain
    ksm.write_tunables(run=1)
    wait_until(lambda: ksm.read_counters().pages_shared == 0, 30)
    assert ksm.read_counters().pages_sharing == 0
    data = json.loads(run([*cmd, "--json"]).stdout)
    assert (data["stale"], data["note"]) == (False, None)
