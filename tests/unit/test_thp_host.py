"""khugepaged pinning on a fake sysfs tree, journalled and recovered."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from harness.errors import HarnessError
from harness.journal import Journal, active, journals, load
from harness.recovery import recover
from harness.thp import JOURNAL_NOTE, PIN_MS, khugepaged_pinned


def test_pinned_and_restored(tmp_path: Path) -> None:
    knob = tmp_path / "khugepaged" / "scan_sleep_millisecs"
    knob.parent.mkdir()
    knob.write_text("10000\n")
    with khugepaged_pinned(tmp_path) as saved:
        assert saved == 10000
        assert knob.read_text() == str(PIN_MS)
    assert knob.read_text() == "10000"
    with pytest.raises(RuntimeError), khugepaged_pinned(tmp_path):
        raise RuntimeError("the run failed")
    assert knob.read_text() == "10000"  # restored on errors too


def test_no_thp_is_fine_and_unreadable_is_an_error(tmp_path: Path) -> None:
    with khugepaged_pinned(tmp_path / "absent") as saved:
        assert saved is None
    knob = tmp_path / "khugepaged" / "scan_sleep_millisecs"
    knob.parent.mkdir()
    knob.write_text("garbage")
    with pytest.raises(HarnessError, match="cannot read"), khugepaged_pinned(tmp_path):
        pass


def test_the_pin_is_journalled_and_recovered_after_a_crash(
    tmp_path: Path, fake_tree: Callable[[str], tuple[Path, Path]]
) -> None:
    root, proc = fake_tree("linux-6.18")
    thp = root.parent / "transparent_hugepage"
    knob = thp / "khugepaged" / "scan_sleep_millisecs"
    knob.parent.mkdir(parents=True)
    knob.write_text("10000\n")
    d = tmp_path / "journal"
    j = Journal.begin("r-thp", "playbook", {}, d, proc)
    assert active() is j and j.path is not None
    with khugepaged_pinned(thp):  # the run's journal, found without being passed
        assert load(j.path).notes == {JOURNAL_NOTE: 10000}
    assert load(j.path).notes == {} and knob.read_text() == "10000"
    # A run SIGKILLed while khugepaged is pinned: `ksmh recover` puts the interval back.
    with khugepaged_pinned(thp):
        j.owner_pid, j.owner_start = 5000, 555  # as if dead: no such process in the fake /proc
        j.save()
        assert knob.read_text() == str(PIN_MS)
        assert recover(d, ksm_root=root, proc=proc) == [
            f"restored khugepaged scan_sleep_millisecs {PIN_MS} -> 10000",
            "removed journal of run r-thp (owner pid 5000 (?) is gone)",
        ]
        assert knob.read_text() == "10000" and journals(d) == []
    j.remove()
    assert active() is not j
