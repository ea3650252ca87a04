"""`ksmh status | set | recover | watch | export`: read and drive one KSM backend.

`status` and `watch` draw rich tables (watch: a live screen) when stdout is a terminal, and
print the plain text below otherwise (a pipe, a file, a test): that text is their interface.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from harness.console import rich_table, terminal
from harness.errors import HarnessError
from harness.ksm.backend import BackendBase
from harness.ksm.select import BACKENDS, open_backend
from harness.ksm.sysfs import KSM_ROOT, PROC_ROOT, SysfsBackend
from harness.ksm.types import Counters, Tunables, derive
from harness.paths import is_root
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
    p.add_argument(
        "--sharing",
        action="store_true",
        help="also export ksm_cross_group_shared_pages{a,b} (reads page tables; root)",
    )
    p.add_argument(
        "--sharing-interval",
        type=float,
        default=60.0,
        help="seconds between two measurements of the sharing matrix (default 60)",
    )
    p.add_argument("--label", action="append", default=[], metavar="TARGETS:KEY=VALUE",
                   help="label processes (PIDs or names) for --group-by")  # fmt: skip
    p.add_argument("--group-by", metavar="KEY", help="group the sharing matrix by this label")
    from harness.twin.export import add_export_options

    add_export_options(p)  # --twin, --what-if: models beside the kernel (harness.twin)
    p.set_defaults(func=cmd_export)


def _backend(args: argparse.Namespace, need_write: bool = False) -> BackendBase:
    return open_backend(
        args.backend, need_write=need_write, root=args.sysfs_root, proc=args.proc_root
    )


def staleness(backend: BackendBase, counters: Counters, tunables: Tunables) -> dict[str, Any]:
    """Whether the counters still describe memory that exists.

    With ksmd stopped (run=0) the counters stay as its last scan left them: when the
    processes whose pages were merged exit, nothing recounts, so "saved 158 MiB" can describe
    memory that is gone. That is stale when no process is registered with KSM any more;
    without root the registered processes cannot all be seen, so it may be (stale: None).
    `{"stale": True | False | None, "note": text or None}`.
    """
    merged = (counters.pages_shared or 0) + (counters.ksm_zero_pages or 0)
    if tunables.run != 0 or not merged or backend.source != "kernel":
        return {"stale": False, "note": None}
    users = backend.registered()
    if users:
        return {"stale": False, "note": None}
    fix = "`ksmh set run=1` lets ksmd recount (run=2 unmerges)"
    if users is None:
        return {
            "stale": None,
            "note": "ksmd is stopped (run=0): the counters are frozen at its last scan and may "
            "describe memory that is gone (not root: the processes registered with KSM "
            f"cannot all be seen); {fix}",
        }
    return {
        "stale": True,
        "note": "the counters are stale: ksmd is stopped (run=0) and no process is registered "
        f"with KSM, so they describe memory that may be gone; {fix}",
    }


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
        **staleness(backend, counters, tunables),
    }


def _derived_rows(s: dict[str, Any]) -> list[tuple[str, str]]:
    """The derived figures for people: sizes, not raw bytes (the counters keep the bytes)."""
    d = s["derived"]
    ratio = "-" if d["sharing_ratio"] is None else f"{d['sharing_ratio']:.2f}"
    waste = "-" if d["waste_ratio"] is None else f"{d['waste_ratio']:.2f}"
    mark = {True: " (stale)", None: " (may be stale)"}.get(s.get("stale"), "")
    rows = [("saved", human_bytes(d["saved_bytes"]) + mark)]
    if s["counters"].get("general_profit") is not None:
        rows.append(("profit (general_profit)", human_bytes(s["counters"]["general_profit"])))
    rows.append(("sharing ratio (sharing/shared)", ratio))
    rows.append(("waste ratio (unshared/sharing)", waste))
    return rows


def format_status(s: dict[str, Any]) -> str:
    """`ksmh status` as plain text: counters, tunables, derived figures."""
    width = 36
    lines = [f"KSM ({s['source']}, page size {s['page_size']})", ""]
    if s.get("note"):
        lines += [f"note: {s['note']}", ""]
    lines += ["counters"]
    lines += [f"  {k:<{width}}{v}" for k, v in s["counters"].items()]
    lines += ["", "tunables"]
    lines += [f"  {k:<{width}}{v}" for k, v in s["tunables"].items()]
    lines += ["", "derived"]
    lines += [f"  {k:<{width}}{v}" for k, v in _derived_rows(s)]
    return "\n".join(lines)


def status_tables(s: dict[str, Any]) -> list[Any]:
    """`ksmh status` on a terminal: a heading, then three rich tables."""
    from rich.text import Text

    note = [Text(f"note: {s['note']}", style="bold yellow")] if s.get("note") else []
    return [
        f"KSM ({s['source']}, page size {s['page_size']})",
        *note,
        rich_table(("counter", "value"), [(k, str(v)) for k, v in s["counters"].items()],
                   title="counters", right=(1,)),
        rich_table(("tunable", "value"), [(k, str(v)) for k, v in s["tunables"].items()],
                   title="tunables", right=(1,)),
        rich_table(("derived", "value"), _derived_rows(s),
                   right=(1,)),
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
    """Undo dead runs before a manual change, when no run holds the lock (a live run recovers
    on its own, and must not have its knobs changed under it unannounced)."""
    from harness.ksm.lock import DEFAULT_LOCK, ksm_lock
    from harness.recovery import recover_first

    try:
        with ksm_lock(DEFAULT_LOCK, timeout=0):
            recover_first(lambda s: print(f"ksmh: {s}", file=sys.stderr), proc=backend.proc)
    except HarnessError as exc:
        if not is_root():
            return  # not root: the write that follows fails with its own clear message
        if "holds" in exc.message:
            print(f"ksmh: warning: a ksm-harness run is in progress ({exc.message}); "
                  "this change will disturb it", file=sys.stderr)  # fmt: skip
            return
        raise


def cmd_recover(args: argparse.Namespace) -> int:
    from harness.journal import JOURNAL_DIR
    from harness.ksm.lock import DEFAULT_LOCK, ksm_lock
    from harness.recovery import recover

    if not is_root():
        raise HarnessError(
            "ksmh recover undoes what root's runs left (their journals, guests and KSM knobs): "
            "it needs root",
            hint="sudo ksmh recover; your own guests: `ksmh fleet list`, "
            "`ksmh fleet down --run ID`",
        )
    # Under the lock: a run starting meanwhile must not save our half-restored knobs as its
    # baseline (it recovers first itself, once it holds the lock).
    print(f"ksmh: taking the host KSM lock {DEFAULT_LOCK}", file=sys.stderr)
    with ksm_lock(DEFAULT_LOCK):
        lines = recover()
    for line in lines:
        print(line)
    if not lines:
        print(f"nothing to recover (no journal of a dead run in {JOURNAL_DIR})")
    return 1 if any(line.startswith("could not") for line in lines) else 0


MAX_INTERVAL = 86400.0


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


def _sharing(args: argparse.Namespace) -> Any:
    """The opt-in sharing matrix of `ksmh export --sharing`, checked before serving."""
    if not args.sharing:
        if args.label or args.group_by:
            raise HarnessError("--label and --group-by need --sharing", hint="add --sharing")
        return None
    from harness.doctor.exposure import SharingProbe
    from harness.doctor.groups import parse_label

    if not 1.0 <= args.sharing_interval <= 86400.0:  # also refuses nan
        raise HarnessError(
            f"--sharing-interval {args.sharing_interval:g}: must be 1..86400 seconds",
            hint="e.g. --sharing-interval 60",
        )
    labels = [parse_label(t) for t in args.label]
    if args.group_by is not None and not any(lb.key == args.group_by for lb in labels):
        raise HarnessError(f"--group-by {args.group_by!r}: no --label gives it",
                           hint="e.g. --label 1234,5678:tenant=acme --group-by tenant")  # fmt: skip
    return SharingProbe(args.proc_root, labels, args.group_by, args.sharing_interval)


def cmd_export(args: argparse.Namespace) -> int:
    from harness.exporter import ExportTarget, parse_listen, serve
    from harness.twin.export import export_twin, wants_twin

    sharing = _sharing(args)
    pids = {pid: _comm(args.proc_root, pid) for pid in args.pid}
    watch = _watched(pids, args.proc_root) if pids else None
    if wants_twin(args):
        return export_twin(args, watch, sharing)
    backend = _backend(args)
    target = ExportTarget(backend=backend, watch=watch)
    target.sharing = sharing
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
    finally:  # Ctrl-C: `ksmh: interrupted`, exit status 130, as for `ksmh watch`
        server.shutdown()


def _watched(pids: dict[int, str], proc: Path) -> Callable[[], dict[int, str]]:
    """The --pid processes, for each scrape. A process that does not exist (at start, or
    once it has exited) is said once on stderr; its series are left out and each scrape
    counts it in ksm_exporter_read_errors_total."""
    told: set[int] = set()

    def watch() -> dict[int, str]:
        for pid, name in pids.items():
            if pid not in told and not (proc / str(pid)).exists():
                told.add(pid)
                what = "no such process" if name == str(pid) else f"{name} has exited"
                print(
                    f"ksmh: --pid {pid}: {what}; its series are left out "
                    "(ksm_exporter_read_errors_total counts each scrape)",
                    file=sys.stderr,
                    flush=True,
                )
        return pids

    watch()  # a mistyped PID is said at start, not at the first scrape
    return watch
