"""Real QEMU guests without KSM involvement (mem-merge off, so no KSM lock is needed):
a guest killed in the middle of a run fails alone, and teardown still leaves nothing behind."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from harness.guests.accel import probe_kvm
from harness.guests.fleet import Fleet, FleetResult
from harness.guests.image import ensure_image
from harness.guests.spec import FleetSpec
from harness.kinds import AccelKind

pytestmark = pytest.mark.qemu


def live_pids_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if text.encode() not in (entry / "cmdline").read_bytes():
                continue
            if (entry / "stat").read_text().rpartition(")")[2].split()[0] == "Z":
                continue
        except OSError:
            continue
        found.append(int(entry.name))
    return found


def test_guest_killed_mid_run_fails_alone() -> None:
    with Fleet(FleetSpec(3, 128, accel=AccelKind.TCG, mem_merge=False)) as fleet:
        pids = fleet.pids()
        assert len(pids) == 3
        fleet.fill("a", "16M", "mix:7:common=50,zero=20").raise_if_failed()
        victim = fleet.guests[1]
        results: list[FleetResult] = []
        # A 4 s `hold` runs on every guest; one guest's QEMU is killed while it runs.
        worker = threading.Thread(target=lambda: results.append(fleet.run("hold", "a", "4")))
        worker.start()
        time.sleep(1.5)
        os.kill(pids[victim.spec.name], signal.SIGKILL)
        worker.join(timeout=60)
        [held] = results
        assert [r.ok for r in held.values()] == [True, False, True]
        assert str(held[victim.spec.name].error) == (
            f"{victim.spec.name}: guest died: QEMU was killed by signal 9"
        )
        # The others keep working; the dead one stays failed without being contacted.
        after = fleet.verify("a")
        assert after.field("mismatched") == {
            g.spec.name: 0 for g in fleet.guests if g is not victim
        }
        assert after[victim.spec.name].error is held[victim.spec.name].error
        assert set(fleet.pids()) == set(pids) - {victim.spec.name}
    assert live_pids_mentioning(fleet.run_id) == []
    assert not fleet.run_dir.exists()


def test_accel_probe_gives_a_verdict_within_its_deadline_and_leaves_nothing() -> None:
    image = ensure_image()
    t0 = time.monotonic()
    verdict = probe_kvm(image, deadline=6.0)
    took = time.monotonic() - t0
    assert took < 6.0 + 10.0
    assert verdict.reason
    if not verdict.usable:
        assert "does not exist" in verdict.reason or "KVM guest" in verdict.reason
    assert live_pids_mentioning("ksmh-probe-") == []
