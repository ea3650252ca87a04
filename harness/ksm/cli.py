"""`ksmh status | set | watch | export`: read and drive one KSM backend from the shell.

`status` and `watch` draw rich tables (watch: a live screen) when stdout is a terminal, and
print the plain text below otherwise (a pipe, a file, a test): that text is their interface.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from harness.console import rich_table, terminal
from harness.errors import HarnessError
from harness.ksm.backend import BackendBase
from harness.ksm.select import BACKENDS, open_backend
from harness.ksm.sysfs import KSM_ROOT, PROC_ROOT
from harness.ksm.types import Counters, derive
from harness.units import human_bytes


def register(sub: Any) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--backend",
        choices=BACKENDS,
        default="auto",
        help="kernel: /sys/kernel/mm/ksm; model: ksm_model; auto: kernel if present (default)",
    )
    # Hidden: point the kernel backend at another tree (tests, chroots).
    common.add_argument("--sysfs-root", type=Path, default=KSM_ROOT, help=argparse.SUPPRESS)
    common.add_argument("--proc-root", type=Path, default=PROC_ROOT, help=argparse.SUPPRESS)

    p = sub.add_parser("status", parents=[common], help="show KSM counters, tunables and savings")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("set", parents=[common], help="set KSM tunables: ksmh set run=1 ...")
    p.add_argument("assignments", nargs="+", metavar="KEY=VALUE")
    p.add_argument("--force", action="store_true", help="run=2 even if memory looks short")
    p.set_defaults(func=cmd_set)

    p = sub.add_parser("watch", parents=[common], help="refresh counters and rates live")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
    p.add_argument("--count", type=int, default=0, help="stop after N refreshes (0: forever)")
    p.set_defaults(func=cmd_watch)

    p = sub.add_parser("export", parents=[common], help="serve Prometheus metrics")
    p.add_argument("--listen", default="127.0.0.1:9712", help="HOST:PORT (default loopback)")
    p.add_argument("--pid", type=int, action="append", default=[], help="also export this PID")
    p.add_argument("--host", default=None, help="value of the host label (default hostname)")
    p.set_defaults(func=cmd_export)


def _backend(args: argparse.Namespace) -> BackendBase:
    return open_backend(args.backend, root=args.sysfs_root, proc=args.proc_root)


def status_dict(backend: BackendBase) -> dict[str, Any]:
    counters = backend.read_counters()
    tunables = backend.read_tunables()
    d = derive(counters, backend.page_size)
    return {
        "source": backend.source,
        "page_size": backend.page_size,
        "counters": counters.present(),
        "tunables": tunables.present(),
        "derived": {
            "saved_bytes": d.saved_bytes,
            "sharing_ratio": d.sharing_ratio,
            "waste_ratio": d.waste_ratio,
        },
    }


def _derived_rows(d: dict[str, Any]) -> list[tuple[str, str]]:
    ratio = "-" if d["sharing_ratio"] is None else f"{d['sharing_ratio']:.2f}"
    waste = "-" if d["waste_ratio"] is None else f"{d['waste_ratio']:.2f}"
    return [
        ("saved", human_bytes(d["saved_bytes"])),
        ("sharing ratio (sharing/shared)", ratio),
        ("waste ratio (unshared/sharing)", waste),
    ]


def format_status(s: dict[str, Any]) -> str:
    """`ksmh status` as plain text: counters, tunables, derived figures."""
    width = 36
    lines = [f"KSM ({s['source']}, page size {s['page_size']})", "", "counters"]
    lines += [f"  {k:<{width}}{v}" for k, v in s["counters"].items()]
    lines += ["", "tunables"]
    lines += [f"  {k:<{width}}{v}" for k, v in s["tunables"].items()]
    lines += ["", "derived"]
    lines += [f"  {k:<{width}}{v}" for k, v in _derived_rows(s["derived"])]
    return "\n".join(lines)


def status_tables(s: dict[str, Any]) -> list[Any]:
    """`ksmh status` on a terminal: a heading, then three rich tables."""
    return [
        f"KSM ({s['source']}, page size {s['page_size']})",
        rich_table(("counter", "value"), [(k, str(v)) for k, v in s["counters"].items()],
                   title="counters", right=(1,)),
        rich_table(("tunable", "value"), [(k, str(v)) for k, v in s["tunables"].items()],
                   title="tunables", right=(1,)),
        rich_table(("derived", "value"), _derived_rows(s["derived"]), right=(1,)),
    ]  # fmt: skip


def cmd_status(args: argparse.Namespace) -> int:
    s = status_dict(_backend(args))
    console = terminal()
    if args.json:
        print(json.dumps(s, indent=2))
    elif console is not None:
        for table in status_tables(s):
            console.print(table)
    else:
        print(format_status(s))
    return 0


def parse_assignments(items: list[str]) -> dict[str, str]:
    values: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise HarnessError(f"expected KEY=VALUE, got {item!r}", hint="e.g. ksmh set run=1")
        values[key.strip()] = value.strip()
    return values


def cmd_set(args: argparse.Namespace) -> int:
    backend = _backend(args)
    values = parse_assignments(args.assignments)
    backend.write_tunables(force=args.force, **values)
    now = backend.read_tunables()
    print(" ".join(f"{k}={getattr(now, k)}" for k in values))
    return 0


def watch_rows(prev: Counters | None, cur: Counters, dt: float) -> list[tuple[str, str, str]]:
    """(counter, value, per-second change since prev) for every counter the source has."""
    rows = []
    for k, v in cur.present().items():
        before = getattr(prev, k) if prev is not None else None
        rate = "" if before is None or dt <= 0 else f"{(v - before) / dt:.1f}"
        rows.append((k, str(v), rate))
    return rows


def watch_frame(rows: list[tuple[str, str, str]], src: str, clock: str) -> str:
    """One refresh of `ksmh watch` as plain text (stdout is not a terminal)."""
    lines = [f"KSM ({src})   {clock}", f"  {'counter':<22}{'value':>14}{'/s':>12}"]
    lines += [f"  {k:<22}{v:>14}{rate:>12}" for k, v, rate in rows]
    return "\n".join(lines)


def watch_table(rows: list[tuple[str, str, str]], src: str, clock: str) -> Any:
    """One refresh of `ksmh watch` on a terminal (a rich table, redrawn in place)."""
    return rich_table(("counter", "value", "/s"), rows, title=f"KSM ({src})   {clock}",
                      right=(1, 2))  # fmt: skip


def cmd_watch(args: argparse.Namespace) -> int:
    if args.interval <= 0:
        raise HarnessError("--interval must be positive")
    backend = _backend(args)
    console = terminal()
    if console is None:
        for rows in _refreshes(backend, args):
            print(watch_frame(rows, backend.source, time.strftime("%H:%M:%S")) + "\n", flush=True)
        return 0
    from rich.live import Live

    with Live(console=console, auto_refresh=False, screen=False) as live:
        for rows in _refreshes(backend, args):
            table = watch_table(rows, backend.source, time.strftime("%H:%M:%S"))
            live.update(table, refresh=True)
    return 0


def _refreshes(
    backend: BackendBase, args: argparse.Namespace
) -> Iterator[list[tuple[str, str, str]]]:
    """Counter rows every --interval seconds, --count times (0: until interrupted)."""
    prev: Counters | None = None
    last = time.monotonic()
    n = 0
    while True:
        cur = backend.read_counters()
        now = time.monotonic()
        yield watch_rows(prev, cur, now - last)
        prev, last, n = cur, now, n + 1
        if args.count and n >= args.count:
            return
        time.sleep(args.interval)


def _comm(proc: Path, pid: int) -> str:
    try:
        return (proc / str(pid) / "comm").read_text().strip()
    except OSError:
        return str(pid)


def cmd_export(args: argparse.Namespace) -> int:
    from harness.exporter import ExportTarget, parse_listen, serve

    backend = _backend(args)
    pids = {pid: _comm(args.proc_root, pid) for pid in args.pid}
    target = ExportTarget(backend=backend, watch=(lambda: pids) if pids else None)
    if args.host:
        target.host = args.host
    server, _thread = serve([target], args.listen)
    host, port = parse_listen(args.listen)
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}/metrics"
    print(f"ksmh: exporting {backend.source} KSM metrics on {url}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0
    finally:
        server.shutdown()
