"""Results directory: write/read, plots, report.md, re-render and compare, on synthetic runs."""

from __future__ import annotations

import copy
import struct
from pathlib import Path
from typing import Any

import pytest

from harness.cli import main
from harness.report.compare import compare
from harness.report.render import render
from harness.report.results import Results, read_results, write_results

GUESTS = ["ksmh-r1-g00", "ksmh-r1-g01", "ksmh-r1-g02"]


def synthetic(sharing_end: int = 24000, sweep_seconds: float = 12.5) -> Results:
    counters = {
        "kernel": {
            "start": {"pages_shared": 0, "pages_sharing": 0, "full_scans": 0},
            "end": {
                "pages_shared": 96,
                "pages_sharing": sharing_end,
                "full_scans": 7,
                "general_profit": 98_304_000 - 9000 * 64,
            },
            "delta": {"pages_shared": 96, "pages_sharing": sharing_end, "full_scans": 7},
        },
        "model": {
            "start": {"pages_shared": 0, "pages_sharing": 0, "full_scans": 0},
            "end": {
                "pages_shared": 96,
                "pages_sharing": 24000,
                "full_scans": 7,
                "general_profit": 98_304_000 - 9100 * 64,
            },
            "delta": {"pages_shared": 96, "pages_sharing": 24000, "full_scans": 7},
        },
    }
    run: dict[str, Any] = {
        "run_id": "r1",
        "playbook": {"name": "synthetic", "file": "playbooks/x.yaml", "description": "test"},
        "backend": "kernel",
        "accelerator": "tcg",
        "host": {"hostname": "h", "kernel_release": "6.18.0", "cpus": 2, "mem_total_mib": 1024},
        "started": "2026-01-01T00:00:00+0000",
        "duration_seconds": 42.0,
        "tunables": {"run": {"pages_to_scan": 2000, "run": 0}},
        "guests": [{"name": g, "index": i, "pid": 100 + i} for i, g in enumerate(GUESTS)],
        "phases": [
            {
                "name": "fill",
                "line": 5,
                "t_start": 1.0,
                "t_end": 20.0,
                "counters": counters,
                "waits": [{"line": 9, "kind": "converged", "seconds": 6.25, "scans": 3}],
                "verify": {g: 0 for g in GUESTS},
                "expectations": [
                    {"text": "verify: clean", "line": 12, "status": "passed", "detail": "ok"},
                    {"text": "pages_sharing >= 1", "line": 13, "status": "failed", "detail": "0"},
                ],
                "sweeps": [
                    {
                        "tunable": "pages_to_scan",
                        "points": [
                            {"value": 100, "seconds": sweep_seconds, "ksmd_cpu_seconds": 1.5},
                            {"value": 1000, "seconds": 3.0, "ksmd_cpu_seconds": 1.25},
                        ],
                    }
                ],
            }
        ],
        "sharing_matrix": {
            "guests": GUESTS,
            "pages": [[5, 8000, 8000], [8000, 5, 8000], [8000, 8000, 0]],
        },
        "shadow": {"captures": 4, "mib_hashed": 300.0, "capture_mib_per_s": 500.0},
        "verdict": {"status": "failed", "exit_status": 1, "failed": ["line 13: x"], "error": None},
    }
    res = Results(run=run)
    for i in range(10):
        t = float(i)
        res.add_sample(
            t, "fill", "kernel", {"pages_shared": 10 * i, "pages_sharing": 2400 * i}, 1 << 30
        )
        if i % 3 == 0:
            res.add_sample(
                t, "fill", "model", {"pages_shared": 10 * i, "pages_sharing": 2400 * i}, None
            )
        for g in GUESTS:
            res.add_guest(
                t, "fill", "kernel", g, {"ksm_merging_pages": 800 * i, "ksm_rmap_items": 9000}
            )
            res.add_guest(
                t, "fill", "model", g, {"ksm_merging_pages": 790 * i, "ksm_rmap_items": 9000}
            )
    return res


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_round_trip(tmp_path: Path) -> None:
    res = synthetic()
    write_results(tmp_path, res)
    back = read_results(tmp_path)
    assert back.run == res.run
    assert back.samples[0] == res.samples[0]
    assert back.samples[3]["pages_sharing"] == 4800
    assert back.samples[3]["ksm_zero_pages"] is None  # empty cell, not 0
    assert back.samples[3]["saved_bytes"] == 4800 * 4096
    assert back.guests == res.guests


def test_render_makes_every_plot_and_the_report(tmp_path: Path) -> None:
    res = synthetic()
    write_results(tmp_path, res)
    report = render(tmp_path)
    for name in ("counters.png", "convergence.png", "guests.png", "heatmap.png"):
        w, h = png_size(tmp_path / name)
        assert w >= 300 and h >= 300, name
        assert (tmp_path / name).stat().st_size > 5000, name
        assert f"]({name})" in report.read_text()
    text = report.read_text()
    assert "**Verdict: FAILED** (exit status 1)" in text
    assert "| pages_sharing | 24000 | 24000 | 24000 | 24000 | 0 |" in text
    # general_profit is bytes: shown as a size, as are its differences (here 100 x 64 bytes)
    assert "| general_profit | 93.2 MiB | - | 93.2 MiB | - | 6.2 KiB |" in text
    assert "| FAIL | `pages_sharing >= 1` | 13 | 0 |" in text
    assert "| 100 | 12.5 | - | 1.5 | - |" in text
    assert "- verify: clean" in text


def test_plots_without_data_are_left_out(tmp_path: Path) -> None:
    res = synthetic()
    res.run["phases"][0]["waits"] = []
    res.run["phases"][0]["sweeps"] = []
    del res.run["sharing_matrix"]
    res.guests.clear()
    write_results(tmp_path, res)
    text = render(tmp_path).read_text()
    assert (tmp_path / "counters.png").exists()
    for name in ("convergence.png", "guests.png", "heatmap.png"):
        assert not (tmp_path / name).exists()
        assert name not in text


def test_compare_lists_changes(tmp_path: Path) -> None:
    a = synthetic()
    b = synthetic(sharing_end=23000, sweep_seconds=20.0)
    b.run["run_id"] = "r2"
    b.run["phases"][0]["expectations"][1]["status"] = "passed"
    out = compare(a, b)
    assert out.startswith("# compare r1 -> r2\n")
    assert "| kernel.pages_sharing | 24,000 | 23,000 | -1,000 (-4.2%) |" in out
    assert "| `pages_sharing >= 1` | failed | passed | verdict changed |" in out
    assert "| pages_to_scan=100 seconds | 12.5 | 20.0 | +7.5 (+60.0%) |" in out
    c = copy.deepcopy(b)
    c.run["phases"][0]["counters"]["kernel"]["end"]["pages_sharing"] = 24000 - 124400
    assert "| kernel.pages_sharing | 24,000 | -100,400 | -124,400 (-518.3%) |" in compare(a, c)
    assert "model.pages_sharing" not in out
    assert "No differences" not in out
    # Within the tolerance the counter change is hidden.
    assert "kernel.pages_sharing" not in compare(a, b, tolerance=0.05)


def test_compare_identical() -> None:
    a = synthetic()
    assert compare(a, copy.deepcopy(a)).endswith(
        "No differences in counters, expectations, convergence times or sweeps.\n"
    )


def test_cli_report_and_compare(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    da, db = tmp_path / "a", tmp_path / "b"
    write_results(da, synthetic())
    write_results(db, synthetic(sharing_end=1))
    assert main(["report", str(da)]) == 0
    assert capsys.readouterr().out == f"report: {da / 'report.md'}\n"
    assert main(["compare", str(da), str(db)]) == 0
    assert "| kernel.pages_sharing | 24,000 | 1 |" in capsys.readouterr().out
    # A verdict that got worse (passed -> error) fails the command, so a nightly job fails.
    worse = synthetic()
    worse.run["verdict"] = {"status": "error", "exit_status": 2}
    write_results(tmp_path / "c", worse)
    assert main(["compare", str(da), str(tmp_path / "c")]) == 1
    assert capsys.readouterr().err == "verdict got worse: failed -> error\n"
    assert main(["compare", str(tmp_path / "c"), str(da)]) == 0  # better is fine
    assert main(["report", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"ksmh: error: {tmp_path / 'missing'}: no such directory\n")
    (tmp_path / "empty").mkdir()
    assert main(["compare", str(da), str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"ksmh: error: {tmp_path / 'empty'}: no run.json here\n"
        "  hint: pass a results/<run-id> directory written by `ksmh run`\n"
    )
