# ruff: noqa: E501  (tables are wider than 100 columns)
"""Plain text when stdout is no terminal (asserted exactly), rich when it is (forced here):
the fleet list, the hosts check table and the boot progress bar."""

from __future__ import annotations

import io
from typing import Any

from rich.console import Console

from harness.console import BootProgress, plain_table, plural, terminal
from harness.guests.cli import format_runs, runs_table
from harness.remote.check import HostCheck, check_table, format_table

RUNS: list[dict[str, Any]] = [
    {
        "run_id": "r1",
        "backend": "qemu",
        "accel": "tcg",
        "memory_mib": 128,
        "guests": [
            {"name": "ksmh-r1-g00", "state": "ready", "pid": 4242},
            {"name": "ksmh-r1-g01", "state": "failed", "pid": None},
        ],
    },
    {"run_id": "r2", "error": "fleet run 'r2' is unreadable"},
]
LEFTOVERS = [{"name": "ksmh-rx-g00", "backend": "qemu", "pid": 77}]


def forced() -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, force_terminal=True, width=120, color_system=None), buf


def cells(text: str) -> set[tuple[str, ...]]:
    """The cells of every body row of the rich tables in text."""
    return {
        tuple(c.strip() for c in ln.strip().strip("│").split("│"))
        for ln in text.splitlines()
        if ln.startswith("│")
    }


def test_plain_table_aligns_and_strips() -> None:
    assert plain_table([("A", "BB", "C"), ("long", "x", "")], indent="> ") == [
        "> A     BB  C",
        "> long  x",
    ]
    assert plain_table([]) == []


def test_no_terminal_means_plain() -> None:
    assert terminal(io.StringIO()) is None


def test_fleet_list_plain_exactly() -> None:
    assert format_runs(RUNS, LEFTOVERS) == (
        "run r1  qemu  accel tcg  128 MiB  1/2 running\n"
        "  ksmh-r1-g00  ready    pid 4242\n"
        "  ksmh-r1-g01  failed   pid -\n"
        "run r2: fleet run 'r2' is unreadable\n"
        "leftover ksmh-rx-g00 (qemu, pid 77): remove with `ksmh fleet down --all`"
    )
    assert format_runs([], []) == "no fleets"


def test_fleet_list_rich_table() -> None:
    console, buf = forced()
    console.print(runs_table(RUNS))
    assert cells(buf.getvalue()) == {
        ("r1", "qemu", "tcg", "128 MiB", "ksmh-r1-g00", "ready", "4242"),
        ("r1", "qemu", "tcg", "128 MiB", "ksmh-r1-g01", "failed", "-"),
        ("r2", "-", "-", "-", "-", "fleet run 'r2' is unreadable", "-"),
    }


def test_hosts_check_plain_and_rich() -> None:
    ok = HostCheck("alpha", "127.0.0.1:2201", reachable=True, kernel="6.18", ksm_present=True,
                   ksm_writable=True, ksm_run="0", kvm="rw", missing_packages=[],
                   harness="absent", exporter="down")  # fmt: skip
    bad = HostCheck("charlie", "127.0.0.1:2203", problems=["charlie: cannot connect"])
    assert format_table([ok, bad]).splitlines() == [
        "HOST     ADDRESS         SSH   KERNEL  KSM    WRITABLE  KVM  PACKAGES  HARNESS  EXPORTER  USABLE",
        "alpha    127.0.0.1:2201  ok    6.18    run=0  yes       rw   ok        absent   down      yes",
        "charlie  127.0.0.1:2203  FAIL  -       -      ?         -    -         -        -         NO",
        "charlie: cannot connect",
    ]  # fmt: skip
    console, buf = forced()
    console.print(check_table([ok, bad]))
    assert cells(buf.getvalue()) == {
        ("alpha", "127.0.0.1:2201", "ok", "6.18", "run=0", "yes", "rw", "ok", "absent", "down", "yes"),
        ("charlie", "127.0.0.1:2203", "FAIL", "-", "-", "?", "-", "-", "-", "-", "NO"),
    }  # fmt: skip


def test_boot_progress_draws_on_a_terminal_only() -> None:
    console, buf = forced()
    with BootProgress(3, "booting r9", console=console) as progress:
        for ok in (True, False, True):
            progress.step(ok)
    assert (progress.done, progress.failed) == (3, 1)
    final = buf.getvalue().rsplit("\r", 1)[-1]
    assert "booting r9" in final and "3/3" in final and "1 failed" in final
    silent = BootProgress(2, "booting r8", enabled=False, console=forced()[0])
    with silent:
        silent.step(True)
    assert silent.done == 1 and silent._bar is None
    # stderr is no terminal under pytest: nothing is drawn unless asked for.
    assert BootProgress(2, "booting r7")._bar is None


def test_counted_nouns() -> None:
    assert [plural(n, "guest") for n in (0, 1, 2)] == ["0 guests", "1 guest", "2 guests"]
    assert plural(1, "process") == "1 process" and plural(3, "process") == "3 processes"
    assert plural(2, "series", "series") == "2 series"
