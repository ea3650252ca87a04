"""The comparison runner: one playbook, the real kernel's KSM and the model, side by side.

Data flow (DESIGN.md "Data flow of one run"): choose KSM (real when present and writable, else
the model alone, with a banner) -> take the host lock, save every knob -> boot the fleet ->
phases of steps -> at every sync point pause ksmd, read the kernel, capture the guests into the
model and step it through as many full scans as the kernel made, read the model, resume ->
results/<run-id>/ -> teardown (guests, exporter, knobs, lock), always.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from harness.errors import HarnessError, KsmUnavailable
from harness.ksm.backend import BackendBase
from harness.ksm.lock import DEFAULT_LOCK, ksm_lock
from harness.ksm.sysfs import KSM_ROOT, SysfsBackend
from harness.playbook import host
from harness.playbook.expect import Context
from harness.playbook.live import RunState, Sampler, serve_run
from harness.playbook.modelside import ModelSide, counters_with_derived
from harness.playbook.schema import (
    FleetSpec,
    Phase,
    Playbook,
)
from harness.report.render import render
from harness.report.results import Results, write_results
from harness.shadow import sharing_matrix


class FleetLike(Protocol):
    """What the runner needs of harness.guests.fleet.Fleet (a fake in unit tests)."""

    run_id: str

    def up(self) -> Any: ...
    def down(self) -> Any: ...
    def run(self, command: str, *args: str, guests: str | None = None) -> Any: ...
    def pids(self) -> dict[str, int]: ...


def default_fleet(spec: FleetSpec) -> FleetLike:
    """The playbook's fleet section is the FleetSpec Fleet boots (THP as `fleet.thp` says)."""
    from harness.guests.fleet import Fleet

    fleet: FleetLike = Fleet(spec)
    return fleet


@dataclass
class RunOptions:
    backend: str = "auto"  # auto | kernel | model
    out: Path = Path("results")
    export: str | None = None  # HOST:PORT, or None for no endpoint
    export_required: bool = False  # an explicit --export that cannot bind is an error
    sysfs_root: Path = KSM_ROOT
    proc: Path = Path("/proc")
    lock_path: Path = DEFAULT_LOCK
    take_lock: bool = True  # False: the caller already holds ksm_lock() (tests)
    fleet_factory: Callable[[FleetSpec], FleetLike] = default_fleet
    echo: Callable[[str], None] = field(default=lambda s: print(s, file=sys.stderr, flush=True))


@dataclass
class Outcome:
    exit_status: int
    directory: Path
    failed: list[str]


def choose_kernel(name: str, root: Path, proc: Path) -> tuple[SysfsBackend | None, str | None]:
    """(kernel backend or None, banner). auto falls back to the model alone, saying why."""
    if name == "model":
        return None, "KSM backend: the model alone (--backend model); no real KSM is touched"
    try:
        kernel = SysfsBackend(root=root, proc=proc)
    except KsmUnavailable as exc:
        if name == "kernel":
            raise
        return None, f"real KSM is not available ({exc.message}): running the model alone"
    if not kernel.writable():
        if name == "kernel":
            raise KsmUnavailable(
                f"{root} is not writable", hint="run as root, or use --backend model"
            )
        return None, f"real KSM at {root} is not writable (not root?): running the model alone"
    return kernel, None


def _sigterm_as_interrupt(stack: ExitStack) -> None:
    """SIGTERM raises KeyboardInterrupt while the run lasts, so teardown runs as for Ctrl-C."""
    from harness.guests.fleet import sigterm_to_interrupt

    if threading.current_thread() is not threading.main_thread():
        return
    previous = signal.signal(signal.SIGTERM, sigterm_to_interrupt)
    stack.callback(signal.signal, signal.SIGTERM, previous)


class Runner:
    """Runs one playbook; see the module docstring. `run()` returns an Outcome."""

    def __init__(self, playbook: Playbook, opts: RunOptions | None = None) -> None:
        self.pb = playbook
        self.opts = opts or RunOptions()
        self.t0 = time.monotonic()
        stamp = time.strftime("%Y%m%d-%H%M%S")
        self.run_id = f"{stamp}-{playbook.name}"
        self.dir = self.opts.out / self.run_id
        n = 1
        while self.dir.exists():
            n += 1
            self.dir = self.opts.out / f"{self.run_id}.{n}"
        self.run_id = self.dir.name
        self.kernel: SysfsBackend | None = None
        self.model: ModelSide | None = None
        self.fleet: FleetLike | None = None
        self.guest_pids: dict[str, int] = {}
        self.state = RunState(self.run_id, playbook.name)
        self.results = Results(run={})
        self.failed: list[str] = []
        self.scans_seen = 0
        self.mem_min: int | None = None
        self.phase_rec: dict[str, Any] = {}

    # -- helpers ---------------------------------------------------------------------------
    def t(self) -> float:
        return time.monotonic() - self.t0

    def say(self, text: str) -> None:
        self.opts.echo(f"[{self.t():7.1f}s] {text}")

    @property
    def primary(self) -> BackendBase:
        if self.kernel is not None:
            return self.kernel
        assert self.model is not None
        return self.model.backend

    @property
    def primary_name(self) -> str:
        return "kernel" if self.kernel is not None else "model"

    # -- the run ---------------------------------------------------------------------------
    def run(self) -> Outcome:
        self.kernel, banner = choose_kernel(self.opts.backend, self.opts.sysfs_root, self.opts.proc)
        self.results.run = self._header(banner)
        if banner:
            self.opts.echo(f"*** {banner} ***")
        error: BaseException | None = None
        try:
            with ExitStack() as stack:
                _sigterm_as_interrupt(stack)
                if self.kernel is not None:
                    self._lock(stack)
                    stack.enter_context(self.kernel.saved())
                    stack.callback(self._drop_leftover_merges)
                elif (self.opts.sysfs_root / "run").exists():
                    # Model only, but the guests' RAM is still mergeable on this host: hold the
                    # lock for their whole life so no one's real KSM test sees them.
                    self._lock(stack)
                self._start_model()
                self._prepare_ksm()
                self._boot(stack)
                self._start_live(stack)
                for phase in self.pb.phases:
                    self._phase(phase)
        except (HarnessError, KeyboardInterrupt) as exc:
            error = exc
        finally:
            self._finish(error)
        if error is not None:
            raise error
        return Outcome(1 if self.failed else 0, self.dir, list(self.failed))

    def _lock(self, stack: ExitStack) -> None:
        if self.opts.take_lock:
            self.say(f"waiting for the host KSM lock {self.opts.lock_path}")
            stack.enter_context(ksm_lock(self.opts.lock_path))

    def _header(self, banner: str | None) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "playbook": {
                "name": self.pb.name,
                "file": self.pb.file,
                "description": self.pb.description,
                "source": self.pb.raw,
            },
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "backend": self.primary_name,
            "banner": banner,
            "host": host.host_facts(self.opts.proc),
            "accelerator": None,
            "tunables": {},
            "guests": [],
            "phases": [],
        }

    def _start_model(self) -> None:
        if not self.pb.shadow.enabled and self.kernel is not None:
            self.say("shadow capture disabled: kernel only")
            return
        self.model = ModelSide(
            profile="host",
            proc=self.opts.proc,
            max_scans_per_capture=self.pb.shadow.max_scans_per_capture,
            # Without real KSM, QEMU's MADV_MERGEABLE may have failed: fall back to its RAM.
            include_others=self.kernel is not None,
            fallback_hugepage=self.kernel is None,
        )
        self.say(f"model: ksm_model profile {self.model.profile}")

    def _prepare_ksm(self) -> None:
        """Clean slate: unmerge (run=2), the playbook's knobs with ksmd stopped, then mirror
        every knob into the model so both start equal."""
        wanted = {k: v for k, v in self.pb.ksm.items() if k != "run"}
        run_value = self.pb.ksm.get("run", 0)
        if self.kernel is not None:
            before = self.kernel.read_tunables().present()
            self.results.run["tunables"]["before"] = before
            self.kernel.write_tunables(run=2)
            self.kernel.apply({**wanted, "run": 0})
            knobs = self.kernel.read_tunables().present()
        else:
            knobs = wanted
        if self.model is not None:
            have = self.model.backend.read_tunables().present()
            mirror = {k: v for k, v in knobs.items() if k in have and k != "run"}
            self.model.backend.apply({**mirror, "run": 0}, force=True)
        self.results.run["tunables"]["run"] = {**knobs, "run": run_value}
        if run_value:
            self._ksm_write({"run": run_value})

    def _boot(self, stack: ExitStack) -> None:
        spec = self.pb.fleet
        self.say(
            f"booting {spec.count} x {spec.memory_mib} MiB guests "
            f"({spec.backend}, accel {spec.accel})"
        )
        fleet = self.opts.fleet_factory(spec)
        self.fleet = fleet
        stack.callback(self._fleet_down)
        result = fleet.up()  # Fleet applies spec.thp to the QEMUs it starts
        if hasattr(result, "raise_if_failed"):
            result.raise_if_failed()
        self.guest_pids = dict(fleet.pids())
        accel = getattr(fleet, "accel", None)
        self.results.run["accelerator"] = getattr(accel, "accel", accel)
        self.results.run["accelerator_reason"] = getattr(accel, "reason", None)
        self.results.run["fleet_run_id"] = fleet.run_id
        self.results.run["guests"] = [
            {"name": n, "index": i, "pid": p, "thp": host.thp_enabled(p, self.opts.proc)}
            for i, (n, p) in enumerate(self.guest_pids.items())
        ]
        self.say(
            f"fleet {fleet.run_id} ready: {len(self.guest_pids)} guests, "
            f"accel {self.results.run['accelerator']}"
        )
        if self.model is not None:
            self.model.guests = {pid: name for name, pid in self.guest_pids.items()}
        self._sync("boot")

    def _fleet_down(self) -> None:
        if self.fleet is not None:
            self.say("stopping the fleet")
            self.fleet.down()

    def _drop_leftover_merges(self) -> None:
        """Guests are gone, but their KSM pages stay until ksmd rescans: unmerge them now
        (saved() then restores run)."""
        assert self.kernel is not None
        c = self.kernel.read_counters()
        if c.pages_shared or c.ksm_zero_pages:
            self.kernel.write_tunables(run=2, force=True)

    def _start_live(self, stack: ExitStack) -> None:
        from harness.exporter import ExportTarget

        sampler = Sampler(self.pb.sample_interval, self._sample_kernel)
        sampler.start()
        stack.callback(self._stop_sampler, sampler)
        if not self.opts.export:
            return
        targets = []
        qemu = {pid: name for name, pid in self.guest_pids.items()}
        if self.kernel is not None:
            targets.append(ExportTarget(backend=self.kernel, watch=lambda: qemu))
        if self.model is not None:
            model = self.model
            targets.append(ExportTarget(backend=model.snapshot, watch=model.model_pids))
        try:
            server = serve_run(targets, self.state, targets[0].host, self.opts.export)
        except HarnessError as exc:
            if self.opts.export_required:
                raise
            self.say(f"exporter not started: {exc.message}")
            return
        stack.callback(server.shutdown)
        self.say(f"exporting kernel and model series on http://{self.opts.export}/metrics")

    def _stop_sampler(self, sampler: Sampler) -> None:
        sampler.stop()
        if sampler.errors:
            # Each failed sample is a gap in samples.csv: say so rather than leave it silent.
            self.say(f"{len(sampler.errors)} samples failed; the last: {sampler.errors[-1]}")

    # -- sampling and sync points ------------------------------------------------------------
    def _sample_kernel(self) -> None:
        mem = host.mem_available(self.opts.proc)
        if mem is not None:
            self.mem_min = mem if self.mem_min is None else min(self.mem_min, mem)
        if self.kernel is None:
            return
        c = self.kernel.read_counters().present()
        phase = self.state.phase
        t = self.t()
        self.results.add_sample(t, phase, "kernel", c, mem)
        for name, pid in self.guest_pids.items():
            try:
                stat = self.kernel.ksm_stat(pid).as_dict()
            except HarnessError:
                continue
            self.results.add_guest(t, phase, "kernel", name, stat)
            with self.state.lock:
                self.state.guests[("kernel", name)] = stat

    def _sync(self, why: str) -> dict[str, dict[str, Any]]:
        """Kernel and model read at one point: ksmd paused while the guests are captured and
        the model catches up by the kernel's full scans since the last sync."""
        values: dict[str, dict[str, Any]] = {}
        mem = host.mem_available(self.opts.proc)
        values["host"] = {"mem_available": mem, "mem_available_min": self.mem_min}
        paused = False
        delta = 0
        try:
            if self.kernel is not None:
                if self.kernel.read_tunables().run == 1:
                    self.kernel.apply({"run": 0})  # returns once the batch in progress ended
                    paused = True
                kc = self.kernel.read_counters().present()
                values["kernel"] = counters_with_derived(kc, self.kernel.page_size)
                cur = kc.get("full_scans", 0)
                # run=2 resets full_scans on current kernels: count from zero then.
                delta = cur - self.scans_seen if cur >= self.scans_seen else cur
                self.scans_seen = cur
            if self.model is not None:
                self.model.sync(delta)
                values["model"] = counters_with_derived(self.model.counters())
        finally:
            if paused and self.kernel is not None:
                self.kernel.apply({"run": 1})
        self._record(values, why)
        return values

    def _record(self, values: dict[str, dict[str, Any]], why: str) -> None:
        t, phase = self.t(), self.state.phase
        mem = values["host"]["mem_available"]
        for source in ("kernel", "model"):
            if source in values:
                self.results.add_sample(t, phase, source, values[source], mem)
        if self.model is not None:
            for name, stat in self.model.guest_stats().items():
                d = stat.as_dict()
                self.results.add_guest(t, phase, "model", name, d)
                with self.state.lock:
                    self.state.guests[("model", name)] = d
        if "kernel" in values and "model" in values:
            k, m = values["kernel"], values["model"]
            with self.state.lock:
                self.state.delta = {
                    n: k[n] - m[n]
                    for n in k
                    if isinstance(k.get(n), int) and isinstance(m.get(n), int)
                }
        src = values.get(self.primary_name, {})
        self.say(
            f"sync ({why}): {self.primary_name} shared {src.get('pages_shared')} "
            f"sharing {src.get('pages_sharing')} scans {src.get('full_scans')}"
            + (
                f" | model shared {values['model'].get('pages_shared')} "
                f"sharing {values['model'].get('pages_sharing')}"
                if "model" in values and self.kernel is not None
                else ""
            )
        )

    # -- phases and steps ---------------------------------------------------------------------
    def _phase(self, phase: Phase) -> None:
        from harness.playbook.steps import run_step

        self.state.phase = phase.name
        self.say(f"== phase {phase.name} ({len(phase.steps)} steps)")
        rec: dict[str, Any] = {
            "name": phase.name,
            "line": phase.line,
            "t_start": round(self.t(), 3),
            "waits": [],
            "agent": [],
            "verify": {},
            "expectations": [],
            "sweeps": [],
        }
        self.phase_rec = rec
        self.results.run["phases"].append(rec)
        start = self._sync(f"{phase.name} start")
        rec["counters"] = {s: {"start": start[s]} for s in ("kernel", "model") if s in start}
        self.phase_start = start
        try:
            for step in phase.steps:
                run_step(self, step)
        finally:
            end = self._sync(f"{phase.name} end")
            rec["t_end"] = round(self.t(), 3)
            for s, c in rec["counters"].items():
                c["end"] = end.get(s, {})
                c["delta"] = {
                    n: c["end"][n] - v
                    for n, v in c["start"].items()
                    if isinstance(v, int | float) and isinstance(c["end"].get(n), int | float)
                }

    def context(self, values: dict[str, dict[str, Any]]) -> Context:
        return Context(
            values=values,
            start=self.phase_start,
            primary=self.primary_name,
            verify=self.phase_rec.get("verify") or None,
        )

    def _ksm_write(self, values: dict[str, int | str]) -> None:
        """Write knobs to the kernel and the model; the model catches up first."""
        if (
            self.kernel is not None
            and self.model is not None
            and self.kernel.read_tunables().run == 1
        ):
            self._sync("before ksm write")
        if self.kernel is not None:
            self.kernel.apply(values)
            self.scans_seen = self.kernel.read_counters().full_scans or 0
        if self.model is not None:
            self.model.backend.apply(values, force=True)
            self.model.publish()

    # -- the end --------------------------------------------------------------------------------
    def _finish(self, error: BaseException | None) -> None:
        run = self.results.run
        run["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        run["duration_seconds"] = round(self.t(), 2)
        if self.model is not None:
            run["shadow"] = self.model.summary()
            names = self.model.guests
            caps = sorted(
                (c for c in self.model.last_caps if c.pid in names), key=lambda c: names[c.pid]
            )
            if caps:
                run["sharing_matrix"] = {
                    "guests": [self.model.guests[c.pid] for c in caps],
                    "pages": sharing_matrix(caps).tolist(),
                }
        status = "error" if error is not None else ("failed" if self.failed else "passed")
        exit_status = 2 if error is not None else (1 if self.failed else 0)
        message = None
        if error is not None:
            message = getattr(error, "message", None) or f"interrupted ({error})"
        run["verdict"] = {
            "status": status,
            "exit_status": exit_status,
            "failed": list(self.failed),
            "error": message,
        }
        try:
            write_results(self.dir, self.results)
            report = render(self.dir, self.results)
            self.opts.echo(f"report: {report}")
        except (OSError, HarnessError) as exc:
            self.opts.echo(f"ksmh: could not write the results to {self.dir}: {exc}")
