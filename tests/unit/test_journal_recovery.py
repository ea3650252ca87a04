"""The run journal and `recover()`: on fake sysfs/proc trees, with real files and fsync."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from harness.errors import HarnessError, RestoreIncomplete
from harness.journal import FleetEntry, Journal, journals, load
from harness.ksm.sysfs import SysfsBackend
from harness.recovery import recover, run_session
from tests.conftest import snapshot

Tree = Callable[[str], tuple[Path, Path]]


def fake_owner(proc: Path, pid: int, start: int) -> None:
    d = proc / str(pid)
    d.mkdir(exist_ok=True)
    (d / "stat").write_text(f"{pid} (ksmh) S 1 1 1 0 -1 0 0 0 0 0 1 1 0 0 20 0 1 0 {start} 0\n")
    (d / "cmdline").write_bytes(b"ksmh\0run\0quickstart.yaml\0")


def test_begin_writes_a_private_atomic_journal(tmp_path: Path) -> None:
    d = tmp_path / "journal"
    j = Journal.begin("20261130-1-quick", "playbook", {"run": 0, "pages_to_scan": 100}, d)
    j.add_fleet(FleetEntry("rabc", "qemu", None, "/run/ksm-harness/fleet"))
    j.set_guests("rabc", {"ksmh-rabc-g00": 123})
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    assert j.path is not None and stat.S_IMODE(j.path.stat().st_mode) == 0o600
    assert [p.name for p in d.iterdir()] == ["20261130-1-quick.json"]  # no temp file left
    data = json.loads(j.path.read_text())
    assert data["version"] == 1 and data["owner_pid"] == os.getpid()
    back = load(j.path)
    assert back.tunables == {"run": 0, "pages_to_scan": 100}
    assert back.fleets == [FleetEntry("rabc", "qemu", None, "/run/ksm-harness/fleet",
                                      {"ksmh-rabc-g00": 123})]  # fmt: skip
    assert back.owner_alive()
    j.remove()
    assert journals(d) == []


def test_recover_restores_the_knobs_of_a_dead_run_and_nothing_of_a_live_one(
    tmp_path: Path, fake_tree: Tree
) -> None:
    root, proc = fake_tree("linux-6.18")
    (root / "pages_shared").write_text("0\n")  # nothing merged any more
    (root / "ksm_zero_pages").write_text("0\n")
    original = SysfsBackend(root, proc).read_tunables().present()
    d = tmp_path / "journal"
    dead = Journal.begin("r-dead", "playbook", original, d, proc)
    fake_owner(proc, 5001, 777)
    live = Journal.begin("r-live", "playbook", {**original, "sleep_millisecs": 1}, d, proc)
    for j, pid, start in ((dead, 5000, 555), (live, 5001, 777)):
        j.owner_pid, j.owner_start, j.owner_cmdline = pid, start, "ksmh run quickstart.yaml"
        j.save()
    (root / "pages_to_scan").write_text("2000\n")  # what the dead run left
    (root / "sleep_millisecs").write_text("10\n")
    lines = recover(d, ksm_root=root, proc=proc)
    assert lines == [
        "restored pages_to_scan 2000 -> 100",
        "restored sleep_millisecs 10 -> 20",
        "removed journal of run r-dead (owner pid 5000 (ksmh run quickstart.yaml) is gone)",
    ]
    assert SysfsBackend(root, proc).read_tunables().present() == original
    assert [p.name for p in journals(d)] == ["r-live.json"]  # a live owner's: untouched
    assert recover(d, ksm_root=root, proc=proc) == []


def test_a_pid_reused_by_another_process_is_a_dead_owner(tmp_path: Path, fake_tree: Tree) -> None:
    root, proc = fake_tree("linux-6.18")
    d = tmp_path / "journal"
    j = Journal.begin("r-old", "pytest", {}, d, proc)
    fake_owner(proc, 6000, 100)
    j.owner_pid, j.owner_start = 6000, 99  # the pid lives, but it started later: not ours
    j.save()
    assert not load(j.path).owner_alive(proc)  # type: ignore[arg-type]
    assert recover(d, ksm_root=root, proc=proc)[-1].startswith("removed journal of run r-old")


def test_a_corrupt_journal_is_named_and_kept(tmp_path: Path, fake_tree: Tree) -> None:
    root, proc = fake_tree("linux-6.18")
    d = tmp_path / "journal"
    d.mkdir(mode=0o700)
    (d / "broken.json").write_text("{not json")
    (lines,) = [recover(d, ksm_root=root, proc=proc)]
    assert len(lines) == 1 and lines[0].startswith(f"skipped {d}/broken.json: not a readable")
    assert (d / "broken.json").exists()
    with pytest.raises(HarnessError, match="not a readable ksm-harness journal"):
        load(d / "broken.json")


def test_session_restores_and_removes_the_journal_even_after_an_error(
    tmp_path: Path, fake_tree: Tree
) -> None:
    root, proc = fake_tree("linux-6.18")
    (root / "pages_shared").write_text("0\n")
    b = SysfsBackend(root, proc)
    before = snapshot(root)
    d = tmp_path / "journal"
    said: list[str] = []
    with (
        pytest.raises(RuntimeError),
        run_session(b, "r1", "playbook", echo=said.append, lock_path=tmp_path / "l", journal_dir=d),
    ):
        b.write_tunables(pages_to_scan=5000, smart_scan=0)
        assert len(journals(d)) == 1
        raise RuntimeError("crash")
    assert snapshot(root) == before
    assert journals(d) == []


def test_session_keeps_the_journal_when_a_knob_cannot_go_back(
    tmp_path: Path, fake_tree: Tree
) -> None:
    root, proc = fake_tree("linux-6.18")
    (root / "pages_shared").write_text("0\n")
    b = SysfsBackend(root, proc)
    d = tmp_path / "journal"
    said: list[str] = []
    with (
        pytest.raises(RestoreIncomplete, match="smart_scan: not restored to 1"),
        run_session(b, "r2", "playbook", echo=said.append, lock_path=tmp_path / "l", journal_dir=d),
    ):
        b.write_tunables(smart_scan=0)
        b._write = _refuse_smart_scan(b)  # type: ignore[method-assign]
    assert [p.name for p in journals(d)] == ["r2.json"]
    assert said[-1].startswith(f"kept journal {d}/r2.json: smart_scan")


def _refuse_smart_scan(b: SysfsBackend) -> Callable[[str, str], None]:
    real = b._write

    def write(name: str, text: str) -> None:
        if name == "smart_scan":
            raise PermissionError(1, "Operation not permitted")
        real(name, text)

    return write
