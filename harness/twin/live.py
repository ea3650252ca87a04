"""The exporter's twin: a model in lockstep with the host's KSM, and what-if twins beside it.

`ksmh export --twin` starts a Twin in a thread. It watches the kernel's full_scans (a sysfs
read every `poll` seconds); each time the kernel has completed `every` more full scans it
reads the kernel's counters and knobs at once, captures every process KSM scans (one
capture, harness.twin.capture, replayed into every model), makes the main model scan as many
full scans as ksmd did (harness.sides.model.ModelSide.follow) with the kernel's knobs, and
publishes snapshots the exporter reads: source="model", and source="what-if:NAME" for each
what-if. It never pauses ksmd and never writes a knob: it only reads.

- Processes come and go: each capture takes whoever is registered with KSM then; a new one
  gets a model twin, one that exited is reaped from the models.
- Knobs follow the kernel. run=2 on the kernel (full_scans starts again from 0) unmerges the
  models too; max_page_sharing and merge_across_nodes can only change after that, as on the
  kernel.
- A what-if changes some knobs. When they do not change how fast a scan goes, it makes the
  kernel's full scans, scan for scan; with pages_to_scan, sleep_millisecs or smart_scan it
  runs on its own clock (harness.twin.timeline, the host's calibration) for the wall time
  that passed.
- CPU budget (`cpu_budget`, a share of one core): the twin measures what a capture and one
  model scan cost it (its thread's CPU time). At a sync it makes as many of the kernel's
  full scans as the CPU the budget gave it since the last sync pays for (at least one, the
  rest counted in ksm_twin_scans_skipped_total: a converged model loses nothing by them); if
  even one is too dear, it syncs every 2N full scans instead of every N, and comes back down
  towards `every` when there is room again. What-ifs on their own clock get the same
  treatment: they skip wall time they cannot pay for.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import procfs
from harness.errors import HarnessError
from harness.ksm.model import ModelBackend
from harness.ksm.sysfs import SysfsBackend
from harness.ksm.types import COUNTER_NAMES
from harness.shadow import ProcessCapture
from harness.sides.model import ModelSide
from harness.twin.calibration import Calibration
from harness.twin.capture import IncrementalCapture
from harness.twin.knobs import RATE_KNOBS
from harness.twin.timeline import CpuEstimate, Timeline

# Knobs the kernel refuses to change while pages are merged: a model changes them after run=2.
EBUSY_KNOBS = ("max_page_sharing", "merge_across_nodes")
WARMUP_SCANS = 4  # scans a new model makes at once when ksmd has been running already
# Compared with the kernel (the scan counters count from the twin's start in a model).
DELTA_COUNTERS = tuple(
    n for n in COUNTER_NAMES if n not in ("pages_scanned", "pages_skipped", "full_scans")
)


@dataclass
class ModelTwin:
    """One model the twin keeps: the main one (knobs = the kernel's) or a what-if."""

    source: str  # "model" or "what-if:NAME"
    side: ModelSide
    overrides: dict[str, int | str] = field(default_factory=dict)
    timeline: Timeline | None = None  # what-ifs that scan at their own pace
    cpu: CpuEstimate | None = None
    delta: dict[str, int] = field(default_factory=dict)  # kernel - this model, at the last sync
    cpu_seconds: float = 0.0  # the model's estimate of ksmd's CPU

    @property
    def kernel(self) -> Any:
        return self.side.model.kernel


@dataclass
class TwinStats:
    """What the twin's own series show (read by harness.twin.collector)."""

    captures: int = 0
    capture_seconds: float = 0.0  # the last capture
    captured_pages: int = 0  # present pages in the last capture
    captured_processes: int = 0
    pages_read: int = 0  # of them, read and hashed (the rest were unchanged KSM pages)
    lag_full_scans: int = 0  # kernel full_scans now - the scans the models follow
    scans_followed: int = 0
    scans_skipped: int = 0  # kernel scans the main model did not replay (CPU budget)
    every: int = 1  # capture every N full scans now
    cpu_seconds: float = 0.0  # the twin's own CPU time
    errors: int = 0
    last_error: str = ""


class Twin:
    """See the module docstring. `step()` is one iteration (tests call it directly);
    `start()`/`stop()` run it in a thread."""

    def __init__(
        self,
        kernel: SysfsBackend,
        *,
        what_ifs: Sequence[tuple[str, Mapping[str, int | str]]] = (),
        calibration: Calibration | None = None,
        every: int = 1,
        cpu_budget: float = 0.05,
        poll: float = 0.2,
        proc: Path = procfs.PROC,
        profile: str = "host",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if every < 1:
            raise HarnessError(f"--twin-every {every}: must be 1 or more")
        if not 0 < cpu_budget <= 1:
            raise HarnessError(f"twin CPU budget {cpu_budget}: must be above 0, at most 1")
        self.k = kernel
        self.proc = proc
        self.cal = calibration
        self.every_min = every
        self.cpu_budget = cpu_budget
        self.poll = poll
        self.clock = clock
        self.capture = IncrementalCapture(proc, fallback_hugepage=False)
        self.lock = threading.Lock()
        self.stats = TwinStats(every=every)
        self.models = [self._model("model", {}, profile)]
        for name, knobs in what_ifs:
            self.models.append(self._model(f"what-if:{name}", dict(knobs), profile))
        self.followed: int | None = None  # kernel full_scans the models are aligned with
        self._kernel: dict[str, int] = {}  # the kernel's counters at the last sync
        self.last_wall = clock()
        self._cpu_window: list[tuple[float, float]] = []  # (time, twin CPU), last 5 minutes
        self._scan_cost: dict[str, float] = {}  # source -> CPU seconds per model full scan
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def _model(self, source: str, overrides: dict[str, int | str], profile: str) -> ModelTwin:
        side = ModelSide(ModelBackend(profile=profile), self.proc, include_others=True)
        side.published.source = source
        t = ModelTwin(source, side, overrides)
        rate = any(k in RATE_KNOBS for k in overrides)
        if rate:
            from harness.twin.calibration import DEFAULT

            t.timeline = Timeline(t.kernel, self.cal or DEFAULT)
        if self.cal is not None:
            t.cpu = CpuEstimate(t.kernel, self.cal)
        return t

    @property
    def main(self) -> ModelTwin:
        return self.models[0]

    # -- one iteration -----------------------------------------------------------------------
    def step(self) -> bool:
        """Look at the kernel once; sync the models if it completed enough full scans.
        Returns True when the models were synced."""
        c0 = time.thread_time()
        try:
            return self._step()
        except HarnessError as exc:
            with self.lock:
                self.stats.errors += 1
                self.stats.last_error = exc.message
            return False
        finally:
            self._account(time.thread_time() - c0)

    def _step(self) -> bool:
        value = self.k.read_field("full_scans")  # one sysfs read per poll, not eleven
        scans = value if isinstance(value, int) else 0
        if self.followed is None:
            return self._sync(scans, first=True)
        if scans < self.followed:  # run=2 resets full_scans: the kernel unmerged everything
            self._unmerge_models()
            self.followed = 0
        with self.lock:
            self.stats.lag_full_scans = scans - self.followed
        if scans - self.followed >= self.stats.every:
            return self._sync(scans)
        return False

    def _sync(self, scans: int, first: bool = False) -> bool:
        counters = self.k.read_counters().present()  # at the scan boundary, or close to it
        knobs = self.k.read_tunables().present()
        targets = {u.pid: f"{u.comm}-{u.pid}" for u in procfs.ksm_users(self.proc)}
        t0, c0 = time.perf_counter(), time.thread_time()
        caps = self.capture.capture(targets)
        seconds, cap_cpu = time.perf_counter() - t0, time.thread_time() - c0
        if first:  # ksmd has been scanning this memory already: catch up at once
            made = min(scans, WARMUP_SCANS) if knobs.get("run") == 1 else 0
        else:
            made = scans - (self.followed or 0)
        now = self.clock()
        wall = now - self.last_wall
        self.last_wall = now
        afford = made if first else self._affordable(made, wall, cap_cpu)
        for m in self.models:
            self._follow(m, caps, knobs, afford, wall, warmup=first)
        self.followed = scans
        with self.lock:
            s = self.stats
            if self.capture.failures:
                s.errors += len(self.capture.failures)
                s.last_error = "capture: " + self.capture.failures[-1]
            s.captures += 1
            s.capture_seconds = seconds
            s.captured_pages = sum(c.present for c in caps)
            s.captured_processes = len(caps)
            s.pages_read = sum(c.bytes_read for c in caps) // 4096
            s.scans_followed += made
            s.scans_skipped += made - afford
            s.lag_full_scans = 0
            self._kernel = dict(counters)
            for m in self.models:
                mc = m.side.counters()
                m.delta = {
                    n: int(counters[n]) - int(mc[n])
                    for n in DELTA_COUNTERS
                    if n in counters and n in mc
                }
        return True

    def _affordable(self, made: int, wall: float, capture_cpu: float) -> int:
        """How many of the kernel's `made` full scans the models can make within the budget
        of the `wall` seconds since the last sync (see the module docstring)."""
        if made <= 0:
            return 0
        per_scan = sum(self._scan_cost.get(m.source, 0.0) for m in self.models)
        room = self.cpu_budget * wall - capture_cpu
        n = made if per_scan <= 0 else int(room // per_scan)
        with self.lock:
            s = self.stats
            if n < 1:
                s.every = min(2 * s.every, 1 << 16)  # even one scan is too dear: sync less often
            elif n >= 2 * made and s.every > self.every_min:
                s.every = max(self.every_min, s.every // 2)
        return max(1, min(made, n))

    def _follow(
        self,
        m: ModelTwin,
        caps: list[ProcessCapture],
        knobs: Mapping[str, int | str],
        scans: int,
        wall: float,
        warmup: bool = False,
    ) -> None:
        c0 = time.thread_time()
        self._mirror(m, knobs)
        if m.timeline is None:
            before = m.kernel.full_scans
            m.side.follow(scans, caps)
            made = m.kernel.full_scans - before
        else:
            m.side.refresh(caps)
            made = self._scans_on_own_clock(m, scans) if warmup and scans else 0
            made += self._advance(m, wall)
            m.side.publish()
        m.side.drain_scans()  # the per-scan series is the runner's; kept here, it would grow
        spent = time.thread_time() - c0
        if made > 0:
            # What one scan costs this model, smoothed: the next syncs plan with it.
            old = self._scan_cost.get(m.source)
            per = spent / made
            self._scan_cost[m.source] = per if old is None else 0.7 * old + 0.3 * per
        if m.cpu is not None:
            m.cpu_seconds = m.cpu.update()
        else:
            m.cpu_seconds = float(m.kernel.ksmd_runtime_ns) / 1e9

    def _advance(self, m: ModelTwin, wall: float) -> int:
        """A what-if on its own clock: ksmd batches for `wall` more seconds, as far as the
        budget pays for (the rest of the time passes without scanning). Returns its scans."""
        assert m.timeline is not None
        k = m.kernel
        end = m.timeline.t_ns + wall * 1e9
        scans0 = k.full_scans
        if k.ksmd_should_run() and int(k.pages_to_scan):
            deadline = time.thread_time() + self.cpu_budget * wall
            while m.timeline.t_ns < end and time.thread_time() < deadline:
                m.timeline.batch()
        m.timeline.t_ns = max(m.timeline.t_ns, end)
        k.now_ns = int(m.timeline.t_ns)
        return int(k.full_scans - scans0)

    def _scans_on_own_clock(self, m: ModelTwin, scans: int) -> int:
        assert m.timeline is not None
        k = m.kernel
        start = k.full_scans
        while k.ksmd_should_run() and int(k.pages_to_scan) and k.full_scans < start + scans:
            m.timeline.batch()
        return int(k.full_scans - start)

    def _mirror(self, m: ModelTwin, knobs: Mapping[str, int | str]) -> None:
        """The kernel's knobs (with the what-if's over them) into the model."""
        want = {k: v for k, v in knobs.items() if k != "run"}
        want.update(m.overrides)
        have = m.side.knobs()
        busy = [n for n in EBUSY_KNOBS if n in want and n in have and want[n] != have[n]]
        if busy and m.side.counters().get("pages_shared"):
            m.side.apply({"run": 2})  # as the kernel must have done before changing them
        if "advisor_mode" in want:
            # The kernel's advisor shows in the pages_to_scan it chose, read at every sync; a
            # model's own advisor would steer by the model's clock instead.
            want["advisor_mode"] = "none"
        changed = {k: v for k, v in want.items() if have.get(k) != v}
        run = knobs.get("run", 0)
        if changed:
            m.side.apply({**changed, "run": have.get("run", 0)})
        if have.get("run") != run:
            m.side.apply({"run": run})

    def _unmerge_models(self) -> None:
        for m in self.models:
            m.side.apply({"run": 2})

    # -- CPU budget --------------------------------------------------------------------------
    def _account(self, cpu: float) -> None:
        now = self.clock()
        with self.lock:
            self.stats.cpu_seconds += cpu
            total = self.stats.cpu_seconds
        self._cpu_window.append((now, total))
        while len(self._cpu_window) > 2 and self._cpu_window[0][0] < now - 300.0:
            self._cpu_window.pop(0)

    def last_kernel(self) -> dict[str, int]:
        """The kernel's counters at the last sync (what the deltas were computed from)."""
        with self.lock:
            return dict(self._kernel)

    def model_cpu(self, source: str) -> float | None:
        """The estimate of ksmd's CPU time by the model `source` (for ksm_ksmd_cpu_seconds)."""
        with self.lock:
            return next((m.cpu_seconds for m in self.models if m.source == source), None)

    def cpu_share(self) -> float | None:
        """The twin's CPU share of one core over its current window."""
        if len(self._cpu_window) < 2:
            return None
        (t0, c0), (t1, c1) = self._cpu_window[0], self._cpu_window[-1]
        return (c1 - c0) / (t1 - t0) if t1 > t0 else None

    # -- the thread ----------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="ksmh-twin", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.step()
            self._stop.wait(self.poll)

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def snapshot(self) -> tuple[TwinStats, list[tuple[str, dict[str, int], float]]]:
        """A copy of the stats and each model's (source, delta, CPU estimate), for scrapes."""
        with self.lock:
            stats = TwinStats(**vars(self.stats))
            models = [(m.source, dict(m.delta), m.cpu_seconds) for m in self.models]
        return stats, models


def ratio(delta: int, kernel: int | None) -> float:
    """delta relative to the kernel's value (0 when both are 0)."""
    if not kernel:
        return 0.0 if delta == 0 else math.copysign(1.0, delta)
    return delta / abs(kernel)
