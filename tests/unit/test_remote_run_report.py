"""The fleet report (harness.report.fleet): per-host rows, totals, exit status, report.md."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from harness.report.fleet import (
    HostSummary,
    failure_lines,
    fleet_document,
    fleet_exit_status,
    format_table,
    summarize_host,
    write_fleet_report,
)
from harness.units import human_bytes


def _run(
    backend: str = "kernel", sharing: int = 4080, failed: tuple[str, ...] = ()
) -> dict[str, Any]:
    def end(n: int) -> dict[str, int]:
        return {"pages_shared": 16, "pages_sharing": n, "saved_bytes": n * 4096}

    counters = {"model": {"end": end(sharing - 2)}}
    if backend == "kernel":
        counters["kernel"] = {"end": end(sharing)}
    return {
        "run_id": f"r-{sharing}",
        "backend": backend,
        "accelerator": "tcg",
        "guests": [{}, {}],
        "duration_seconds": 30.25,
        "host": {"kernel_release": "6.18.1"},
        "phases": [
            {"counters": {"kernel": {"end": end(1)}}, "expectations": [{"status": "passed"}]},
            {
                "counters": counters,
                "expectations": [{"status": "passed"}, {"status": "skipped"}]
                + [{"status": "failed"}] * len(failed),
            },
            {"counters": {}, "expectations": []},  # a phase that recorded nothing
        ],
        "verdict": {"status": "failed" if failed else "passed", "failed": list(failed)},
    }


def test_summarize_takes_the_last_phase_end_of_the_primary_source() -> None:
    samples = [
        {"source": "kernel", "saved_bytes": 9000 * 4096},
        {"source": "model", "saved_bytes": 99999 * 4096},
        {"source": "kernel", "saved_bytes": None},
    ]
    h = summarize_host("a", 0, _run(), samples=samples, directory="/r/a/r-4080", address="x:22")
    assert h == HostSummary(
        host="a", status="passed", exit_status=0, address="x:22", run_id="r-4080",
        directory="/r/a/r-4080", backend="kernel", accelerator="tcg", kernel_release="6.18.1",
        guests=2, seconds=30.25, pages_shared=16, pages_sharing=4080,
        saved_bytes=4080 * 4096, peak_saved_bytes=9000 * 4096, model_saved_bytes=4078 * 4096,
        expectations={"passed": 2, "skipped": 1}, failed=[],
    )  # fmt: skip


def test_summarize_a_model_only_run_and_an_error_without_results() -> None:
    h = summarize_host("m", 0, _run(backend="model"))
    assert (h.backend, h.pages_sharing, h.saved_bytes) == ("model", 4078, 4078 * 4096)
    assert h.model_saved_bytes is None  # the model is the primary: no second column
    assert h.peak_saved_bytes == h.saved_bytes  # no samples: the end value
    e = summarize_host("c", 2, None, address="c:22", error="cannot connect", hint="is sshd up?")
    assert e == HostSummary("c", "error", 2, "c:22", "cannot connect", "is sshd up?")


def test_exit_status_error_beats_failure_beats_pass() -> None:
    ok = HostSummary("a", "passed", 0)
    bad = HostSummary("b", "failed", 1)
    err = HostSummary("c", "error", 2)
    assert fleet_exit_status([ok, ok]) == 0
    assert fleet_exit_status([ok, bad]) == 1
    assert fleet_exit_status([bad, err, ok]) == 2
    assert fleet_exit_status([]) == 0


def test_human_bytes() -> None:
    assert [human_bytes(n) for n in (None, 0, 1023, 1536, 4080 * 4096, 3 * 2**40, 5 * 2**50)] == [
        "-", "0 B", "1023 B", "1.5 KiB", "15.9 MiB", "3.0 TiB", "5120.0 TiB",
    ]  # fmt: skip


def _hosts() -> list[HostSummary]:
    return [
        summarize_host("alpha", 0, _run(sharing=4080), directory="/out/alpha/r-4080"),
        summarize_host(
            "bravo",
            1,
            _run(sharing=100, failed=("line 9: x >= 1 (0 >= 1)",)),
            directory="/out/bravo/r-100",
        ),
        summarize_host("charlie", 2, None, error="cannot connect to 127.0.0.1:1", hint="sshd?"),
    ]


def test_fleet_document_totals() -> None:
    doc = fleet_document("F", {"name": "tiny", "file": "t.yaml"}, _hosts(),
                         started="s", finished="f", options={"backend": "auto"})  # fmt: skip
    assert doc["exit_status"] == 2
    assert doc["totals"] == {
        "hosts": 3, "passed": 1, "failed": 1, "errored": 1,
        "saved_bytes": 4180 * 4096, "peak_saved_bytes": 4180 * 4096, "hosts_with_results": 2,
    }  # fmt: skip
    assert [h["host"] for h in doc["hosts"]] == ["alpha", "bravo", "charlie"]
    assert doc["options"] == {"backend": "auto"}
    assert json.loads(json.dumps(doc)) == doc  # JSON-clean


def test_terminal_table_and_failure_lines() -> None:
    assert format_table(_hosts()).splitlines() == [
        "host     verdict  exit  backend  accel  guests  pages_shared  pages_sharing  saved      "
        "peak saved  model saved  expectations  seconds",
        "alpha    PASSED   0     kernel   tcg    2       16            4080           15.9 MiB   "
        "15.9 MiB    15.9 MiB     2/3           30.2",
        "bravo    FAILED   1     kernel   tcg    2       16            100            400.0 KiB  "
        "400.0 KiB   392.0 KiB    2/4           30.2",
        "charlie  ERROR    2     -        -      -       -             -              -          "
        "-           -            -             -",
    ]
    assert failure_lines(_hosts()) == [
        "bravo: expectation failed: line 9: x >= 1 (0 >= 1)",
        "charlie: ERROR: cannot connect to 127.0.0.1:1 (hint: sshd?)",
    ]


def test_report_md_links_hosts_relative_and_lists_failures(tmp_path: Path) -> None:
    hosts = [
        summarize_host("alpha", 0, _run(), directory=str(tmp_path / "alpha" / "r-4080")),
        summarize_host("charlie", 2, None, error="cannot connect"),
    ]
    doc = fleet_document("F", {"name": "tiny", "file": "t.yaml"}, hosts, started="s", finished="f")
    path = write_fleet_report(tmp_path / "fleet-F", doc)
    assert json.loads((tmp_path / "fleet-F" / "fleet.json").read_text()) == doc
    text = path.read_text()
    assert text.startswith("# ksm-harness fleet run F: tiny\n\n**Verdict: ERROR** (exit status 2)"
                           ": 1 passed, 0 failed, 1 errored of 2 hosts\n")  # fmt: skip
    assert (
        "- **fleet-wide saved: 15.9 MiB** (16711680 bytes at the end of each host's run, "
        "1 host with results); sum of per-host peaks 15.9 MiB"
    ) in text
    rows = [
        ln for ln in text.splitlines() if ln.startswith("| alpha") or ln.startswith("| charlie")
    ]
    assert rows[0].endswith("| 2/3 | 30.2 | [r-4080](../alpha/r-4080/report.md) |")
    assert rows[1] == "| charlie | ERROR | 2 | - | - | - | - | - | - | - | - | - | - | - |"
    assert text.endswith("## Failures\n\n- charlie: ERROR: cannot connect\n")
