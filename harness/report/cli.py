"""`ksmh trend RESULTS_DIR...`: nightly runs as series, regression flags, trend.md + trend.json."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from harness.console import plural
from harness.errors import HarnessError
from harness.report.regression import Floors


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 2:
        raise argparse.ArgumentTypeError(f"expected an integer >= 2, got {text!r}")
    return value


def register(sub: Any) -> None:
    p = sub.add_parser(
        "trend",
        help="trend of nightly runs per playbook/host/kernel; flag regressions (exit 1)",
        description="Exit status: 0 nothing flagged, 1 some metric flagged (listed), 2 error.",
    )
    p.add_argument(
        "dirs",
        nargs="+",
        type=Path,
        metavar="RESULTS_DIR",
        help="directories searched for run.json (any depth)",
    )
    p.add_argument("--playbook", default=None, help="only runs of this playbook (its name)")
    p.add_argument(
        "--out",
        type=Path,
        default=Path("results/trend"),
        help="where trend.md, trend.json and the plots go (default results/trend)",
    )
    p.add_argument(
        "--window",
        type=_positive,
        default=10,
        help="previous nights a night is judged against (default 10)",
    )
    p.add_argument(
        "--min-nights",
        type=_positive,
        default=5,
        help="nights needed before anything is flagged (default 5)",
    )
    p.add_argument(
        "--floor",
        action="append",
        default=[],
        metavar="FAMILY=REL[:ABS]",
        help="replace a metric family's noise floor, e.g. converge_seconds=0.3:1 on a quiet "
        "dedicated host (default floors: README, 'Nightly series')",
    )
    p.set_defaults(func=cmd_trend)


def parse_floors(items: list[str]) -> dict[str, Floors]:
    """['converge_seconds=0.3:1', 'saved_bytes=0.02'] -> {family: Floors}; HarnessError if bad."""
    from harness.report.trend import FAMILY

    out: dict[str, Floors] = {}
    for item in items:
        name, _, value = item.partition("=")
        rel_text, _, abs_text = value.partition(":")
        try:
            rel = float(rel_text)
            absolute = float(abs_text) if abs_text else FAMILY[name].floors.abs
        except (ValueError, KeyError):
            rel = absolute = -1.0
        if name not in FAMILY or not rel >= 0 or not absolute >= 0:
            raise HarnessError(
                f"--floor {item!r}: expected FAMILY=REL[:ABS] with numbers >= 0",
                hint="families: " + ", ".join(FAMILY),
            )
        out[name] = Floors(rel=rel, abs=absolute)
    return out


def cmd_trend(args: argparse.Namespace) -> int:
    from harness.report.regression import Rule
    from harness.report.trend import build_trend, flag_doc, with_floors
    from harness.report.trend_write import write_trend

    if args.min_nights > args.window:
        raise HarnessError(
            f"--min-nights {args.min_nights} is larger than --window {args.window}",
            hint="the window must hold at least min-nights nights",
        )
    rule = Rule(window=args.window, min_nights=args.min_nights)
    families = with_floors(parse_floors(args.floor))
    trend = build_trend(args.dirs, args.playbook, rule, families)
    try:
        path = write_trend(trend, args.dirs, args.out)
    except OSError as exc:
        raise HarnessError(f"cannot write to {args.out}: {exc.strerror or exc}") from None
    from harness.report.trend_markdown import fmt

    for g in trend.groups:
        for m in g.flags:
            f = flag_doc(g, m)
            print(
                f"FLAGGED {g.playbook}/{g.host}/{g.kernel_release}: {f['metric']} since "
                f"{f['since']} ({plural(f['nights'], 'night')}): "
                f"{fmt(f['baseline_median'], f['unit'])} -> "
                f"{fmt(f['latest'], f['unit'])} ({f['direction']})"
            )
    for file, why in trend.skipped:
        print(f"skipped {file}: {why}")
    print(
        f"trend: {path} ({plural(trend.runs_read, 'run')}, {len(trend.groups)} series, "
        f"{trend.flagged} flagged)"
    )
    return 1 if trend.flagged else 0
