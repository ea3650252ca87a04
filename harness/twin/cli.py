"""`ksmh calibrate` and `ksmh forecast`; the twin options of `ksmh export` (add_export_options)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from harness.errors import HarnessError
from harness.ksm.sysfs import KSM_ROOT, PROC_ROOT

MIN_PAGES = 4096


def register(sub: Any) -> None:
    p = sub.add_parser(
        "calibrate",
        help="measure ksmd's CPU cost per page visit on this host (for forecasts and twins)",
        description="Runs the real ksmd over child processes' memory (about 90 s, as root, "
        "under the host KSM lock, every knob restored) and stores the costs per kernel "
        "release in /var/lib/ksm-harness/calibration/ (KSM_HARNESS_CALIBRATION_DIR).",
    )
    p.add_argument("--pages", type=int, default=32768, help="pages per experiment (32768)")
    p.add_argument("--show", action="store_true", help="print the stored calibration only")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--sysfs-root", type=Path, default=KSM_ROOT, help=argparse.SUPPRESS)
    p.add_argument("--proc-root", type=Path, default=PROC_ROOT, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_calibrate)

    from harness.twin.forecast_cli import add_forecast_parser

    add_forecast_parser(sub)


TERM_TEXT = {
    "first": "first visit (checksum only)",
    "unique": "unique visit (unmerged), fixed part",
    "unique_depth2": "  + x (unstable tree depth)^2",
    "merged": "visit of a merged page (or a skipped one)",
    "joined": "visit merging into a stable node or a pair",
    "chained": "visit merging into a stable_node_chain's dup",
    "dup": "chain dup examined by a stable tree walk",
    "batch": "batch",
}


def _print_calibration(cal: Any, as_json: bool, where: Path | None = None) -> None:
    if as_json:
        print(json.dumps(cal.summary(), indent=2))
        return
    head = f"ksmd calibration, kernel {cal.release} on {cal.host}, measured {cal.measured}"
    print(head + (f" ({where})" if where else ""))
    for term, text in TERM_TEXT.items():
        print(f"  {text:<46}{cal.costs[term] / 1e3:8.3f} us")
    print(f"  {'sleep':<16}msecs_to_jiffies + {cal.sleep_extra:.2f} jiffies (HZ {cal.hz}); "
          f"{cal.sleep0_ns / 1e3:.1f} us at sleep_millisecs 0")  # fmt: skip
    print(f"  fit error {100 * cal.fit_error:.1f}% (cpu from {cal.cpu_source})")


def cmd_calibrate(args: argparse.Namespace) -> int:
    from harness.twin import calibration

    if args.pages < MIN_PAGES:
        raise HarnessError(
            f"--pages {args.pages}: too few to measure", hint=f"use {MIN_PAGES} or more"
        )
    if args.show:
        cal = calibration.require()
        _print_calibration(cal, args.json, calibration.path_for())
        return 0
    from harness.ksm.lock import private_dir
    from harness.ksm.select import choose_backend
    from harness.ksm.sysfs import SysfsBackend
    from harness.recovery import run_session
    from harness.twin.calibrate import Calibrator

    backend = choose_backend(
        "kernel", need_write=True, root=args.sysfs_root, proc=args.proc_root
    ).backend
    assert isinstance(backend, SysfsBackend)
    private_dir(calibration.calibration_dir())  # fail before measuring, not after

    def echo(s: str) -> None:
        print(s, file=sys.stderr, flush=True)

    run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-calibrate"
    with run_session(backend, run_id, "calibrate", echo=lambda s: echo(f"ksmh: {s}")):
        cal = Calibrator(backend, pages=args.pages, echo=echo).run()
    path = calibration.save(cal)
    _print_calibration(cal, args.json, path)
    return 0
