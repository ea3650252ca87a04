#!/usr/bin/env python3
"""Benchmark: what `ksmh doctor` and the sharing matrix cost per GiB. Prints figures only.

    sudo .venv/bin/python bench/bench_doctor.py [--gib 1] [--workers 2] [--json FILE]

Under the host KSM lock, with every knob restored: `--workers` child processes each hold
`--gib`/workers of mergeable memory (half identical across them, half unique), ksmd merges them
(pages_to_scan 20000, sleep 0), then it measures, wall and CPU:
  doctor          diagnose() with content keys (window 0): seconds per GiB keyed
  doctor (fast)   diagnose() with --no-content: smaps, ksm_stat and knobs only
  exposure        the exact sharing matrix (pagemap + kpageflags) over the same processes,
                  what `ksmh export --sharing` pays once per --sharing-interval
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

from benchlib import Figures, add_json_option

from harness.doctor.diagnosis import diagnose
from harness.doctor.exposure import exposure
from harness.doctor.facts import Options
from harness.ksm.lock import ksm_lock
from harness.ksm.sysfs import SysfsBackend
from harness.run import PIPE, spawn

WORKER = Path(__file__).resolve().parents[1] / "tests" / "integration" / "doctor_proc.py"
GiB = 2**30


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def timed(fig: Figures, key: str, gib: float, fn: object) -> object:
    t0, c0 = time.perf_counter(), cpu()
    out = fn()  # type: ignore[operator]
    wall, used = time.perf_counter() - t0, cpu() - c0
    fig.add(f"{key}.wall_s_per_gib", round(wall / gib, 3), "s/GiB")
    fig.add(f"{key}.cpu_s_per_gib", round(used / gib, 3), "s/GiB")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--workers", type=int, default=2)
    add_json_option(ap)
    args = ap.parse_args()
    fig = Figures("doctor", args)
    pages = int(args.gib * GiB / 4096 / args.workers)
    k = SysfsBackend()
    with ksm_lock(), k.saved():
        k.write_tunables(run=2, force=True)
        k.apply({"pages_to_scan": 20000, "sleep_millisecs": 0, "advisor_mode": "none",
                 "run": 0})  # fmt: skip
        procs = []
        try:
            for _ in range(args.workers):
                # Two buffers would need two workers; one "index" buffer is identical across
                # workers and unique within one: every page has exactly one twin per worker.
                p = spawn([sys.executable, str(WORKER), "--mergeable", "--pages", str(pages),
                           "--fill", "index:1"], stdin=PIPE, stdout=PIPE)  # fmt: skip
                procs.append(p)
                assert p.stdout is not None and p.stdout.readline().startswith(b"ready")
            k.apply({"run": 1})
            k.wait_full_scans(2, 600)
            k.apply({"run": 0})
            c = k.read_counters()
            fig.note(f"{args.workers} workers x {pages} pages; pages_shared {c.pages_shared}, "
                     f"pages_sharing {c.pages_sharing}")  # fmt: skip
            targets = {p.pid: f"w{i}" for i, p in enumerate(procs)}
            d = timed(fig, "doctor", args.gib,
                      lambda: diagnose(targets, "pids", Options(window=0)))  # fmt: skip
            keyed = d.analysis.facts.bytes_keyed / GiB  # type: ignore[attr-defined]
            fig.add("doctor.gib_keyed", round(keyed, 2), "GiB")
            fig.note(f"findings: {[f.kind for f in d.findings]}")  # type: ignore[attr-defined]
            timed(fig, "doctor_no_content", args.gib,
                  lambda: diagnose(targets, "pids", Options(window=0, content=False)))  # fmt: skip
            e = timed(fig, "exposure", args.gib, lambda: exposure(list(targets), targets))
            fig.note(f"matrix {e.pages}")  # type: ignore[attr-defined]
        finally:
            for p in procs:
                p.kill()
                p.wait()
            k.write_tunables(run=2, force=True)
    fig.finish(args.json)


if __name__ == "__main__":
    main()
