#!/usr/bin/env python3
"""Benchmark: what the exporter's live twin costs. Prints figures, asserts nothing.

    sudo .venv/bin/python bench/bench_twin.py [--guests 4] [--seconds 180] [--json FILE]

Boots the guests with `ksmh fleet up` (THP off, as the runner does), fills each with 48 MiB of
identical and 32 MiB of mixed memory, turns KSM on at the kernel's default knobs
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
import json
import os
import re
import socket
import sys
import time
import tracemalloc
from typing import Any

from harness import procfs
from harness.ksm.lock import ksm_lock
from harness.ksm.sysfs import SysfsBackend
from harness.playbook.host import set_thp_disable
from harness.run import run
from harness.twin.live import Twin

DEFAULTS = {"pages_to_scan": 100, "sleep_millisecs": 20, "smart_scan": 1, "use_zero_pages": 0,
            "max_page_sharing": 256}  # fmt: skip


def ksmh(*args: str) -> str:
    return run([sys.executable, "-m", "harness.cli", *args], timeout=900).stdout


def fleet_up(count: int, memory: int) -> str:
    set_thp_disable(True)  # inherited by QEMU
    try:
        out = ksmh("fleet", "up", "--count", str(count), "--memory", str(memory))
    finally:
        set_thp_disable(False)
    m = re.search(r"^run id: (\S+)$", out, re.M)
    if not m:
        raise SystemExit(f"fleet up printed no run id:\n{out}")
    return m.group(1)


def ksmd_seconds() -> float:
    pid = procfs.ksmd_pid()
    return procfs.task_cpu_seconds(pid) if pid else 0.0


def wait_agreement(twin: Twin, k: SysfsBackend, timeout: float) -> float:
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


def measure(args: argparse.Namespace, k: SysfsBackend, fig: dict[str, Any]) -> None:
    k.write_tunables(run=2, force=True)
    k.apply({**DEFAULTS, "run": 0})
    run_id = fleet_up(args.guests, args.memory)
    try:
        for region, size, pattern in (("a", "48M", "byte:0x5a"),
                                      ("b", "32M", "mix:7:common=50,zero=10")):  # fmt: skip
            ksmh("fleet", "exec", "--run", run_id, "--", "fill", region, size, pattern)
        twin = Twin(k, cpu_budget=args.budget)
        twin.start()
        k.write_tunables(run=1)
        fig["seconds_to_agree"] = round(wait_agreement(twin, k, 900), 1)
        s0, c0, t0 = twin.snapshot()[0], ksmd_seconds(), time.monotonic()
        time.sleep(args.seconds)
        s1, c1, wall = twin.snapshot()[0], ksmd_seconds(), time.monotonic() - t0
        twin.stop()
        twin_cpu = s1.cpu_seconds - s0.cpu_seconds
        ksmd_cpu = c1 - c0
        syncs = s1.captures - s0.captures
        fig.update(
            guests=args.guests,
            window_seconds=round(wall, 1),
            twin_cpu_share_percent=round(100 * twin_cpu / wall, 2),
            twin_cpu_budget_percent=100 * args.budget,
            ksmd_cpu_share_percent=round(100 * ksmd_cpu / wall, 2),
            twin_over_ksmd=round(twin_cpu / ksmd_cpu, 3) if ksmd_cpu else None,
            syncs=syncs,
            kernel_full_scans=s1.scans_followed - s0.scans_followed,
            model_scans_skipped=s1.scans_skipped - s0.scans_skipped,
            capture_every_full_scans=s1.every,
            last_capture_seconds=round(s1.capture_seconds, 3),
            pages_captured=s1.captured_pages,
            pages_read_last_capture=s1.pages_read,
            twin_errors=s1.errors,
        )
        # Memory: a fresh twin under tracemalloc, one sync (capture, replay, warm-up scans).
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        twin2 = Twin(k, cpu_budget=1.0)
        twin2.step()
        current, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        pages = twin2.stats.captured_pages
        fig.update(
            tracked_pages=pages,
            memory_bytes_per_page=round((current - base) / pages, 1) if pages else None,
            peak_memory_bytes_per_page=round((peak - base) / pages, 1) if pages else None,
        )
        del twin2
    finally:
        ksmh("fleet", "down", "--run", run_id)
        k.write_tunables(run=2, force=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--guests", type=int, default=4)
    ap.add_argument("--memory", type=int, default=256, help="MiB per guest")
    ap.add_argument("--seconds", type=float, default=180.0, help="measurement window")
    ap.add_argument("--budget", type=float, default=0.05, help="the twin's CPU budget (0.05)")
    ap.add_argument("--json", metavar="FILE", default=None, help="also write JSON ('-': stdout)")
    args = ap.parse_args()
    fig: dict[str, Any] = {}
    k = SysfsBackend()
    started = time.time()
    with ksm_lock(), k.saved():
        measure(args, k, fig)
    doc = {
        "benchmark": "twin",
        "host": socket.gethostname(),
        "kernel": os.uname().release,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "args": {k: v for k, v in vars(args).items() if k != "json"},
        "figures": fig,
    }
    if args.json == "-":
        print(json.dumps(doc, indent=2))
        return 0
    print("twin (ksmh export --twin) at the kernel's default knobs")
    for key, value in fig.items():
        print(f"  {key:<28} {value}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2)
        print(f"figures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
