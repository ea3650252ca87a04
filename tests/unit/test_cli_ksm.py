"""`ksmh status|set|watch` in-process against fake sysfs trees."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from harness.cli import main
from tests.conftest import snapshot

Tree = Callable[[str], tuple[Path, Path]]


def ksmh(tree: tuple[Path, Path], *args: str) -> int:
    root, proc = tree
    return main([*args, "--backend", "kernel", "--sysfs-root", str(root), "--proc-root", str(proc)])


def test_status_json_equals_the_files(fake_tree: Tree, capsys: pytest.CaptureFixture[str]) -> None:
    tree = fake_tree("linux-6.18")
    assert ksmh(tree, "status", "--json") == 0
    data = json.loads(capsys.readouterr().out)
    root = tree[0]
    for name, value in data["counters"].items():
        assert value == int((root / name).read_text())
    assert data["tunables"]["advisor_mode"] == "none"
    assert data["tunables"]["pages_to_scan"] == 100
    assert data["derived"] == {
        "saved_bytes": 301 * 4096,
        "sharing_ratio": 149.0,
        "waste_ratio": 7 / 298,
    }
    assert data["source"] == "kernel"


def test_status_table(fake_tree: Tree, capsys: pytest.CaptureFixture[str]) -> None:
    assert ksmh(fake_tree("linux-5.14"), "status") == 0
    out = capsys.readouterr().out
    assert "pages_sharing                       90" in out
    assert "saved                               360.0 KiB" in out
    assert "general_profit" not in out  # a 5.14 kernel has no such file


def test_set_writes(fake_tree: Tree, capsys: pytest.CaptureFixture[str]) -> None:
    tree = fake_tree("linux-6.18")
    assert ksmh(tree, "set", "pages_to_scan=5000", "smart_scan=0") == 0
    assert capsys.readouterr().out.strip() == "pages_to_scan=5000 smart_scan=0"
    assert (tree[0] / "pages_to_scan").read_text() == "5000\n"


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["nosuch=1"], "ksmh: error: unknown KSM tunable 'nosuch'"),
        (["run=7"], "ksmh: error: run: 7 is out of range 0..2"),
        (["pages_to_scan"], "ksmh: error: expected KEY=VALUE, got 'pages_to_scan'"),
        (["pages_to_scan=10", "run=9"], "ksmh: error: run: 9 is out of range 0..2"),
        (["run=2"], "ksmh: error: run=2 could need 1 MiB of new memory at once"),
    ],
)
def test_bad_set_is_one_line_and_changes_nothing(
    fake_tree: Tree, capsys: pytest.CaptureFixture[str], args: list[str], line: str
) -> None:
    tree = fake_tree("linux-6.18")
    before = snapshot(tree[0])
    assert ksmh(tree, "set", *args) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith(line)
    assert len(err) <= 2 and all(not e.startswith("Traceback") for e in err)
    assert snapshot(tree[0]) == before


def test_missing_ksm_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", "--backend", "kernel", "--sysfs-root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"ksmh: error: no KSM at {tmp_path}")
    assert "--backend model" in err


def test_watch_prints_rates(fake_tree: Tree, capsys: pytest.CaptureFixture[str]) -> None:
    tree = fake_tree("linux-6.18")
    assert ksmh(tree, "watch", "--count", "2", "--interval", "0.01") == 0
    frames = capsys.readouterr().out.strip().split("\n\n")
    assert len(frames) == 2
    assert "pages_sharing" in frames[1] and "0.0" in frames[1]


def test_help_everywhere(capsys: pytest.CaptureFixture[str]) -> None:
    for cmd in (["--help"], ["status", "--help"], ["set", "--help"], ["export", "--help"]):
        with pytest.raises(SystemExit) as info:
            main(cmd)
        assert info.value.code == 0
    assert "--listen" in capsys.readouterr().out


def test_only_run_py_starts_processes() -> None:
    """DESIGN: one subprocess chokepoint, never shell=True."""
    pkg = Path(__file__).resolve().parents[2] / "harness"
    offenders = []
    for path in pkg.rglob("*.py"):
        text = path.read_text()
        if path.name != "run.py" and ("import subprocess" in text or "os.system(" in text):
            offenders.append(str(path))
        if "shell=True" in text:
            offenders.append(f"{path} (shell=True)")
    assert offenders == []
