"""khugepaged pinning on a fake sysfs tree."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.errors import HarnessError
from harness.thp import PIN_MS, khugepaged_pinned


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
