"""`ksmh hosts check|prepare|stop-exporter INVENTORY`: the fleet commands.

Heavy imports (fabric, paramiko) happen inside the handlers so that `ksmh` stays quick to start
and the exporter on a fleet host (`python -m harness.cli export`) never needs them.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from pathlib import Path
from typing import Any


def register(sub: Any) -> None:
    hosts = sub.add_parser("hosts", help="check, prepare a fleet of hosts from an inventory")
    hsub = hosts.add_subparsers(dest="hosts_command", metavar="ACTION")
    hsub.required = True

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "inventory", type=Path, help="inventory YAML (playbooks/inventory.example.yaml)"
    )
    common.add_argument(
        "--prefix", default=None, help="install prefix on the hosts (overrides the inventory)"
    )
    common.add_argument(
        "--known-hosts", type=Path, default=None, help="known_hosts file (overrides the inventory)"
    )
    common.add_argument("--parallel", type=int, default=8, help="hosts handled at once (default 8)")
    common.add_argument("--json", action="store_true", help="machine-readable output")

    p = hsub.add_parser("check", parents=[common], help="is every host usable? one table")
    p.set_defaults(func=cmd_check)
    p = hsub.add_parser(
        "prepare", parents=[common], help="install ksm-harness and start the exporter on every host"
    )
    p.set_defaults(func=cmd_prepare)
    p = hsub.add_parser(
        "stop-exporter", parents=[common], help="stop the exporters prepare started"
    )
    p.set_defaults(func=cmd_stop_exporter)


def _inventory(args: argparse.Namespace) -> Any:
    from harness.remote.inventory import load_inventory

    return load_inventory(args.inventory).with_prefix(args.prefix)


def cmd_check(args: argparse.Namespace) -> int:
    """Exit 0 when every host is usable, 1 otherwise."""
    from harness.console import plural, terminal
    from harness.remote.check import check_host, check_table, format_table, problem_lines, rows
    from harness.remote.fleet import on_fleet

    inv = _inventory(args)
    result = on_fleet(inv, check_host, known_hosts=args.known_hosts, parallel=args.parallel)
    checks = rows(inv, result)
    console = terminal()
    if args.json:
        print(json.dumps([c.as_dict() for c in checks], indent=2))
    elif console is not None:
        console.print(check_table(checks))
        for line in problem_lines(checks):
            console.print(line, markup=False, highlight=False)
    else:
        print(format_table(checks))
    bad = [c.host for c in checks if not c.usable]
    if bad:
        print(
            f"ksmh: {len(bad)} of {plural(len(checks), 'host')} unusable: {', '.join(bad)}",
            file=sys.stderr,
        )
        return 1
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    """Exit 0 when every host is prepared, 1 when any failed (the others still are)."""
    from harness.remote.bundle import Bundle, build_bundle
    from harness.remote.fleet import on_fleet
    from harness.remote.prepare import prepare_host
    from harness.remote.ssh import Session

    inv = _inventory(args)
    cache: dict[str, Bundle] = {}
    lock = threading.Lock()

    def bundle_for(soabi: str) -> Bundle:
        with lock:  # build each ABI variant once, however many hosts share it
            if soabi not in cache:
                cache[soabi] = build_bundle(soabi)
            return cache[soabi]

    def one(s: Session) -> Any:
        return prepare_host(s, bundle_for)

    result = on_fleet(inv, one, known_hosts=args.known_hosts, parallel=args.parallel)
    if args.json:
        out = {
            name: (
                {
                    "ok": True,
                    "service": o.value.service,
                    "exporter_pid": o.value.exporter_pid,
                    "steps": o.value.steps,
                }
                if o.value is not None
                else {"ok": False, "error": str(o.error), "hint": o.error.hint if o.error else None}
            )
            for name, o in result.items()
        }
        print(json.dumps(out, indent=2))
    else:
        for name, o in result.items():
            if o.value is None:
                hint = f" (hint: {o.error.hint})" if o.error and o.error.hint else ""
                print(f"{name}: FAILED: {str(o.error).removeprefix(f'{name}: ')}{hint}")
                continue
            for step, outcome in o.value.steps:
                print(f"{name}: {step}: {outcome}")
    if result.failed:
        names = ", ".join(r.name for r in result.failed)
        print(
            f"ksmh: prepare failed on {len(result.failed)} of {len(result)}: {names}",
            file=sys.stderr,
        )
        return 1
    return 0


def cmd_stop_exporter(args: argparse.Namespace) -> int:
    from harness.remote.fleet import on_fleet
    from harness.remote.prepare import stop_exporter

    result = on_fleet(
        _inventory(args), stop_exporter, known_hosts=args.known_hosts, parallel=args.parallel
    )
    for name, o in result.items():
        what = (
            o.value if o.value is not None else f"FAILED: {str(o.error).removeprefix(name + ': ')}"
        )
        print(f"{name}: {what}")
    return 1 if result.failed else 0
