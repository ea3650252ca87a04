"""`ksmh run PLAYBOOK --inventory INVENTORY`: one playbook on every host of a fleet, in parallel.

Per host, over one SSH session (harness.remote.fleet.on_fleet, so a failing host is reported in
its own slot and never stops the others):

1. upload the playbook to PREFIX/runs/<fleet-id>-<token>/ (SFTP);
2. run the installed harness there, as an argv quoted for the remote shell:
   `PREFIX/venv/bin/ksmh run FILE --backend B --out DIR/results --export off|HOST:PORT`,
   streaming its progress lines back prefixed with the host's name;
3. fetch DIR/results/<run-id>/ into OUT/<host>/<run-id>/ and render the plots and report.md
   there (fleet hosts have no matplotlib: `hosts prepare` ships none);

then OUT/fleet-<fleet-id>/fleet.json + report.md aggregate the hosts (harness.report.fleet).

Why `--export off` by default: `hosts prepare` already runs an exporter on each host at the
inventory's exporter.listen (127.0.0.1:9712 by default), the runner's own default address.

Exit status as for one host: 0 every expectation held everywhere, 1 some failed, 2 some host
errored (unreachable, not prepared, or its run ended in an error); the report says which.
Ctrl-C stops the remote runs with SIGTERM (each tears its guests down and still writes its
results), fetches what they wrote, writes the fleet report, then exits 130.
"""

from __future__ import annotations

import re
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.console import plural
from harness.errors import HarnessError, RemoteCommandFailed
from harness.fleet_result import FleetResult
from harness.remote.fleet import on_fleet
from harness.remote.inventory import Host, Inventory
from harness.remote.ssh import CommandResult, Session
from harness.report.fleet import HostSummary, fleet_document, summarize_host, write_fleet_report

PID_MARK = "ksmh-remote-pid "
# The remote shell prints its pid (so Ctrl-C can signal the run) and then becomes the run:
# sh -> env -> ksmh all exec, keeping that pid.
_WRAPPER = f'echo "{PID_MARK}$$" >&2; exec "$@"'
NOT_FOUND = 127  # env(1): the command does not exist


@dataclass(frozen=True)
class RemoteRunOptions:
    """How to run the playbook on each host (the `ksmh run` options passed through)."""

    backend: str = "auto"
    export: str = "off"  # HOST:PORT on each host, or off
    out: Path = Path("results")
    timeout: float | None = None  # seconds per host run; None: as long as it takes
    parallel: int = 8
    known_hosts: Path | None = None


@dataclass
class FleetRun:
    """The outcome: the fleet report's directory and document, and the exit status."""

    fleet_id: str
    directory: Path
    report: Path
    document: dict[str, Any]
    hosts: list[HostSummary]
    exit_status: int
    interrupted: bool = False


@dataclass
class _Remote:
    """Remote pids of the runs in flight, for Ctrl-C (filled from the progress stream)."""

    pids: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


def new_fleet_id(playbook_name: str, out: Path, now: float | None = None) -> str:
    """`<stamp>-<playbook>`, with `.N` added while OUT/fleet-<id> exists (as the runner does)."""
    base = time.strftime("%Y%m%d-%H%M%S", time.localtime(now)) + f"-{playbook_name}"
    return _unique(out / f"fleet-{base}").name.removeprefix("fleet-")


def remote_workdir(host: Host, fleet_id: str, token: str) -> str:
    return f"{host.prefix}/runs/{fleet_id}-{token}"


def remote_argv(host: Host, playbook: str, out: str, opts: RemoteRunOptions) -> list[str]:
    """The command run on a host: the wrapper, then the installed ksmh with our options.

    KSM_HARNESS_IMAGE_DIR keeps the guest image the host builds under its prefix instead of
    inside the venv's site-packages.
    """
    return [
        "sh",
        "-c",
        _WRAPPER,
        "ksmh-run",
        "env",
        f"KSM_HARNESS_IMAGE_DIR={host.prefix}/guest-images",
        f"{host.prefix}/venv/bin/ksmh",
        "run",
        playbook,
        "--backend",
        opts.backend,
        "--out",
        out,
        "--export",
        opts.export,
        # The controller pushes each host's fetched results under its inventory name.
        "--push",
        "off",
    ]


def parse_error(stderr: str) -> tuple[str | None, str | None]:
    """(message, hint) of the `ksmh: error: ...` / `  hint: ...` lines ksmh prints on exit 2;
    else the last non-empty line (e.g. a traceback's), and no hint."""
    lines = [ln for ln in stderr.splitlines() if ln.strip() and not ln.startswith(PID_MARK)]
    for i, line in enumerate(lines):
        if line.startswith("ksmh: error: "):
            nxt = lines[i + 1].strip() if i + 1 < len(lines) else ""
            hint = nxt.removeprefix("hint: ") if nxt.startswith("hint: ") else None
            return line.removeprefix("ksmh: error: "), hint
    return (lines[-1].strip().removeprefix("ksmh: ") if lines else None), None


def _unique(path: Path) -> Path:
    """path, or else path.2, path.3, ...: the first that does not exist."""
    candidate, n = path, 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}.{n}")
    return candidate


def run_on_host(
    s: Session,
    playbook: Path,
    fleet_id: str,
    token: str,
    opts: RemoteRunOptions,
    echo: Callable[[str], None],
    remote: _Remote | None = None,
) -> HostSummary:
    """Steps 1-3 of the module docstring on one host; the host's summary row."""
    host = s.host
    name = host.name
    address = f"{host.address}:{host.port}"
    workdir = remote_workdir(host, fleet_id, token)
    remote_pb = f"{workdir}/{playbook.name}"
    s.run(["mkdir", "-p", f"{workdir}/results"])
    s.put_bytes(playbook.read_bytes(), remote_pb)

    def progress(line: str) -> None:
        if line.startswith(PID_MARK) and remote is not None:
            with remote.lock:
                remote.pids[name] = int(line.removeprefix(PID_MARK))
            return
        echo(f"{name}: {line}")

    echo(f"{name}: running {playbook.name} on {address} (workdir {workdir})")
    argv = remote_argv(host, remote_pb, f"{workdir}/results", opts)
    try:
        r = s.run(argv, check=False, timeout=opts.timeout, on_stderr=progress)
    finally:
        if remote is not None:
            with remote.lock:
                remote.pids.pop(name, None)
    if r.exit_code == NOT_FOUND:
        raise RemoteCommandFailed(
            f"{name}: ksm-harness is not installed under {host.prefix} "
            f"({host.prefix}/venv/bin/ksmh not found)",
            hint="run `ksmh hosts prepare INVENTORY` first",
        )
    return _collect(s, r, workdir, opts, echo, address)


def _collect(
    s: Session,
    r: CommandResult,
    workdir: str,
    opts: RemoteRunOptions,
    echo: Callable[[str], None],
    address: str,
) -> HostSummary:
    """Fetch the run's results directory (if the run got far enough to write one), render
    it here, and summarize."""
    from harness.report.render import render
    from harness.report.results import read_results

    name = s.host.name
    error, hint = (None, None) if r.exit_code in (0, 1) else parse_error(r.stderr)
    runs = s.listdir(f"{workdir}/results")
    if not runs:  # e.g. the host's KSM refused before the run began
        echo(f"{name}: exit {r.exit_code}, no results written")
        return summarize_host(name, _status(r.exit_code, None), None, address=address,
                              error=error or "no results written", hint=hint)  # fmt: skip
    run_id = results_dir_name(name, runs[-1])
    local = _unique(opts.out / name / run_id)
    files = s.fetch_dir(f"{workdir}/results/{run_id}", local)
    res = read_results(local)
    try:
        render(local, res)  # plots: matplotlib is here, not on the host
    except (HarnessError, OSError, ImportError) as exc:
        echo(f"{name}: could not render the plots in {local}: {exc}")
    status = _status(r.exit_code, res.run)
    if status == 2 and r.exit_code == 1 and error is None:
        error, hint = parse_error(r.stderr)  # exit 1 without a failed verdict: a crash
    verdict_error = (res.run.get("verdict") or {}).get("error")
    if status == 2 and isinstance(verdict_error, str):
        error = verdict_error  # the run's own account (e.g. "interrupted (signal SIGTERM)")
    echo(f"{name}: exit {r.exit_code}, fetched {plural(len(files), 'file')} into {local}")
    return summarize_host(name, status, res.run, samples=res.samples, directory=str(local),
                          address=address, error=error, hint=hint)  # fmt: skip


_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}", re.ASCII)


def results_dir_name(host: str, name: str) -> str:
    """A results directory name a host reported, checked before it becomes a local path:
    one plain path component (no `/`, no `..`, not absolute), as the runner names them."""
    if not _RUN_ID.fullmatch(name) or name in (".", ".."):
        raise RemoteCommandFailed(
            f"{host}: refusing results directory name {name[:80]!r}",
            hint="a run's results directory is one name like 20261126-154727-quickstart; "
            "look at the host's PREFIX/runs/ by hand",
        )
    return name


def _status(exit_code: int, run: dict[str, Any] | None) -> int:
    """The host's exit status as the fleet counts it: 1 only with a failed verdict (a Python
    crash there also exits 1), 0/1 as reported, anything else an error (2)."""
    if exit_code == 0:
        return 0
    if exit_code == 1 and run is not None and (run.get("verdict") or {}).get("status") == "failed":
        return 1
    return 2 if exit_code in (1, 2) else exit_code


def _errored(name: str, address: str, exc: HarnessError) -> HostSummary:
    message = str(exc.message).removeprefix(f"{name}: ")
    return summarize_host(name, 2, None, address=address, error=message, hint=exc.hint)


def _stop_remote(inventory: Inventory, remote: _Remote, opts: RemoteRunOptions) -> None:
    """SIGTERM every run still in flight: the runner there tears down and writes results."""
    with remote.lock:
        pids = dict(remote.pids)
    if not pids:
        return
    sub = Inventory(
        inventory.path, tuple(h for h in inventory.hosts if h.name in pids), inventory.known_hosts
    )
    on_fleet(
        sub,
        lambda s: s.run(["kill", "-TERM", str(pids[s.host.name])], check=False),
        known_hosts=opts.known_hosts,
        parallel=opts.parallel,
    )


def run_fleet(
    inventory: Inventory,
    playbook: Path,
    playbook_name: str,
    opts: RemoteRunOptions,
    echo: Callable[[str], None],
) -> FleetRun:
    """Run the (already validated) playbook on every host; write the fleet report."""
    fleet_id = new_fleet_id(playbook_name, opts.out)
    token = secrets.token_hex(3)  # two controllers starting in the same second never share
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    remote = _Remote()
    echo(f"fleet run {fleet_id}: {playbook} on {plural(len(inventory.hosts), 'host')}")

    def one(s: Session) -> HostSummary:
        return run_on_host(s, playbook, fleet_id, token, opts, echo, remote)

    box: dict[str, FleetResult[HostSummary]] = {}
    done = threading.Event()

    def work() -> None:
        try:
            box["result"] = on_fleet(inventory, one, known_hosts=opts.known_hosts,
                                     parallel=opts.parallel)  # fmt: skip
        finally:
            done.set()

    # The hosts run in a worker thread so that Ctrl-C reaches this one, which then stops the
    # remote runs. (An Event, not Thread.join: a join interrupted by KeyboardInterrupt can
    # return early afterwards on CPython < 3.13.)
    threading.Thread(target=work, name="ksmh-fleet-run", daemon=True).start()
    interrupted = False
    try:
        while not done.wait(0.5):
            pass
    except KeyboardInterrupt:
        interrupted = True
        echo("interrupted: stopping the remote runs (they tear down and write their results)")
        _stop_remote(inventory, remote, opts)
        done.wait()  # a second Ctrl-C abandons them
    if "result" not in box:
        raise RemoteCommandFailed("the fleet run ended without a result (see the lines above)")
    result = box["result"]
    hosts: list[HostSummary] = []
    by_name = {h.name: h for h in inventory.hosts}
    for name, outcome in result.items():
        address = f"{by_name[name].address}:{by_name[name].port}"
        if outcome.value is not None:
            hosts.append(outcome.value)
        else:
            assert outcome.error is not None
            hosts.append(_errored(name, address, outcome.error))
            echo(f"{name}: ERROR: {hosts[-1].error}")
    doc = fleet_document(
        fleet_id,
        {"name": playbook_name, "file": str(playbook)},
        hosts,
        started=started,
        finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        options={"backend": opts.backend, "export": opts.export, "inventory": str(inventory.path)},
    )
    directory = opts.out / f"fleet-{fleet_id}"
    report = write_fleet_report(directory, doc)
    return FleetRun(fleet_id, directory, report, doc, hosts, doc["exit_status"], interrupted)


def cmd_run_fleet(args: Any) -> int:
    """`ksmh run PLAYBOOK --inventory INVENTORY` (called by harness.playbook.cli after the
    playbook validated here)."""
    import sys

    from harness.remote.inventory import load_inventory
    from harness.report.fleet import failure_lines, format_table
    from harness.units import human_bytes

    inventory = load_inventory(args.inventory)
    opts = RemoteRunOptions(
        backend=args.backend,
        export=args.export or "off",
        out=args.out,
        parallel=args.parallel,
        known_hosts=args.known_hosts,
    )
    name = args.playbook_name

    lock = threading.Lock()

    def echo(line: str) -> None:
        with lock:  # hosts report from their own threads: one whole line at a time
            sys.stderr.write(line + "\n")
            sys.stderr.flush()

    fr = run_fleet(inventory, args.playbook, name, opts, echo)
    print(format_table(fr.hosts))
    for line in failure_lines(fr.hosts):
        print(line)
    totals = fr.document["totals"]
    print(f"fleet-wide saved: {human_bytes(totals['saved_bytes'])} ({totals['saved_bytes']} bytes)")
    print(f"fleet report: {fr.report}")
    push = getattr(args, "push_url", None)
    if push:
        from harness.monitoring.push import push_results

        for h in fr.hosts:
            if h.directory:
                push_results(Path(h.directory), push, host=h.host)
    bad = [h.host for h in fr.hosts if h.status == "error"]
    if bad:
        print(f"ksmh: {len(bad)} of {plural(len(fr.hosts), 'host')} errored: {', '.join(bad)}",
              file=sys.stderr)  # fmt: skip
    if fr.interrupted:
        raise KeyboardInterrupt
    return fr.exit_status
