#!/usr/bin/env python3
"""Benchmark: shadow capture, and capture + replay + model scan, against the real ksmd's scan
rate over the same memory in one run, and the runner's own CPU use while the guests idle.
Prints figures; asserts nothing.

    sudo .venv/bin/python bench/bench_shadow.py [--guests 4] [--memory 256] [--fill 64] \
        [--profile] [--json FILE]

Part 1 boots a fleet (TCG here, THP off as the runner does), fills half of each guest's fill
size with identical pages and half with random ones, then measures, on the same memory:
  capture   /proc/PID/pagemap + /proc/PID/mem read and keyed per page (harness.pagekey):
            MiB/s of present memory hashed (--profile: where its time goes, by cProfile)
  replay    first replay (every page written into the model) and a no-change replay
  model     the first two full model scans, then one full scan of the converged model
  pipeline  capture + no-change replay + one converged model scan: present pages/s
  ksmd      the real ksmd with pages_to_scan=20000, sleep_millisecs=0, smart_scan=0: pages/s
            over the first two scans and over already-merged memory (steady)
  ratio     pipeline pages/s / ksmd steady pages/s (the target is >= 1.0)
  twin      after ksmd merged: the twin's incremental capture (harness.twin.capture), which
            reuses the keys of unchanged KSM pages, and its pipeline pages/s and ratio
Part 2 runs a playbook through the Runner and reads its CPU time (all threads) during a
`wait: {seconds: N}` step with ksmd merging and the guests idle.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from benchlib import Figures, add_json_option

from harness.guests.fleet import Fleet
from harness.guests.spec import FleetSpec
from harness.ksm.lock import ksm_lock
from harness.ksm.model import ModelBackend
from harness.ksm.sysfs import SysfsBackend
from harness.ksm.types import PAGE_SIZE
from harness.playbook.runner import Runner, RunOptions
from harness.playbook.schema import loads_playbook
from harness.shadow import ProcessCapture
from harness.sides.model import ModelSide
from harness.twin.capture import IncrementalCapture

MiB = 2**20


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def ksmd_rate(k: SysfsBackend, scans: int) -> tuple[float, float]:
    """(pages/s, seconds) for `scans` full scans at the current settings."""
    c0 = k.read_counters()
    t0 = time.monotonic()
    k.wait_full_scans(scans, 600)
    dt = time.monotonic() - t0
    c1 = k.read_counters()
    return ((c1.pages_scanned or 0) - (c0.pages_scanned or 0)) / dt, dt


def profiled(title: str, run: Callable[[], object]) -> str:
    """cProfile of `run()`: the functions taking the most time, as text."""
    prof = cProfile.Profile()
    prof.enable()
    run()
    prof.disable()
    out = io.StringIO(f"{title}\n")
    out.seek(0, io.SEEK_END)
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(14)
    return out.getvalue()


def part1(args: argparse.Namespace, k: SysfsBackend, fig: Figures) -> str:
    """Part 1 (see the module docstring); returns the capture's profile text (or "")."""
    k.write_tunables(run=2, force=True)
    knobs = {"pages_to_scan": 20000, "sleep_millisecs": 0, "smart_scan": 0, "run": 0}
    k.apply(knobs)
    half = args.fill // 2
    fig.note(
        f"{args.guests} guests x {args.memory} MiB, each filling {half} MiB identical + "
        f"{half} MiB random; THP off"
    )
    with Fleet(FleetSpec(args.guests, args.memory, thp=False), progress=False) as fleet:
        fleet.run("fill", "a", f"{half}M", "byte:0x5a").raise_if_failed()
        fleet.run("fill", "b", f"{half}M", "random:7").raise_if_failed()
        side = ModelSide(ModelBackend(profile="host"), include_others=False)
        side.watch({pid: name for name, pid in fleet.pids().items()})
        side.apply(knobs)
        t0, c0 = time.perf_counter(), cpu()
        caps = side.shadow.capture(side.targets())
        cap_s, cap_cpu = time.perf_counter() - t0, cpu() - c0
        nbytes = sum(c.bytes_read for c in caps)
        present = sum(c.present for c in caps)
        fig.add("capture.mib_read", round(nbytes / MiB), "MiB")
        fig.add("capture.pages_kept", present, "pages")
        fig.add("capture.seconds", round(cap_s, 3), "s")
        fig.add("capture.cpu_seconds", round(cap_cpu, 3), "s")
        fig.add("capture_mib_s", round(nbytes / MiB / cap_s, 1), "MiB/s")
        profile = ""
        if args.profile:
            profile = profiled("one more capture", lambda: side.shadow.capture(side.targets()))
        rep1 = side.shadow.replay(caps)
        rep2 = side.shadow.replay(side.shadow.capture(side.targets()))
        fig.add("replay.first.pages", rep1.pages_written, "pages")
        fig.add("replay.first_pages_s", round(rep1.pages_written / rep1.seconds), "pages/s")
        fig.add("replay.unchanged.pages", rep2.pages_written, "pages")
        fig.add("replay.unchanged.seconds", round(rep2.seconds, 3), "s")
        side.apply({"run": 1})
        kernel = side.model.kernel
        t0 = time.perf_counter()
        kernel.run_until(full_scans=2)
        first2 = time.perf_counter() - t0
        scanned0 = side.counters()["pages_scanned"]
        t0 = time.perf_counter()
        kernel.run_until(full_scans=3)
        steady = time.perf_counter() - t0
        model_pps = (side.counters()["pages_scanned"] - scanned0) / steady
        fig.add("model.first_two_pages_s", round(scanned0 / first2), "pages/s")
        fig.add("model.steady_pages_s", round(model_pps), "pages/s")
        fig.add("model.steady_scan_seconds", round(steady, 3), "s")
        if args.profile:
            profile += profiled("one more model scan", lambda: kernel.run_until(full_scans=4))
        pipeline = present / (cap_s + rep2.seconds + steady)
        fig.add("pipeline_pages_s", round(pipeline), "pages/s (capture + replay + scan)")
        # The real ksmd over the same memory, in the same run: what the ratios are against.
        k.write_tunables(run=1)
        rate2, _ = ksmd_rate(k, 2)
        rate, _ = ksmd_rate(k, 3)
        fig.add("ksmd.first_two_pages_s", round(rate2), "pages/s")
        fig.add("ksmd_pages_s", round(rate), "pages/s (steady: merged memory)")
        fig.add("ksmd_mib_s", round(rate * PAGE_SIZE / MiB, 1), "MiB/s")
        fig.add("capture_ratio", round(present / cap_s / rate, 3), "capture pages/s / ksmd")
        fig.add("model_scan_ratio", round(model_pps / rate, 3), "model scan / ksmd scan")
        fig.add("ratio", round(pipeline / rate, 3), "pipeline / ksmd (target >= 1.0)")
        twin(side, caps, steady, rate, fig)
        k.write_tunables(run=2, force=True)
    return profile


def twin(
    side: ModelSide, shadow_caps: list[ProcessCapture], scan_s: float, rate: float, fig: Figures
) -> None:
    """The twin's incremental capture of the merged memory: a first capture reads it all, the
    next reuses the keys of KSM pages still at their frame (ksmd stays running)."""
    inc = IncrementalCapture()
    inc.capture(side.targets())
    read0, kept0 = inc.pages_read, inc.pages_kept
    t0 = time.perf_counter()
    caps = inc.capture(side.targets())
    cap_s = time.perf_counter() - t0
    present = sum(c.present for c in caps)
    rep = side.shadow.replay(caps)
    fig.add("twin.capture.pages", present, "pages")
    fig.add("twin.capture.pages_read", inc.pages_read - read0, "pages")
    fig.add("twin.capture.pages_reused", inc.pages_kept - kept0, "pages (unchanged KSM pages)")
    fig.add("twin.capture.seconds", round(cap_s, 3), "s")
    fig.add("twin.replay.pages", rep.pages_written, "pages (written into the model)")
    fig.add("twin.replay.seconds", round(rep.seconds, 3), "s")
    pipeline = present / (cap_s + rep.seconds + scan_s)
    fig.add("twin.pipeline_pages_s", round(pipeline), "pages/s (capture + replay + scan)")
    fig.add("twin.ratio", round(pipeline / rate, 3), "twin pipeline / ksmd")


IDLE = """
name: bench-idle
fleet: {{count: {guests}, memory_mib: {memory}}}
ksm: {{pages_to_scan: 2000, sleep_millisecs: 10}}
sample_interval: 1.0
phases:
  - name: idle
    steps:
      - fill: {{region: a, size: {fill}MiB, pattern: "byte:0x5a"}}
      - ksm: {{run: 1}}
      - wait: {{converged: {{tolerance: 1%, timeout: 300}}}}
      - wait: {{seconds: {idle}}}
"""


def part2(args: argparse.Namespace, fig: Figures) -> None:
    marks: dict[str, float] = {}

    def echo(line: str) -> None:
        now = (time.monotonic(), cpu())
        if f"wait {args.idle:g} s" in line:
            marks["t0"], marks["c0"] = now
        elif "t0" in marks and "t1" not in marks and "waited" in line:
            marks["t1"], marks["c1"] = now  # the idle wait is over; the sync follows
        elif "t1" in marks and "t2" not in marks and "sync (after wait" in line:
            marks["t2"], marks["c2"] = now

    pb = loads_playbook(IDLE.format(guests=args.guests, memory=args.memory, fill=args.fill,
                                    idle=args.idle))  # fmt: skip
    with tempfile.TemporaryDirectory() as out:
        c_start = cpu()
        t_start = time.monotonic()
        Runner(
            pb, RunOptions(out=Path(out), export="127.0.0.1:0", echo=echo, take_lock=False)
        ).run()
        total_cpu, total = cpu() - c_start, time.monotonic() - t_start
    idle_wall, idle_cpu = marks["t1"] - marks["t0"], marks["c1"] - marks["c0"]
    sync_wall, sync_cpu = marks["t2"] - marks["t1"], marks["c2"] - marks["c1"]
    fig.add("runner.idle_cpu_percent", round(100 * idle_cpu / idle_wall, 2), "% of one core")
    fig.add("runner.idle_seconds", round(idle_wall, 1), "s (sampler + exporter)")
    fig.add("runner.sync_after_idle_cpu_seconds", round(sync_cpu, 2), "s")
    fig.add("runner.sync_after_idle_seconds", round(sync_wall, 1), "s")
    fig.add("runner.whole_run_cpu_seconds", round(total_cpu, 1), "s")
    fig.add("runner.whole_run_seconds", round(total, 1), "s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--guests", type=int, default=4)
    ap.add_argument("--memory", type=int, default=256)
    ap.add_argument("--fill", type=int, default=64, help="MiB filled per guest")
    ap.add_argument("--idle", type=float, default=20.0, help="seconds of idle wait (part 2)")
    ap.add_argument("--skip-runner", action="store_true", help="part 1 only")
    ap.add_argument("--profile", action="store_true", help="print a cProfile of one capture")
    add_json_option(ap)
    args = ap.parse_args()
    fig = Figures("shadow capture vs ksmd (bench/bench_shadow.py)", args)
    k = SysfsBackend()
    with ksm_lock(), k.saved():
        profile = part1(args, k, fig)
        if not args.skip_runner:
            part2(args, fig)
    fig.finish(args.json)
    if profile and args.json != "-":
        print(profile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
