"""`ksmh status | set | recover | watch | export`: read and drive one KSM backend."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from harness.errors import HarnessError
from harness.ksm.backend import BackendBase
from harness.ksm.select import BACKENDS, open_backend
from harness.ksm.sysfs import KSM_ROOT, PROC_ROOT, SysfsBackend
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

    p = sub.add_parser(
        "recover",
        help="undo what crashed runs left: their guests, leftover merges, original KSM knobs",
        description="Reads every run journal whose owner is dead; never touches a live run's.",
    )
    p.set_defaults(func=cmd_recover)

    p = sub.add_parser("watch", parents=[common], help="refresh counters and rates live")
    p.add_argument(
        "--interval", type=float, default=1.0, help="seconds between refreshes (default 1)"
    )
    p.add_argument("--count", type=int, default=0, help="stop after N refreshes (0: forever)")
    p.set_defaults(func=cmd_watch)

    p = sub.add_parser("export", parents=[common], help="serve Prometheus metrics")
    p.add_argument("--listen", default="127.0.0.1:9712", help="HOST:PORT (default loopback)")
    p.add_argument("--pid", type=int, action="append", default=[], help="also export this PID")
    p.add_argument("--host", default=None, help="value of the host label (default hostname)")
    from harness.twin.export import add_export_options

    add_export_options(p)  # --twin, --what-if: models beside the kernel (harness.twin)
    p.set_defaults(func=cmd_export)


def _backend(args: argparse.Namespace, need_write: bool = False) -> BackendBase:
    return open_backend(
        args.backend, need_write=need_write, root=args.sysfs_root, proc=args.proc_root
    )


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


def format_status(s: dict[str, Any]) -> str:
    width = 36
    lines = [f"KSM ({s['source']}, page size {s['page_size']})", "", "counters"]
    lines += [f"  {k:<{width}}{v}" for k, v in s["counters"].items()]
    lines += ["", "tunables"]
    lines += [f"  {k:<{width}}{v}" for k, v in s["tunables"].items()]
    d = s["derived"]
    ratio = "-" if d["sharing_ratio"] is None else f"{d['sharing_ratio']:.2f}"
    waste = "-" if d["waste_ratio"] is None else f"{d['waste_ratio']:.2f}"
    lines += [
        "",
        "derived",
        f"  {'saved':<{width}}{human_bytes(d['saved_bytes'])}",
        f"  {'sharing ratio (sharing/shared)':<{width}}{ratio}",
        f"  {'waste ratio (unshared/sharing)':<{width}}{waste}",
    ]
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> int:
    s = status_dict(_backend(args))
    print(json.dumps(s, indent=2) if args.json else format_status(s))
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
    values = parse_assignments(args.assignments)
    backend = _backend(args)
    if isinstance(backend, SysfsBackend) and backend.root == KSM_ROOT:
        # A crashed run's knobs would otherwise come back over ours at its recovery.
        _recover_quietly(backend)
    backend.write_tunables(force=args.force, **values)
    now = backend.read_tunables()
    print(" ".join(f"{k}={getattr(now, k)}" for k in values))
    return 0


def _recover_quietly(backend: SysfsBackend) -> None:
    from harness.recovery import recover_first

    try:
        recover_first(lambda s: print(f"ksmh: {s}", file=sys.stderr), proc=backend.proc)
    except HarnessError as exc:
        if os.geteuid() == 0:
            raise
        del exc  # not root: the write below fails with its own clear message


def cmd_recover(args: argparse.Namespace) -> int:
    from harness.journal import JOURNAL_DIR
    from harness.recovery import recover

    lines = recover()
    for line in lines:
        print(line)
    if not lines:
        print(f"nothing to recover (no journal of a dead run in {JOURNAL_DIR})")
    return 1 if any(line.startswith("could not") for line in lines) else 0


MAX_INTERVAL = 86400.0


def _watch_frame(prev: Counters | None, cur: Counters, dt: float, src: str) -> str:
    rows = [
        f"KSM ({src})   {time.strftime('%H:%M:%S')}",
        f"  {'counter':<22}{'value':>14}{'/s':>12}",
    ]
    for k, v in cur.present().items():
        before = getattr(prev, k) if prev is not None else None
        rate = "" if before is None or dt <= 0 else f"{(v - before) / dt:.1f}"
        rows.append(f"  {k:<22}{v:>14}{rate:>12}")
    return "\n".join(rows)


def cmd_watch(args: argparse.Namespace) -> int:
    if not (0 < args.interval <= MAX_INTERVAL):  # also refuses nan; inf would never refresh
        raise HarnessError(
            f"--interval {args.interval}: must be a number of seconds above 0",
            hint=f"e.g. --interval 1 (at most {MAX_INTERVAL})",
        )
    if args.count < 0:
        raise HarnessError(
            f"--count {args.count}: must be 0 (forever) or more", hint="e.g. --count 10"
        )
    backend = _backend(args)
    tty = sys.stdout.isatty()
    prev: Counters | None = None
    last = time.monotonic()
    n = 0
    while True:
        cur = backend.read_counters()
        now = time.monotonic()
        frame = _watch_frame(prev, cur, now - last, backend.source)
        print("\x1b[H\x1b[2J" + frame if tty else frame + "\n", flush=True)
        prev, last, n = cur, now, n + 1
        if args.count and n >= args.count:
            return 0
        time.sleep(args.interval)


def _comm(proc: Path, pid: int) -> str:
    try:
        return (proc / str(pid) / "comm").read_text().strip()
    except OSError:
        return str(pid)


def cmd_export(args: argparse.Namespace) -> int:
    from harness.exporter import ExportTarget, parse_listen, serve
    from harness.twin.export import export_twin, wants_twin

    if wants_twin(args):
        return export_twin(args)
    backend = _backend(args)
    pids = {pid: _comm(args.proc_root, pid) for pid in args.pid}
    target = ExportTarget(backend=backend, watch=(lambda: pids) if pids else None)
    if isinstance(backend, SysfsBackend):
        from harness.sides.kernel import KernelSide

        target.cpu = KernelSide(backend, args.proc_root).ksmd_cpu_seconds
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
