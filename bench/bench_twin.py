#!/usr/bin/env python3
"""Benchmark: what the exporter's live twin costs. Prints figures, asserts nothing.

    sudo .venv/bin/python bench/bench_twin.py [--guests 4] [--seconds 180] [--no-thp] [--json FILE]

Boots the guests (harness.guests.Fleet, transparent huge pages on as in a playbook's fleet;
`--no-thp` turns them off), fills each with 48 MiB of identical and 32 MiB of mixed memory,
turns KSM on at the kernel's default knobs
(pages_to_scan 100, sleep_millisecs 20: a full scan takes half a minute here), waits until
the twin (harness.twin.live, as `ksmh export --twin` runs it: its own thread, 5% budget)
and the kernel agree, then measures over `--seconds`:

  twin CPU share     the twin thread's CPU time / wall time (capture, replay, model scans),
                     against the budget and against ksmd's own CPU share in the same window;
  per sync           captures, capture seconds, pages captured and pages read (the rest were
                     unchanged KSM pages), model scans made and skipped;
  memory per page    a second twin built under tracemalloc, one sync: its peak and current
                     Python memory over the pages it tracks (model + shadow keys + capture).

Holds the host KSM lock and restores every knob; the guests are stopped at the end.
`--json FILE` writes the figures as JSON too ('-': JSON on stdout instead of the table).
"""

from __future__ import annotations

import argparse
import sys
import time
import tracemalloc

from benchlib import Figures, add_json_option

from harness import procfs
from harness.guests.fleet import Fleet
from harness.guests.spec import FleetSpec
from harness.ksm.lock import ksm_lock
from harness.ksm.sysfs import SysfsBackend
from harness.twin.live import Twin

DEFAULTS = {"pages_to_scan": 100, "sleep_millisecs": 20, "smart_scan": 1, "use_zero_pages": 0,
            "max_page_sharing": 256}  # fmt: skip


def ksmd_seconds() -> float:
    pid = procfs.ksmd_pid()
    return procfs.task_cpu_seconds(pid) if pid else 0.0


def wait_agreement(twin: Twin, timeout: float) -> float:
    """Until the twin's last sync has the kernel's pages_sharing within 1% and steady."""
    t0 = time.monotonic()
    steady = 0
    last = None
    while time.monotonic() - t0 < timeout:
        time.sleep(2)
        kernel = twin.last_kernel()
        _stats, models = twin.snapshot()
        delta = models[0][1].get("pages_sharing")
        sharing = kernel.get("pages_sharing", 0)
        if sharing and delta is not None and abs(delta) <= 0.01 * sharing and sharing == last:
            steady += 1
            if steady >= 3:
                return time.monotonic() - t0
        else:
            steady = 0
        last = sharing
    return float("nan")


def measure(args: argparse.Namespace, k: SysfsBackend, fig: Figures) -> None:
    k.write_tunables(run=2, force=True)
    k.apply({**DEFAULTS, "run": 0})
    fig.note(
        f"{args.guests} guests x {args.memory} MiB, each filling 48 MiB identical + 32 MiB "
        f"mixed; THP {'off' if args.no_thp else 'on'}; the kernel's default knobs "
        "(pages_to_scan 100, sleep_millisecs 20)"
    )
    with Fleet(FleetSpec(args.guests, args.memory, thp=not args.no_thp), progress=False) as fleet:
        fleet.run("fill", "a", "48M", "byte:0x5a").raise_if_failed()
        fleet.run("fill", "b", "32M", "mix:7:common=50,zero=10").raise_if_failed()
        twin = Twin(k, cpu_budget=args.budget)
        twin.start()
        try:
            k.write_tunables(run=1)
            fig.add("seconds_to_agree", round(wait_agreement(twin, 900), 1), "s (within 1%)")
            s0, c0, t0 = twin.snapshot()[0], ksmd_seconds(), time.monotonic()
            time.sleep(args.seconds)
            s1, c1, wall = twin.snapshot()[0], ksmd_seconds(), time.monotonic() - t0
        finally:
            twin.stop()
        twin_cpu, ksmd_cpu = s1.cpu_seconds - s0.cpu_seconds, c1 - c0
        fig.add("window_seconds", round(wall, 1), "s")
        fig.add("twin_cpu_percent", round(100 * twin_cpu / wall, 2), "% of one core")
        fig.add("twin_cpu_budget_percent", round(100 * args.budget, 2), "% of one core")
        fig.add("ksmd_cpu_percent", round(100 * ksmd_cpu / wall, 2), "% of one core (measured)")
        fig.add("ratio", round(twin_cpu / ksmd_cpu, 3) if ksmd_cpu else None, "twin CPU / ksmd CPU")
        fig.add("syncs", s1.captures - s0.captures)
        fig.add("kernel_full_scans", s1.scans_followed - s0.scans_followed)
        fig.add("model_scans_skipped", s1.scans_skipped - s0.scans_skipped)
        fig.add("capture_every_full_scans", s1.every)
        fig.add("last_capture_seconds", round(s1.capture_seconds, 3), "s")
        fig.add("pages_captured", s1.captured_pages, "pages")
        fig.add("pages_read_last_capture", s1.pages_read, "pages")
        fig.add("twin_errors", s1.errors)
        # Memory: a fresh twin under tracemalloc, one sync (capture, replay, warm-up scans).
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        twin2 = Twin(k, cpu_budget=1.0)
        twin2.step()
        current, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        pages = twin2.stats.captured_pages
        fig.add("tracked_pages", pages, "pages")
        per = round((current - base) / pages, 1) if pages else None
        fig.add("memory_bytes_per_page", per, "B (Python heap, after one sync)")
        peak_per = round((peak - base) / pages, 1) if pages else None
        fig.add("peak_memory_bytes_per_page", peak_per, "B (during the sync)")
        del twin2
    k.write_tunables(run=2, force=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--guests", type=int, default=4)
    ap.add_argument("--memory", type=int, default=256, help="MiB per guest")
    ap.add_argument("--seconds", type=float, default=180.0, help="measurement window")
    ap.add_argument("--budget", type=float, default=0.05, help="the twin's CPU budget (0.05)")
    ap.add_argument("--no-thp", action="store_true", help="guests without transparent huge pages")
    add_json_option(ap)
    args = ap.parse_args()
    fig = Figures("live twin cost (bench/bench_twin.py)", args)
    k = SysfsBackend()
    with ksm_lock(), k.saved():
        measure(args, k, fig)
    fig.finish(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
