"""The comparison runner: one playbook, the real kernel's KSM and the model, side by side.

Data flow (DESIGN.md "Data flow of one run"): choose KSM once (harness.ksm.select) -> take the
host lock, undo dead runs, journal the original knobs (harness.recovery) -> results directory
-> the sides (harness.sides: the kernel, the model fed by shadow capture, or the model alone)
-> boot the fleet -> phases of steps -> at every sync point the leading side holds still while
the others catch up and every side is read -> results/<run-id>/ -> teardown (guests,
exporter, knobs, journal), always, shielded from a second signal.

A run that ends by an exception of any kind gets verdict "error" (exit 2) in run.json and
report.md; a comparison that cannot be trusted (another process using KSM) is refused.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import procfs
from harness.console import plural
from harness.errors import HarnessError
from harness.exporter import parse_listen
from harness.journal import JOURNAL_DIR, FleetEntry, Journal
from harness.kinds import BackendKind, ForeignPolicy
from harness.ksm.lock import DEFAULT_LOCK
from harness.ksm.select import choose_backend
from harness.ksm.sysfs import KSM_ROOT, SysfsBackend
from harness.ksm.types import counters_with_derived
from harness.paths import is_root
from harness.playbook import host
from harness.playbook.context import FleetLike
from harness.playbook.expect import Context
from harness.playbook.live import RunState, Sampler, serve_run
from harness.playbook.plan import FleetSpec, Phase, Playbook
from harness.recovery import run_session
from harness.report.nightly import boot_record
from harness.report.provenance import gather as gather_provenance
from harness.report.render import render
from harness.report.results import Results, new_results_dir, write_results
from harness.shadow import sharing_matrix
from harness.sides import Side
from harness.sides.kernel import KernelSide
from harness.sides.model import ModelSide
from harness.signals import shielded, signals_as_interrupt
from harness.thp import khugepaged_pinned

# What a non-root model-only run on a host with KSM does without the host lock and journal.
UNGUARDED = (
    "not root: running without the host KSM lock and run journal: this run's guests are not "
    "protected from other runs, nor protect them (a root run sees them as foreign KSM users "
    "and refuses), and a SIGKILL leaves them running (`ksmh fleet list` finds them)"
)


class ForeignKsmUsers(HarnessError):
    """Processes outside the run use KSM: a kernel-vs-model comparison would be wrong."""


def default_fleet(spec: FleetSpec) -> FleetLike:
    """The playbook's fleet section is the FleetSpec Fleet boots (THP as `fleet.thp` says)."""
    from harness.guests.fleet import Fleet

    fleet: FleetLike = Fleet(spec)
    return fleet


@dataclass
class RunOptions:
    backend: str = BackendKind.AUTO
    out: Path = Path("results")
    export: str | None = None  # HOST:PORT, or None for no endpoint
    export_required: bool = False  # an explicit --export that cannot bind is an error
    sysfs_root: Path = KSM_ROOT
    proc: Path = procfs.PROC
    lock_path: Path = DEFAULT_LOCK
    journal_dir: Path = JOURNAL_DIR
    take_lock: bool = True  # False: the caller already holds ksm_lock() (tests)
    fleet_factory: Callable[[FleetSpec], FleetLike] = default_fleet
    echo: Callable[[str], None] = field(default=lambda s: print(s, file=sys.stderr, flush=True))


@dataclass
class Outcome:
    exit_status: int
    directory: Path
    failed: list[str]
    skipped: int = 0
    passed: int = 0


class Runner:
    """Runs one playbook; see the module docstring. `run()` returns an Outcome."""

    def __init__(self, playbook: Playbook, opts: RunOptions | None = None) -> None:
        self.pb = playbook
        self.opts = opts or RunOptions()
        if self.opts.export:
            parse_listen(self.opts.export)  # a bad --export fails before anything starts
        self.t0 = time.monotonic()
        self.run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{playbook.name}"
        self.dir: Path | None = None
        self.sides: list[Side] = []
        self._fleet: FleetLike | None = None
        self.journal: Journal | None = None
        self.guest_pids: dict[str, int] = {}
        self.state = RunState(self.run_id, playbook.name)
        self.results = Results(run={})
        self.failed: list[str] = []
        self.mem_min: int | None = None
        self._phase_rec: dict[str, Any] = {}
        self.phase_start: dict[str, dict[str, Any]] = {}
        self.teardown_signals: list[int] = []
        self.results_error: str | None = None

    # -- StepContext -----------------------------------------------------------------------
    @property
    def leader(self) -> Side:
        return self.sides[0]

    @property
    def fleet(self) -> FleetLike:
        if self._fleet is None:
            raise HarnessError("no fleet booted yet")
        return self._fleet

    @property
    def proc(self) -> Path:
        return self.opts.proc

    @property
    def phase_record(self) -> dict[str, Any]:
        return self._phase_rec

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def say(self, text: str) -> None:
        self.opts.echo(f"[{self.elapsed():7.1f}s] {text}")

    def fail(self, text: str) -> None:
        self.failed.append(text)
        with self.state.lock:
            self.state.failed = len(self.failed)

    def failures(self) -> int:
        return len(self.failed)

    def expectation_context(self, values: Mapping[str, Mapping[str, Any]]) -> Context:
        return Context(
            values=values,
            start=self.phase_start,
            primary=self.leader.source,
            verify=self._phase_rec.get("verify") or None,
        )

    # -- the run ---------------------------------------------------------------------------
    def run(self) -> Outcome:
        error: BaseException | None = None
        stack = ExitStack()
        try:
            with signals_as_interrupt():
                self._start(stack)
                for phase in self.pb.phases:
                    self._phase(phase)
        except BaseException as exc:
            error = exc
        with shielded(reraise=False) as got:
            try:
                stack.close()
            except BaseException as exc:
                self.say(f"teardown: {getattr(exc, 'message', None) or exc!r}")
                error = error or exc
            self.teardown_signals = got
            self._finish(error)
        if error is not None:
            raise error  # after the verdict is written; the CLI turns it into exit 2
        if self.results_error is not None:
            raise HarnessError(self.results_error, hint="free space or choose another --out")
        return self._outcome()

    def _start(self, stack: ExitStack) -> None:
        o = self.opts
        choice = choose_backend(o.backend, need_write=True, root=o.sysfs_root, proc=o.proc)
        kernel = choice.backend if isinstance(choice.backend, SysfsBackend) else None
        banner = None
        if kernel is None:
            banner = choice.fallback and (f"{choice.fallback}: running the model alone")
            banner = banner or "KSM backend: the model alone (--backend model); no real KSM"
            self.opts.echo(f"*** {banner} ***")
        self.results.run = self._header(banner, kernel is not None)
        # Guests' RAM is mergeable wherever the host has KSM: a model-only run holds the lock
        # (and journals its guests) there too, so no other run's counters see them. The lock
        # and the journals are root's: a non-root model-only run goes without, and says so.
        guarded = kernel is not None or (o.sysfs_root / "run").exists()
        if kernel is None and guarded and not is_root():
            self.say(UNGUARDED)
            self.results.run["unguarded"] = UNGUARDED
        else:
            self.journal = stack.enter_context(
                run_session(
                    kernel,
                    self.run_id,
                    "playbook",
                    echo=self.say,
                    lock_path=o.lock_path,
                    journal_dir=o.journal_dir,
                    take_lock=o.take_lock and guarded,
                    on_wait=lambda: self.say(f"waiting for the host KSM lock {o.lock_path}"),
                )
            )
        self.dir = new_results_dir(o.out, self.run_id)  # exclusive, after the lock
        self.run_id = self.dir.name
        self.results.run["run_id"] = self.run_id
        self.sides = self._open_sides(kernel)
        if kernel is not None and len(self.sides) > 1 and self.pb.fleet.thp:
            # The model has no khugepaged: hold it off while the two are compared.
            thp_root = o.sysfs_root.parent / "transparent_hugepage"
            stack.enter_context(khugepaged_pinned(thp_root, self.journal))
        self._check_foreign(set())
        self._prepare_ksm()
        self._start_live(stack)
        self._boot(stack)
        self._check_foreign(set(self.guest_pids.values()))
        self.sync("boot")

    def _open_sides(self, kernel: SysfsBackend | None) -> list[Side]:
        from harness.ksm.model import ModelBackend

        o = self.opts
        sides: list[Side] = []
        if kernel is not None:
            sides.append(KernelSide(kernel, o.proc, scan_samples=self.pb.scan_samples))
        if kernel is None or self.pb.shadow.enabled:
            model = ModelSide(
                ModelBackend(profile="host"),
                o.proc,
                include_others=kernel is not None and self.pb.foreign is ForeignPolicy.CAPTURE,
                # Without real KSM, QEMU's MADV_MERGEABLE may have failed: fall back to its RAM.
                fallback_hugepage=not (o.sysfs_root / "run").exists(),
                max_scans_per_capture=self.pb.shadow.max_scans_per_capture,
            )
            sides.append(model)
            self.say(f"model: ksm_model profile {model.profile}")
        else:
            self.say("shadow capture disabled: kernel only")
        return sides

    def _check_foreign(self, ours: set[int]) -> None:
        """Refuse a comparison that other KSM users would falsify (playbook `foreign: refuse`);
        with `foreign: capture` the model captures them too."""
        if len(self.sides) < 2 or self.pb.foreign is ForeignPolicy.CAPTURE:
            return
        found = procfs.ksm_users(self.opts.proc, exclude=ours | {os.getpid()})
        if found:
            raise ForeignKsmUsers(
                f"{plural(len(found), 'process')} outside this run "
                f"{'uses' if len(found) == 1 else 'use'} KSM: " + procfs.describe_users(found),
                hint="their pages change every counter: stop them, or set `foreign: capture` "
                "in the playbook to model them too",
            )

    def _header(self, banner: str | None, kernel: bool) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "playbook": {
                "name": self.pb.name,
                "file": self.pb.file,
                "description": self.pb.description,
                "source": self.pb.raw,
            },
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "backend": "kernel" if kernel else "model",
            "banner": banner,
            "host": host.host_facts(self.opts.proc),
            "provenance": gather_provenance(self.pb),
            "accelerator": None,
            "tunables": {},
            "guests": [],
            "phases": [],
        }

    def _prepare_ksm(self) -> None:
        """Clean slate: unmerge (run=2) and the playbook's knobs with ksmd stopped on the
        leader; every other side mirrors what the leader then has, so all start equal."""
        wanted = {k: v for k, v in self.pb.ksm.items() if k != "run"}
        run_value = self.pb.ksm.get("run", 0)
        lead = self.leader
        self.results.run["tunables"]["before"] = lead.knobs()
        lead.apply({"run": 2})
        lead.apply({**wanted, "run": 0})
        knobs = lead.knobs()
        for side in self.sides[1:]:
            side.apply({**{k: v for k, v in knobs.items() if k != "run"}, "run": 0})
        self.results.run["tunables"]["run"] = {**knobs, "run": run_value}
        if run_value:
            self.write_knobs({"run": run_value})

    def _boot(self, stack: ExitStack) -> None:
        spec = self.pb.fleet
        self.say(
            f"booting {spec.count} x {spec.memory_mib} MiB guests "
            f"({spec.backend}, accel {spec.accel})"
        )
        fleet = self.opts.fleet_factory(spec)
        self._fleet = fleet
        stack.callback(self._fleet_down)
        if self.journal is not None:
            run_dir = getattr(fleet, "run_dir", None)
            self.journal.add_fleet(
                FleetEntry(
                    run_id=fleet.run_id,
                    backend=str(getattr(getattr(fleet, "backend", None), "name", spec.backend)),
                    uri=getattr(fleet, "uri", None),
                    runtime_root=str(run_dir.parent) if run_dir is not None else "",
                )
            )
        result = fleet.up()  # Fleet applies spec.thp to the QEMUs it starts
        self.guest_pids = dict(fleet.pids())
        if self.journal is not None:
            self.journal.set_guests(fleet.run_id, dict(self.guest_pids))
        if hasattr(result, "raise_if_failed"):
            result.raise_if_failed()
        self.results.run["boot"] = boot_record(result)
        accel = getattr(fleet, "accel", None)
        self.results.run["accelerator"] = getattr(accel, "accel", accel)
        self.results.run["accelerator_reason"] = getattr(accel, "reason", None)
        self.results.run["fleet_run_id"] = fleet.run_id
        self.results.run["guests"] = [
            {"name": n, "index": i, "pid": p, "thp": procfs.thp_enabled(p, self.opts.proc)}
            for i, (n, p) in enumerate(self.guest_pids.items())
        ]
        self.say(
            f"fleet {fleet.run_id} ready: {plural(len(self.guest_pids), 'guest')}, "
            f"accel {self.results.run['accelerator']}"
        )
        names = {pid: name for name, pid in self.guest_pids.items()}
        for side in self.sides:
            side.watch(names)

    def _fleet_down(self) -> None:
        if self._fleet is not None:
            self.say("stopping the fleet")
            self._fleet.down()

    def _start_live(self, stack: ExitStack) -> None:
        from harness.exporter import ExportTarget

        sampler = Sampler(self.pb.sample_interval, self._sample_live)
        sampler.start()
        stack.callback(self._stop_sampler, sampler)
        if not self.opts.export:
            return

        def target(side: Side) -> ExportTarget:
            backend, _ = side.exported()
            return ExportTarget(
                backend=backend, watch=lambda: side.exported()[1], cpu=side.ksmd_cpu_seconds
            )

        targets = [target(s) for s in self.sides]
        try:
            server = serve_run(targets, self.state, targets[0].host, self.opts.export)
        except HarnessError as exc:
            if self.opts.export_required:
                raise
            self.say(f"exporter not started: {exc.message}")
            return
        stack.callback(server.shutdown)
        self.say(f"exporting {' and '.join(s.source for s in self.sides)} series on "
                 f"http://{self.opts.export}/metrics")  # fmt: skip

    def _stop_sampler(self, sampler: Sampler) -> None:
        sampler.stop()
        if sampler.errors:
            # Each failed sample is a gap in samples.csv: say so rather than leave it silent.
            self.say(
                f"{plural(len(sampler.errors), 'sample')} failed; the last: {sampler.errors[-1]}"
            )

    # -- sampling and sync points ------------------------------------------------------------
    def _sample_live(self) -> None:
        """Between sync points only measured values are recorded: the leader when it is the
        real kernel (its reads are safe from this thread), never the model."""
        mem = procfs.mem_available(self.opts.proc)
        if mem is not None:
            self.mem_min = mem if self.mem_min is None else min(self.mem_min, mem)
        lead = self.leader
        if not isinstance(lead, KernelSide):
            return
        snap = lead.snapshot()
        t, phase = self.elapsed(), self.state.phase
        self.results.add_sample(t, phase, lead.source, snap.counters, mem)
        for name, stat in snap.processes.items():
            self.results.add_guest(t, phase, lead.source, name, stat)
            with self.state.lock:
                self.state.guests[(lead.source, name)] = dict(stat)

    def sync(self, why: str) -> dict[str, dict[str, Any]]:
        """Every side read at one instant: the leader holds still while the followers catch up
        by the full scans it made since the last sync."""
        values: dict[str, dict[str, Any]] = {}
        mem = procfs.mem_available(self.opts.proc)
        values["host"] = {"mem_available": mem, "mem_available_min": self.mem_min}
        if len(self.sides) > 1 and self.guest_pids:
            self._check_foreign(set(self.guest_pids.values()))
        with self.leader.hold() as scans:
            for side in self.sides[1:]:
                side.follow(scans)
            snaps = {side.source: side.snapshot() for side in self.sides}
        t, phase = self.elapsed(), self.state.phase
        self._record_scans(phase)
        for source, snap in snaps.items():
            counters = {k: v for k, v in snap.counters.items() if v is not None}
            values[source] = counters_with_derived(counters, self.leader.page_size)
            self.results.add_sample(t, phase, source, snap.counters, mem)
            for name, stat in snap.processes.items():
                self.results.add_guest(t, phase, source, name, stat)
                with self.state.lock:
                    self.state.guests[(source, name)] = dict(stat)
        self._publish_delta(values)
        self._say_sync(why, values)
        return values

    def _record_scans(self, phase: str) -> None:
        """End-of-scan records each side made since the last sync (scans.csv)."""
        for side in self.sides:
            for p in side.drain_scans():
                self.results.add_scan(side.source, p.scan, p.counters, p.seconds, phase)

    def _publish_delta(self, values: Mapping[str, Mapping[str, Any]]) -> None:
        if "kernel" in values and "model" in values:
            k, m = values["kernel"], values["model"]
            with self.state.lock:
                self.state.delta = {
                    n: k[n] - m[n]
                    for n in k
                    if isinstance(k.get(n), int) and isinstance(m.get(n), int)
                }

    def _say_sync(self, why: str, values: Mapping[str, Mapping[str, Any]]) -> None:
        parts = [
            f"{s.source} shared {values[s.source].get('pages_shared')} "
            f"sharing {values[s.source].get('pages_sharing')}"
            for s in self.sides
        ]
        scans = values[self.leader.source].get("full_scans")
        self.say(f"sync ({why}): " + " | ".join(parts) + f" | scans {scans}")

    def write_knobs(self, values: Mapping[str, int | str]) -> None:
        """Knobs on every side: followers catch up first, since a knob changes what the scans
        after it do; the leader checks the values (and may refuse) before anyone follows.

        Starting ksmd (run=1) syncs too: the followers must capture the memory its first scan
        will see (a fill just before), not what is left of it after the leader's first scans
        (THP splits, smart-scan ages: issue 12)."""
        starting = values.get("run") == 1 and bool(self.guest_pids)
        if len(self.sides) > 1 and (self.leader.scanning() or starting):
            self.sync("before ksm write")
        for side in self.sides:
            side.apply(values)

    # -- phases --------------------------------------------------------------------------------
    def _phase(self, phase: Phase) -> None:
        from harness.playbook.steps import run_step

        self.state.phase = phase.name
        n = len(phase.steps)
        self.say(f"== phase {phase.name} ({plural(n, 'step')})")
        rec: dict[str, Any] = {
            "name": phase.name,
            "line": phase.line,
            "t_start": round(self.elapsed(), 3),
            "waits": [],
            "agent": [],
            "verify": {},
            "expectations": [],
            "sweeps": [],
        }
        self._phase_rec = rec
        self.results.run["phases"].append(rec)
        start = self.sync(f"{phase.name} start")
        rec["counters"] = {s.source: {"start": start[s.source]} for s in self.sides}
        self.phase_start = start
        try:
            for step in phase.steps:
                run_step(self, step)
        finally:
            end = self.sync(f"{phase.name} end")
            self._record_exposure(phase.name)
            rec["t_end"] = round(self.elapsed(), 3)
            for s, c in rec["counters"].items():
                c["end"] = end.get(s, {})
                c["delta"] = {
                    n: c["end"][n] - v
                    for n, v in c["start"].items()
                    if isinstance(v, int | float) and isinstance(c["end"].get(n), int | float)
                }

    def _record_exposure(self, phase: str) -> None:
        """Which guests map the same KSM pages (exact, from their page tables): the run
        report's "Sharing exposure" section; the last phase's matrix is the one kept."""
        if not self.guest_pids or not any(isinstance(s, KernelSide) for s in self.sides):
            return
        from harness.doctor.exposure import exposure

        names = {pid: name for name, pid in self.guest_pids.items()}
        try:
            e = exposure(list(names), names, self.opts.proc)
        except HarnessError as exc:
            self.results.run["sharing_exposure"] = {"error": exc.message, "phase": phase}
            return
        self.results.run["sharing_exposure"] = {**e.as_dict(), "phase": phase}

    # -- the end --------------------------------------------------------------------------------
    def _expectation_counts(self) -> dict[str, int]:
        counts = {"passed": 0, "failed": 0, "skipped": 0}
        for p in self.results.run.get("phases", []):
            for e in p.get("expectations", []):
                counts[e["status"]] = counts.get(e["status"], 0) + 1
        return counts

    def _outcome(self) -> Outcome:
        assert self.dir is not None
        counts = self._expectation_counts()
        return Outcome(
            1 if self.failed else 0,
            self.dir,
            list(self.failed),
            skipped=counts["skipped"],
            passed=counts["passed"],
        )

    def _finish(self, error: BaseException | None) -> None:
        run = self.results.run
        run["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        run["duration_seconds"] = round(self.elapsed(), 2)
        model = next((s for s in self.sides if isinstance(s, ModelSide)), None)
        if model is not None:
            run["shadow"] = model.summary()
            names = model.guests
            caps = sorted(
                (c for c in model.last_caps if c.pid in names), key=lambda c: names[c.pid]
            )
            if caps:
                run["sharing_matrix"] = {
                    "guests": [names[c.pid] for c in caps],
                    "pages": sharing_matrix(caps).tolist(),
                }
        status = "error" if error is not None else ("failed" if self.failed else "passed")
        run["verdict"] = {
            "status": status,
            "exit_status": 2 if error is not None else (1 if self.failed else 0),
            "failed": list(self.failed),
            "expectations": self._expectation_counts(),
            "error": _error_text(error),
        }
        if error is not None and not isinstance(error, HarnessError | KeyboardInterrupt):
            run["verdict"]["traceback"] = "".join(traceback.format_exception(error))
        if self.teardown_signals:
            run["verdict"]["signals_during_teardown"] = len(self.teardown_signals)
        if self.dir is None:
            return  # ended before the results directory existed (lock, bad options)
        try:
            write_results(self.dir, self.results)
            report = render(self.dir, self.results)
            self.opts.echo(f"report: {report}")
        except (OSError, HarnessError) as exc:
            self.results_error = f"could not write the results to {self.dir}: {exc}"
            self.opts.echo(f"ksmh: {self.results_error}")


def _error_text(error: BaseException | None) -> str | None:
    if error is None:
        return None
    if isinstance(error, HarnessError):
        return error.message
    if isinstance(error, KeyboardInterrupt):
        return f"interrupted ({error or 'Ctrl-C'})"
    return f"crashed: {type(error).__name__}: {error}"
