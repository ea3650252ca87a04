"""`ksmh monitoring config INVENTORY --out DIR`: write the Prometheus/Grafana files for a fleet."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

from harness.console import plural
from harness.errors import HarnessError

_DURATION = re.compile(r"^([0-9]+(ms|s|m|h|d|w|y))+$")


def _duration(text: str) -> str:
    if not _DURATION.match(text):
        raise argparse.ArgumentTypeError(f"not a Prometheus duration: {text!r} (e.g. 30s, 5m)")
    return text


def _target(text: str) -> str:
    """HOST:PORT of a scrape target (what prometheus.yml's static_configs take)."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or "/" in text or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r} (e.g. 127.0.0.1:9091)")
    return text


def register(sub: Any) -> None:
    mon = sub.add_parser("monitoring", help="Prometheus config, alert rules, Grafana dashboard")
    msub = mon.add_subparsers(dest="monitoring_command", metavar="ACTION")
    msub.required = True
    p = msub.add_parser(
        "config",
        help="write prometheus.yml, file_sd targets, rules and a dashboard for an inventory",
    )
    p.add_argument("inventory", type=Path, help="inventory YAML")
    p.add_argument("--out", type=Path, required=True, help="directory to write into")
    p.add_argument(
        "--scrape-interval", type=_duration, default="15s", help="Prometheus scrape_interval"
    )
    p.add_argument(
        "--evaluation-interval",
        type=_duration,
        default="15s",
        help="Prometheus evaluation_interval (how often rules run)",
    )
    p.add_argument("--rate-window", type=_duration, default="5m", help="window of rate() rules")
    p.add_argument(
        "--stall-window", type=_duration, default="10m", help="flat full_scans this long = stalled"
    )
    p.add_argument(
        "--for",
        dest="for_",
        type=_duration,
        default=None,
        help="one for-duration for all alerts (default: each alert's own, 5m to 30m)",
    )
    p.add_argument("--waste-ratio", type=float, default=10.0, help="unshared/sharing alert level")
    p.add_argument("--volatile-share", type=float, default=0.5, help="volatile share alert level")
    p.add_argument("--model-tolerance", type=int, default=16, help="pages of model delta allowed")
    p.add_argument(
        "--divergence-ratio",
        type=float,
        default=0.05,
        help="live twin: relative |kernel - model| that counts as divergence (0.05)",
    )
    p.add_argument(
        "--divergence-pages", type=int, default=256, help="... and at least this many pages"
    )
    p.add_argument(
        "--allow-loopback",
        action="store_true",
        help="write the config even if remote hosts' exporters listen only on loopback "
        "(their targets would then be the Prometheus machine itself)",
    )
    p.add_argument(
        "--pushgateway",
        type=_target,
        default=None,
        metavar="HOST:PORT",
        help="also scrape this Pushgateway (job ksm_nightly, honor_labels) for `ksmh run --push`",
    )
    p.set_defaults(func=cmd_config)


def cmd_config(args: argparse.Namespace) -> int:
    from harness.monitoring.config import ScrapeSettings, loopback_targets, write_config
    from harness.monitoring.rules import RuleSettings
    from harness.remote.inventory import load_inventory

    inv = load_inventory(args.inventory)
    loopback = loopback_targets(inv)
    if loopback:
        problem = (
            f"{len(loopback)} of {plural(len(inv.hosts), 'host')} ({', '.join(loopback)}) "
            "have a remote "
            "address but an exporter on loopback: Prometheus would scrape itself for each"
        )
        hint = (
            "give them `exporter: {listen: ADDRESS:9712}` in the inventory (or 0.0.0.0:9712), "
            "or pass --allow-loopback"
        )
        if not args.allow_loopback:
            raise HarnessError(problem, hint=hint)
        print(f"ksmh: warning: {problem}", file=sys.stderr)
    rules = RuleSettings(
        rate_window=args.rate_window,
        stall_window=args.stall_window,
        waste_ratio=args.waste_ratio,
        volatile_share=args.volatile_share,
        model_tolerance=args.model_tolerance,
        divergence_ratio=args.divergence_ratio,
        divergence_pages=args.divergence_pages,
    ).with_for(args.for_)
    scrape = ScrapeSettings(args.scrape_interval, args.evaluation_interval)
    try:
        paths = write_config(inv, args.out, rules, scrape, args.pushgateway)
    except OSError as exc:
        raise HarnessError(f"cannot write to {args.out}: {exc.strerror}") from None
    for p in paths:
        print(p)
    hosts = plural(len(inv.hosts), "host")
    print(f"ksmh: {hosts}; run: prometheus --config.file={args.out}/prometheus.yml")
    return 0
