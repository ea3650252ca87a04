"""`ksmh status|set|watch` in-process against fake sysfs trees (harness/ksm/cli.py).

Tests run without a terminal, so the plain output is asserted exactly; the rich path (tables,
the live watch screen) is driven through a Console forced to be a terminal.
"""

from __future__ import annotations

import io
import json
import shutil
import signal
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path
from subprocess import PIPE, Popen

import pytest

from harness.cli import main
from harness.ksm import cli as ksm_cli
from harness.ksm.types import Counters
from harness.run import spawn
from tests.conftest import snapshot
from tests.integration.conftest import free_port

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


STATUS_5_14 = """\
KSM (kernel, page size 4096)

counters
  pages_shared                        10
  pages_sharing                       90
  pages_unshared                      30
  pages_volatile                      0
  full_scans                          4
  stable_node_chains                  0
  stable_node_dups                    0

tunables
  run                                 1
  pages_to_scan                       100
  sleep_millisecs                     20
  merge_across_nodes                  1
  use_zero_pages                      0
  max_page_sharing                    256
  stable_node_chains_prune_millisecs  2000

derived
  saved                               360.0 KiB
  sharing ratio (sharing/shared)      9.00
  waste ratio (unshared/sharing)      0.33
"""


def test_status_plain_when_not_a_terminal(
    fake_tree: Tree, capsys: pytest.CaptureFixture[str]
) -> None:
    # A 5.14 kernel has no general_profit, pages_scanned, smart_scan...: simply not shown.
    # saved = (90 + 0 zero pages) x 4096 = 360 KiB; 90/10 = 9.00; 30/90 = 0.33.
    assert ksmh(fake_tree("linux-5.14"), "status") == 0
    assert capsys.readouterr().out == STATUS_5_14


def forced_terminal(monkeypatch: pytest.MonkeyPatch) -> io.StringIO:
    """Make harness.ksm.cli draw with rich into a buffer, as on a 120-column terminal."""
    from rich.console import Console

    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=120, color_system=None)
    monkeypatch.setattr(ksm_cli, "terminal", lambda stream=None: console)
    return buf


def test_status_rich_tables_on_a_terminal(
    fake_tree: Tree, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    buf = forced_terminal(monkeypatch)
    assert ksmh(fake_tree("linux-5.14"), "status") == 0
    assert capsys.readouterr().out == ""  # everything went through rich
    lines = [ln.rstrip() for ln in buf.getvalue().splitlines()]
    assert lines[:2] == ["KSM (kernel, page size 4096)", "counters"]
    cells = {tuple(c.strip() for c in ln.strip("│┃ ").split("│")) for ln in lines if "│" in ln}
    assert ("pages_sharing", "90") in cells
    assert ("stable_node_chains_prune_millisecs", "2000") in cells
    assert ("saved", "360.0 KiB") in cells
    assert ("waste ratio (unshared/sharing)", "0.33") in cells
    assert not any("general_profit" in ln for ln in lines)


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


def test_watch_frame_plain_text_exactly() -> None:
    prev = Counters(pages_shared=2, pages_sharing=100, full_scans=1)
    cur = Counters(pages_shared=3, pages_sharing=160, full_scans=2)
    rows = ksm_cli.watch_rows(prev, cur, 2.0)
    assert ksm_cli.watch_frame(rows, "kernel", "12:00:00") == (
        "KSM (kernel)   12:00:00\n"
        "  counter                        value          /s\n"
        "  pages_shared                       3         0.5\n"
        "  pages_sharing                    160        30.0\n"
        "  full_scans                         2         0.5"
    )
    first = ksm_cli.watch_rows(None, cur, 0.0)
    assert first[1] == ("pages_sharing", "160", "")  # no rate before the second refresh


def test_watch_live_screen_on_a_terminal(
    fake_tree: Tree, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    buf = forced_terminal(monkeypatch)
    tree = fake_tree("linux-6.18")
    assert ksmh(tree, "watch", "--count", "2", "--interval", "0.01") == 0
    assert capsys.readouterr().out == ""
    screen = buf.getvalue()
    # One table per refresh, redrawn in place, and drawn once more when the display stops.
    assert screen.count("KSM (kernel)") == 3
    assert "\x1b[" in screen  # cursor movement: a live display, not appended frames
    last = screen.rsplit("KSM (kernel)", 1)[1]
    row = next(ln for ln in last.splitlines() if " pages_sharing " in ln)
    assert [c.strip() for c in row.strip("│ ").split("│")] == ["pages_sharing", "298", "0.0"]


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


STALE = (
    "note: the counters are stale: ksmd is stopped (run=0) and no process is registered with "
    "KSM, so they describe memory that may be gone; `ksmh set run=1` lets ksmd recount "
    "(run=2 unmerges)"
)


def _stopped_and_gone(tree: tuple[Path, Path]) -> tuple[Path, Path]:
    """ksmd stopped with merged pages counted, and every process that used KSM gone."""
    root, proc = tree
    (root / "run").write_text("0\n")
    for pid in ("4242", "4343"):
        shutil.rmtree(proc / pid)
    return tree


def test_status_says_stale_counters_in_every_output(
    fake_tree: Tree, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    tree = _stopped_and_gone(fake_tree("linux-5.14"))
    assert ksmh(tree, "status") == 0
    out = capsys.readouterr().out
    head = STATUS_5_14.replace(
        "run                                 1", "run                                 0"
    )
    head = head.replace("360.0 KiB", "360.0 KiB (stale)")
    assert out == head.replace("page size 4096)\n\n", f"page size 4096)\n\n{STALE}\n\n")
    assert ksmh(tree, "status", "--json") == 0
    data = json.loads(capsys.readouterr().out)
    assert data["stale"] is True and "note: " + data["note"] == STALE
    buf = forced_terminal(monkeypatch)
    assert ksmh(tree, "status") == 0
    screen = " ".join(buf.getvalue().split())
    assert " ".join(STALE.split()) in screen and "360.0 KiB (stale)" in screen


def test_status_is_not_stale_while_a_process_uses_ksm_or_ksmd_runs(
    fake_tree: Tree, capsys: pytest.CaptureFixture[str]
) -> None:
    tree = fake_tree("linux-6.18")
    (tree[0] / "run").write_text("0\n")  # stopped, but pid 4242 is still registered
    assert ksmh(tree, "status", "--json") == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["stale"], data["note"]) == (False, None)
    tree = _stopped_and_gone(fake_tree("linux-5.14"))
    (tree[0] / "run").write_text("1\n")  # ksmd runs: it recounts
    assert ksmh(tree, "status") == 0
    assert "note:" not in capsys.readouterr().out


def test_status_without_root_says_the_counters_may_be_stale(
    fake_tree: Tree, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from harness.ksm import sysfs

    monkeypatch.setattr(sysfs, "is_root", lambda: False)  # others' ksm_stat is root-only
    tree = _stopped_and_gone(fake_tree("linux-6.18"))
    assert ksmh(tree, "status", "--json") == 0
    data = json.loads(capsys.readouterr().out)
    assert data["stale"] is None
    assert data["note"].startswith(
        "ksmd is stopped (run=0): the counters are frozen at its last scan and may describe "
        "memory that is gone (not root: the processes registered with KSM cannot all be seen)"
    )
    assert ksmh(tree, "status") == 0
    out = capsys.readouterr().out
    assert "  saved                               1.2 MiB (may be stale)\n" in out
    # general_profit (1201408 bytes among the counters) as a size for people too
    assert "  profit (general_profit)             1.1 MiB\n" in out


def _start(tree: tuple[Path, Path], *args: str) -> Popen[bytes]:
    root, proc = tree
    argv = [sys.executable, "-m", "harness.cli", *args, "--backend", "kernel",
            "--sysfs-root", str(root), "--proc-root", str(proc)]  # fmt: skip
    return spawn(argv, stdout=PIPE, stderr=PIPE)


def _interrupt(p: Popen[bytes]) -> tuple[int, list[str]]:
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=20)
    return p.returncode, err.decode().splitlines()


def test_watch_and_export_exit_130_on_ctrl_c(fake_tree: Tree) -> None:
    watch = _start(fake_tree("linux-6.18"), "watch", "--interval", "0.1")
    exporter = _start(fake_tree("linux-5.14"), "export", "--listen", f"127.0.0.1:{free_port()}")
    try:
        for p in (watch, exporter):
            assert p.stdout is not None and p.stdout.readline()  # first frame / "exporting ..."
        assert _interrupt(watch) == (130, ["ksmh: interrupted"])
        assert _interrupt(exporter) == (130, ["ksmh: interrupted"])
    finally:
        for p in (watch, exporter):
            p.kill()
            p.wait(10)


def test_export_says_once_that_a_pid_is_missing_or_has_exited(fake_tree: Tree) -> None:
    tree = fake_tree("linux-6.18")
    port = free_port()
    exporter = _start(tree, "export", "--listen", f"127.0.0.1:{port}",
                      "--pid", "4242", "--pid", "99999")  # fmt: skip
    url = f"http://127.0.0.1:{port}/metrics"

    def scrape() -> str:
        with urllib.request.urlopen(url, timeout=10) as r:
            return str(r.read().decode())

    try:
        assert exporter.stdout is not None and exporter.stdout.readline()
        first = scrape()
        assert "ksm_process_merging_pages{host=" in first and 'pid="4242"' in first
        shutil.rmtree(tree[1] / "4242")  # the watched process exits
        scrape()
        after = scrape()
        assert 'pid="4242"' not in after
        errors = [
            ln for ln in after.splitlines() if ln.startswith("ksm_exporter_read_errors_total")
        ]
        assert errors and float(errors[0].split()[-1]) == 5  # 99999 x 3 scrapes + 4242 x 2
        code, lines = _interrupt(exporter)
    finally:
        exporter.kill()
        exporter.wait(10)
    assert code == 130
    assert lines == [
        "ksmh: --pid 99999: no such process; its series are left out "
        "(ksm_exporter_read_errors_total counts each scrape)",
        "ksmh: --pid 4242: qemu-system-x86 has exited; its series are left out "
        "(ksm_exporter_read_errors_total counts each scrape)",
        "ksmh: interrupted",
    ]
