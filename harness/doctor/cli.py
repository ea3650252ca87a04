"""`ksmh doctor [--pid PID ...|--guests RUN_ID|--all] [--json]`."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness import procfs
from harness.doctor.paths import KSM_ROOT, NODE_ROOT, THP_ROOT
from harness.errors import HarnessError
from harness.units import parse_size

if TYPE_CHECKING:
    from harness.doctor.facts import Options

MAX_WINDOW = 3600.0


def register(sub: Any) -> None:
    p = sub.add_parser(
        "doctor",
        help="explain why memory does or does not merge, and who shares merged pages",
        description="Examines processes (default: every process KSM scans, plus every VMM) "
        "and the host; prints findings with evidence and a fix. Exit 0: nothing needs "
        "action; 1: some finding does; 2: error. Read-only.",
    )
    which = p.add_mutually_exclusive_group()
    which.add_argument("--pid", type=int, action="append", default=[], help="examine PID")
    which.add_argument("--guests", metavar="RUN_ID", help="examine a fleet's guests")
    which.add_argument("--all", action="store_true", help="every KSM user and VMM (default)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument(
        "--window",
        type=float,
        default=2.0,
        help="seconds to watch the KSM knobs for writers (default 2)",
    )
    p.add_argument(
        "--label",
        action="append",
        default=[],
        metavar="TARGETS:KEY=VALUE",
        help="label processes or guests, e.g. 0-1:tenant=acme",
    )
    p.add_argument("--group-by", metavar="KEY", help="group the sharing matrix by this label")
    p.add_argument(
        "--min-vma", default="1MiB", help="key ignored mappings from this size on (default 1MiB)"
    )
    p.add_argument(
        "--max-read", default="64GiB", help="read at most this much memory in all (default 64GiB)"
    )
    p.add_argument(
        "--max-scan-time",
        type=float,
        default=600.0,
        help="a longer full scan is a finding (seconds, default 600)",
    )
    p.add_argument(
        "--no-content",
        action="store_true",
        help="do not read page contents (fast; no would-merge counts)",
    )
    for name, default in (
        ("--sysfs-root", KSM_ROOT),
        ("--proc-root", procfs.PROC),
        ("--thp-root", THP_ROOT),
        ("--node-root", NODE_ROOT),
    ):
        p.add_argument(name, type=Path, default=default, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_doctor)  # fmt: skip


def _options(args: argparse.Namespace) -> Options:
    from harness.doctor.facts import Options

    if not 0 <= args.window <= MAX_WINDOW:  # also refuses nan
        raise HarnessError(
            f"--window {args.window:g}: must be 0..{MAX_WINDOW:g} seconds", hint="e.g. --window 2"
        )
    if not args.max_scan_time > 0:
        raise HarnessError(
            f"--max-scan-time {args.max_scan_time:g}: must be above 0", hint="e.g. 600"
        )
    return Options(
        window=args.window,
        min_vma=parse_size(args.min_vma, what="--min-vma"),
        max_read=parse_size(args.max_read, what="--max-read"),
        max_scan_seconds=args.max_scan_time,
        content=not args.no_content,
    )


def select_all(proc: Path) -> dict[int, str]:
    from harness.doctor.groups import is_vmm, process_name

    me = os.getpid()
    pids = {u.pid for u in procfs.ksm_users(proc, exclude={me})}
    pids |= {pid for pid in procfs.pids(proc) if pid != me and is_vmm(pid, proc)}
    return {pid: process_name(pid, proc) for pid in sorted(pids)}


def select_guests(run_id: str) -> tuple[dict[int, str], dict[int, int]]:
    from harness.guests.fleet import Fleet

    fleet = Fleet.attach(run_id)
    index = {g.spec.name: g.spec.index for g in fleet.guests}
    pids = fleet.pids()
    if not pids:
        raise HarnessError(f"fleet {run_id} has no running guest", hint="see `ksmh fleet list`")
    return {pid: name for name, pid in pids.items()}, {pid: index[n] for n, pid in pids.items()}


def select_pids(pids: list[int], proc: Path) -> dict[int, str]:
    from harness.doctor.groups import process_name

    out = {}
    for pid in pids:
        if not procfs.pid_alive(pid, proc):
            raise HarnessError(f"--pid {pid}: no such process", hint="see ps, or use --all")
        out[pid] = process_name(pid, proc)
    return out


def targets(args: argparse.Namespace) -> tuple[dict[int, str], str, dict[int, int] | None]:
    """(pid -> name, selection text, pid -> guest index or None)."""
    if args.pid:
        return select_pids(args.pid, args.proc_root), "pids", None
    if args.guests:
        found, index = select_guests(args.guests)
        return found, f"guests {args.guests}", index
    return select_all(args.proc_root), "all", None


def cmd_doctor(args: argparse.Namespace) -> int:
    from harness.doctor.diagnosis import diagnose
    from harness.doctor.groups import group_names, parse_label
    from harness.doctor.render import as_json, render_text

    options = _options(args)
    labels = [parse_label(t) for t in args.label]
    found, selection, index = targets(args)
    groups = group_names(found, labels, args.group_by, index) if args.group_by else None
    d = diagnose(
        found,
        selection,
        options,
        group_of=groups,
        ksm_root=args.sysfs_root,
        proc=args.proc_root,
        thp_root=args.thp_root,
        node_root=args.node_root,
    )
    if args.json:
        print(json.dumps(as_json(d.analysis, d.findings), indent=2, default=str))
    else:
        print(render_text(d.analysis, d.findings))
    return d.exit_status
