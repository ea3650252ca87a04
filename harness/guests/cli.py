"""`ksmh fleet up | list | exec | down`: guest fleets from the shell.

`up` boots, prints the run id and returns with the guests running; `exec` sends agent commands
to a run's guests; `down` stops a run, or with --all every guest of ours, including leftovers of
crashed runs (found by name prefix among QEMU processes and libvirt domains).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from harness import procfs
from harness.console import plural, rich_table, terminal
from harness.errors import GuestBootTimeout, GuestError, HarnessError
from harness.fleet_result import FleetResult
from harness.guests.agent import AgentReply
from harness.guests.backend import RUNTIME_ROOT, Leftover
from harness.guests.fleet import Fleet, list_runs
from harness.guests.spec import NAME_PREFIX, FleetSpec, default_concurrency
from harness.kinds import AccelKind, GuestBackendKind, ImageKind, MachineKind, choices
from harness.signals import signals_as_interrupt


def register(sub: Any) -> None:
    fleet = sub.add_parser("fleet", help="boot, drive and remove fleets of guests")
    fleet.add_argument("--runtime-dir", type=Path, default=RUNTIME_ROOT, help=argparse.SUPPRESS)
    fsub = fleet.add_subparsers(dest="fleet_command", metavar="ACTION")
    fsub.required = True

    p = fsub.add_parser("up", help="boot N guests, print the run id, leave them running")
    p.add_argument("--count", type=int, required=True, help="number of guests")
    p.add_argument(
        "--memory",
        default="256",
        metavar="SIZE",
        help="RAM per guest: 256 (a bare number is MiB), 256M, 1GiB (default 256 MiB)",
    )
    p.add_argument(
        "--backend",
        choices=choices(GuestBackendKind),
        default=GuestBackendKind.QEMU.value,
        help="guest backend: a QEMU process per guest, or libvirt domains",
    )
    p.add_argument("--uri", default=None, help="libvirt URI (default qemu:///system)")
    p.add_argument(
        "--accel",
        choices=choices(AccelKind),
        default=AccelKind.AUTO.value,
        help="accelerator; auto: KVM if a probe guest runs under it here, else TCG",
    )
    p.add_argument(
        "--image",
        choices=choices(ImageKind),
        default=ImageKind.BUSYBOX.value,
        help="busybox (default, ~5 s boot) or debian (mmdebstrap + systemd, built on first use)",
    )
    p.add_argument("--vcpus", type=int, default=1, help="virtual CPUs per guest")
    p.add_argument(
        "--no-mem-merge", action="store_true", help="do not mark guest RAM mergeable for KSM"
    )
    p.add_argument(
        "--no-thp",
        action="store_true",
        help="start QEMU with transparent huge pages off (a playbook: fleet: {thp: false})",
    )
    p.add_argument(
        "--concurrency",
        type=int,
        default=None,
        help=f"guests booting at once (default: 2 per CPU, 2-16: {default_concurrency()} here)",
    )
    p.add_argument(
        "--machine",
        choices=choices(MachineKind),
        default=MachineKind.AUTO.value,
        help="QEMU machine: auto (= pc) or microvm (qemu backend, busybox image; idles costlier)",
    )
    p.add_argument(
        "--ready-timeout",
        type=float,
        default=180.0,
        metavar="S",
        help="seconds a guest may take to boot to its agent",
    )
    p.set_defaults(func=cmd_up)

    p = fsub.add_parser("list", help="show fleet runs and leftover guests")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_list)

    p = fsub.add_parser("exec", help="run an agent command: ksmh fleet exec -- fill a 32M zero")
    p.add_argument("--run", type=run_id, default=None, help="run id (default: the only run)")
    p.add_argument("--guests", default=None, metavar="SEL", help="names or indices: 0,2,5-7")
    p.add_argument(
        "--timeout", type=float, default=600.0, metavar="S", help="seconds per agent command"
    )
    p.add_argument("command", nargs=argparse.REMAINDER, help="agent command and arguments")
    p.set_defaults(func=cmd_exec)

    p = fsub.add_parser("down", help="stop a run's guests and remove its files")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--run", type=run_id, default=None, help="run id")
    group.add_argument(
        "--all",
        action="store_true",
        help="every run and leftover guest that is ours to stop: never one a live process "
        "(another run, an accelerator probe) still owns, nor a persistent libvirt domain",
    )
    p.set_defaults(func=cmd_down)


def _print_result(result: FleetResult[AgentReply]) -> int:
    for name, r in result.items():
        if r.ok:
            text = r.value.text if r.value is not None else "ok"
            print(f"{name}  ok     {r.seconds:6.1f}s  {text}")
        else:
            print(f"{name}  FAILED {r.seconds:6.1f}s  {r.error}")
    return 0 if result.ok else 1


def memory_mib(text: str) -> int:
    """--memory in the size grammar (harness.units), a bare number in MiB; whole MiB only."""
    from harness.errors import HarnessError
    from harness.units import parse_size, size_hint

    size = parse_size(text, bare="MiB", what="memory size")
    if size % 2**20 or not 64 <= size // 2**20 <= 1 << 20:
        raise HarnessError(
            f"--memory {text}: must be whole MiB from 64 MiB to 1 TiB",
            hint=size_hint("MiB"),
        )
    return size // 2**20


def spec_from_args(args: argparse.Namespace) -> FleetSpec:
    """`ksmh fleet up`'s options as the FleetSpec they describe."""
    return FleetSpec(
        count=args.count,
        memory_mib=memory_mib(args.memory),
        image=ImageKind(args.image),
        backend=GuestBackendKind(args.backend),
        uri=args.uri,
        accel=AccelKind(args.accel),
        vcpus=args.vcpus,
        mem_merge=not args.no_mem_merge,
        thp=not args.no_thp,
        concurrency=args.concurrency if args.concurrency is not None else default_concurrency(),
        ready_timeout=args.ready_timeout,
        machine=MachineKind(args.machine),
    )


def cmd_up(args: argparse.Namespace) -> int:
    if os.geteuid() == 0:
        from harness.recovery import recover_first

        recover_first(lambda s: print(f"ksmh: {s}", file=sys.stderr))
    # SIGTERM like Ctrl-C: tear down what was booted rather than orphan QEMU processes.
    with signals_as_interrupt():
        return _up(args)


def _up(args: argparse.Namespace) -> int:
    fleet = Fleet(spec_from_args(args), runtime_root=args.runtime_dir)
    try:
        result = fleet.up()
    except BaseException:
        fleet.down()
        raise
    if not result.succeeded:
        fleet.down(keep_logs=True)  # the console logs say why; `fleet down --run` clears them
        first = result.failed[0].error
        cls = GuestBootTimeout if isinstance(first, GuestBootTimeout) else GuestError
        raise cls(
            f"no guest of {args.count} came up; first error: {first}",
            hint="see the console logs under " + str(fleet.run_dir),
        )
    fleet.detach()
    accel = fleet.accel
    print(f"run {fleet.run_id}: {len(result.succeeded)}/{plural(len(result), 'guest')} ready "
          f"({fleet.backend.name}, accel {accel.accel if accel else '?'})")  # fmt: skip
    status = _print_result(result)
    if accel is not None:
        print(f"accel: {accel.accel} ({accel.reason})")
    print(f"run id: {fleet.run_id}")
    return status


def _leftovers(runtime_root: Path) -> list[Leftover]:
    """Our guests that no run directory accounts for (crashed runs)."""
    from harness.guests.libvirt_backend import LIBVIRT_RUN, _socket_answers
    from harness.guests.qemu_backend import QemuBackend

    found = QemuBackend().leftovers()
    if _socket_answers(LIBVIRT_RUN / "libvirt-sock"):
        try:
            from harness.guests.libvirt_backend import LibvirtBackend

            backend = LibvirtBackend(start_daemons=False)
            found += backend.leftovers()
            backend.close()
        except HarnessError:
            pass
    known = {g["name"] for r in list_runs(runtime_root) for g in r.get("guests", [])}
    return [lo for lo in found if lo.name not in known]


def cmd_list(args: argparse.Namespace) -> int:
    runs: list[dict[str, Any]] = []
    for data in list_runs(args.runtime_dir):
        try:
            fleet = Fleet.attach(data["run_id"], args.runtime_dir)
        except HarnessError as exc:
            runs.append({"run_id": data.get("run_id"), "error": str(exc)})
            continue
        pids = fleet.pids()
        runs.append({
            "run_id": fleet.run_id,
            "backend": data.get("backend"),
            "accel": data.get("accel"),
            "memory_mib": data.get("memory_mib"),
            "guests": [
                {"name": g.spec.name, "state": g.state, "pid": pids.get(g.spec.name)}
                for g in fleet.guests
            ],
        })  # fmt: skip
    leftovers = [lo.__dict__ for lo in _leftovers(args.runtime_dir)]
    if args.json:
        print(json.dumps({"runs": runs, "leftovers": leftovers}, indent=2))
        return 0
    console = terminal()
    if console is not None and (runs or leftovers):
        console.print(runs_table(runs))
        for lo in leftovers:
            console.print(_leftover_line(lo), markup=False)
    else:
        print(format_runs(runs, leftovers))
    return 0


def _leftover_line(lo: dict[str, Any]) -> str:
    return (f"leftover {lo['name']} ({lo['backend']}, pid {lo['pid'] or '-'}): "
            "remove with `ksmh fleet down --all`")  # fmt: skip


def format_runs(runs: list[dict[str, Any]], leftovers: list[dict[str, Any]]) -> str:
    """`ksmh fleet list` as plain text (stdout is not a terminal): a line per run and guest."""
    lines = [] if runs or leftovers else ["no fleets"]
    for run in runs:
        if "error" in run:
            lines.append(f"run {run['run_id']}: {run['error']}")
            continue
        up = sum(g["state"] == "ready" for g in run["guests"])
        lines.append(f"run {run['run_id']}  {run['backend']}  accel {run['accel']}  "
                     f"{run['memory_mib']} MiB  {up}/{len(run['guests'])} running")  # fmt: skip
        lines += [f"  {g['name']}  {g['state']:<8} pid {g['pid'] or '-'}" for g in run["guests"]]
    lines += [_leftover_line(lo) for lo in leftovers]
    return "\n".join(lines)


def runs_table(runs: list[dict[str, Any]]) -> Any:
    """`ksmh fleet list` on a terminal: one rich table row per guest."""
    rows = []
    for run in runs:
        if "error" in run:
            rows.append((str(run["run_id"]), "-", "-", "-", "-", run["error"], "-"))
            continue
        for g in run["guests"]:
            rows.append((run["run_id"], run["backend"], str(run["accel"]),
                         f"{run['memory_mib']} MiB", g["name"], g["state"],
                         str(g["pid"] or "-")))  # fmt: skip
    header = ("RUN", "BACKEND", "ACCEL", "MEMORY", "GUEST", "STATE", "PID")
    return rich_table(header, rows, title="fleets", right=(3, 6))


def _only_run(runtime_root: Path) -> str:
    runs = [r["run_id"] for r in list_runs(runtime_root)]
    if len(runs) == 1:
        return str(runs[0])
    if not runs:
        raise HarnessError("no fleet is running", hint="start one with `ksmh fleet up --count N`")
    raise HarnessError(
        f"{len(runs)} fleet runs exist ({', '.join(runs)})", hint="choose one with --run ID"
    )


def cmd_exec(args: argparse.Namespace) -> int:
    words = list(args.command)
    if words and words[0] == "--":
        words = words[1:]
    if not words:
        raise HarnessError("no agent command given", hint="e.g. ksmh fleet exec -- ping")
    fleet = Fleet.attach(args.run or _only_run(args.runtime_dir), args.runtime_dir)
    try:
        result = fleet.run(words[0], *words[1:], guests=args.guests, timeout=args.timeout)
    finally:
        fleet.detach()
    return _print_result(result)


RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def run_id(text: str) -> str:
    """--run takes a fleet run id (as `fleet list` shows), never a path."""
    if not RUN_ID.fullmatch(text) or ".." in text:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a fleet run id (e.g. r6b0d2f1a39c2; see `ksmh fleet list`)"
        )
    return text


def _live_owner(owner: object, mine: set[int]) -> str | None:
    """A description of the live process (other than us or our ancestors) that owns a run, or
    None when it is ours to stop: its owner is dead, or is this command's own lineage."""
    if not isinstance(owner, dict) or not isinstance(owner.get("pid"), int):
        return None  # no owner recorded: a crashed write, or an older version's run
    pid, start = owner["pid"], owner.get("start")
    if pid in mine or not procfs.pid_alive(pid, started=start if isinstance(start, int) else None):
        return None
    return f"pid {pid} ({procfs.cmdline(pid) or procfs.comm(pid) or '?'})"


def cmd_down(args: argparse.Namespace) -> int:
    if not args.all:
        fleet = Fleet.attach(args.run, args.runtime_dir)
        result = fleet.down()
        print(f"run {fleet.run_id}: {plural(len(result), 'guest')} stopped")
        return _print_result(result) if not result.ok else 0
    status = 0
    mine = set(procfs.lineage(os.getpid()))
    kept: set[str] = set()  # run ids a live process owns: their guests are not leftovers either
    for data in list_runs(args.runtime_dir):
        rid = str(data.get("run_id"))
        owner = _live_owner(data.get("owner"), mine)
        if owner is not None:
            kept.add(rid)
            print(f"run {rid}: left alone, a live process owns it: {owner}")
            continue
        try:
            fleet = Fleet.attach(rid, args.runtime_dir)
            result = fleet.down()
            print(f"run {fleet.run_id}: {plural(len(result), 'guest')} stopped")
            status |= 0 if result.ok else _print_result(result)
        except HarnessError as exc:
            print(f"run {rid}: {exc}")
            status = 1
    # Directories without a readable run.json (a crash mid-write) go too.
    if args.runtime_dir.exists():
        for d in args.runtime_dir.iterdir():
            try:
                # Skip very recent ones: a probe or a fleet of another process may be starting.
                fresh = time.time() - d.stat().st_mtime < 120
            except FileNotFoundError:
                continue  # removed meanwhile, e.g. by its own fleet's down
            if d.is_dir() and not fresh and not (d / "run.json").exists():
                shutil.rmtree(d, ignore_errors=True)
    for lo in _leftovers(args.runtime_dir):  # both backends list only ksmh- names
        why = _not_ours_to_stop(lo, kept, mine)
        if why:
            print(f"left {lo.name} alone: {why}")
            continue
        try:
            _remove(lo)
            print(f"removed leftover {lo.name} ({lo.backend}, pid {lo.pid or '-'})")
        except HarnessError as exc:
            print(f"could not remove {lo.name}: {exc}")
            status = 1
    return status


def _not_ours_to_stop(lo: Leftover, kept: set[str], mine: set[int]) -> str | None:
    if lo.persistent:
        return "a persistent libvirt domain (ksm-harness creates only transient ones)"
    if any(lo.name.startswith(f"{NAME_PREFIX}{rid}-") for rid in kept):
        return "its run is owned by a live process"
    if lo.parent is not None and lo.parent not in mine:
        who = procfs.cmdline(lo.parent) or procfs.comm(lo.parent) or "?"
        return f"its QEMU belongs to live pid {lo.parent} ({who})"
    return None


def _remove(lo: Leftover) -> None:
    if lo.backend == GuestBackendKind.LIBVIRT:
        from harness.guests.libvirt_backend import LibvirtBackend

        backend = LibvirtBackend(start_daemons=False)
        try:
            backend.remove_leftover(lo)
        finally:
            backend.close()
    else:
        from harness.guests.qemu_backend import QemuBackend

        QemuBackend().remove_leftover(lo)
