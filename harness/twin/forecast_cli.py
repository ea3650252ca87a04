"""`ksmh forecast`: what KSM would save, how fast and at what CPU cost (harness.twin.forecast)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from harness import units
from harness.console import plural
from harness.ksm.sysfs import KSM_ROOT, PROC_ROOT
from harness.units import human_bytes


def add_forecast_parser(sub: Any) -> None:
    p = sub.add_parser(
        "forecast",
        help="what KSM would save here, how fast and at what ksmd CPU, per knob set",
        description="Captures the memory KSM would scan once (works with KSM off, or absent: "
        "then QEMU's guest RAM), runs the model to convergence for each knob set on this "
        "host's calibration (`ksmh calibrate`), and recommends the cheapest knob set that "
        "reaches the target share of the savings within the budgets.",
    )
    who = p.add_mutually_exclusive_group()
    who.add_argument("--pid", type=int, action="append", default=[], help="a process (repeat)")
    who.add_argument("--qemu", action="store_true", help="every QEMU process")
    p.add_argument(
        "--knobs",
        action="extend",
        nargs="+",
        default=[],
        metavar="K=V,...",
        help="knob sets to compare (default: the current knobs and a pages_to_scan ladder)",
    )
    p.add_argument("--target", default="95%", help="share of the savings to reach (95%%)")
    p.add_argument("--within", default=None, metavar="DURATION", help="time budget, e.g. 10m")
    p.add_argument("--cpu", default=None, metavar="SHARE", help="ksmd CPU budget, e.g. 10%%")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--sysfs-root", type=Path, default=KSM_ROOT, help=argparse.SUPPRESS)
    p.add_argument("--proc-root", type=Path, default=PROC_ROOT, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_forecast)


def _fmt_s(v: float | None) -> str:
    if v is None:
        return "-"
    if v < 120:
        return f"{v:.1f} s"
    return f"{int(v // 60)}m{int(v % 60):02d}s"


def format_forecast(d: dict[str, Any]) -> str:
    lines = [
        f"captured {plural(len(d['targets']), 'process')}: "
        f"{plural(d['captured_pages'], 'page')} "
        f"({human_bytes(d['captured_bytes'])}) in {d['capture_seconds']:.1f} s",
    ]
    cal = d["calibration"]
    lines.append(
        f"calibration: kernel {cal['release']}, measured {cal['measured']}"
        if cal
        else "calibration: none for this kernel (`ksmh calibrate`): times and CPU are rough"
    )
    share = f"{100 * d['target_share']:g}%"
    head = ("knobs", "saved", "profit", "scans", f"to {share}", "cpu", "steady cpu")
    rows = [head]
    for r in d["results"]:
        steady = r["steady_cpu_share"]
        rows.append(
            (
                r["name"],
                human_bytes(r["saved_bytes"]),
                human_bytes(r["general_profit"]),
                str(r["full_scans_to_target"] if r["full_scans_to_target"] is not None else "-"),
                _fmt_s(r["seconds_to_target"]),
                _fmt_s(r["cpu_seconds_to_target"]),
                "-" if steady is None else f"{100 * steady:.2f}%",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    for row in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    if d["recommended"]:
        lines.append(f"recommended: {d['recommended']}")
    else:
        lines.append(f"no recommendation: {d['no_recommendation']}")
    return "\n".join(lines)


def cmd_forecast(args: argparse.Namespace) -> int:
    from harness.twin import calibration, knobs
    from harness.twin.forecast import MODEL_DEFAULTS, capture, default_knob_sets, forecast, targets

    target = units.share(args.target)
    within = units.duration(args.within) if args.within else None
    cpu = units.share(args.cpu, "--cpu") if args.cpu else None
    sets = [knobs.knob_set(k) for k in args.knobs]
    present = (args.sysfs_root / "run").exists()
    if present:
        from harness.ksm.sysfs import SysfsBackend

        base = SysfsBackend(root=args.sysfs_root, proc=args.proc_root).read_tunables().present()
    else:
        base = dict(MODEL_DEFAULTS)
    who = targets(args.proc_root, args.pid, args.qemu, ksm=present)
    cal = calibration.load()
    caps, seconds = capture(who, args.proc_root, fallback_hugepage=not present)
    result = forecast(
        caps,
        sets or default_knob_sets(base),
        cal or calibration.DEFAULT,
        calibrated=cal is not None,
        base=base,
        target=target,
        within=within,
        cpu=cpu,
        targets=who,
        capture_seconds=seconds,
    )
    d = result.as_dict()
    print(json.dumps(d, indent=2) if args.json else format_forecast(d))
    if cal is None and not args.json:
        print("ksmh: no calibration for this kernel: run `ksmh calibrate`", file=sys.stderr)
    return 0
