"""`ksmh calibrate`: measure what ksmd costs on this host (harness.twin.calibration).

The real ksmd scans real memory of child processes whose contents we choose, while the model
scans a shadow capture of the same memory and counts its page visits by kind. ksmd's CPU time
(/proc/<ksmd>/schedstat in ns, else /proc/<ksmd>/stat in clock ticks) is read at scan
boundaries, where ksmd is asleep: pages_to_scan is larger than the memory, so a batch is one
full scan, followed by a long sleep in which we read. Each scan is one observation
(CPU = sum of cost x visits by kind + one batch); a least-squares fit with non-negative costs
gives the cost per visit kind and per batch. The experiments, each from a clean state (run=2):

  unique      N pages of distinct contents: scan 1 only checksums (first), later scans search
              the trees and stay unique;
  groups      N pages in groups of 4 identical ones (4 guests sharing a page): scan 2 inserts
              one page of each group, merges a pair and joins two into the stable node;
  chained     a quarter of the N pages unique, the rest identical: scan 2 builds a
              stable_node_chain whose dups are all full (max_page_sharing 256), so every
              later search of a unique page examines each dup (ksm_model's dups_walked);
  identical   N identical pages: scan 2 merges most pages into the chain's dups (chained);
              later scans see merged pages;
  batches     the merged memory again at pages_to_scan 64 and sleep 0: the cost of a batch;
  sleeps      one batch per scan at sleep_millisecs 0, 20, 50: how long ksmd really sleeps.

Everything runs under the host KSM lock with the knobs journaled and restored. Other processes
using KSM would be scanned too, so calibration refuses to run beside them.
"""

from __future__ import annotations

import os
import secrets
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from harness import procfs
from harness.errors import HarnessError, KsmUnavailable
from harness.ksm.sysfs import SysfsBackend
from harness.run import PIPE, Popen, spawn
from harness.twin.calibration import TERMS, Calibration, msecs_to_jiffies, now_text, release
from harness.twin.timeline import Meter

# A child whose only mergeable memory is one buffer (THP off) of the given kind.
CHILD = r"""
import mmap, sys
n, kind, salt, index = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
buf = mmap.mmap(-1, n * 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
buf.madvise(mmap.MADV_NOHUGEPAGE)
words = memoryview(buf).cast("Q")
for i in range(n):
    words[i * 512] = salt
    if kind == "unique":
        words[i * 512 + 1] = index * n + i + 1
    elif kind == "groups":
        words[i * 512 + 1] = i + 1
    elif kind == "chained" and i % 4 == 0:  # unique pages among a chain of full dups
        words[i * 512 + 1] = (index + 1) * n + i + 1
    else:
        words[i * 512 + 1] = 1
buf.madvise(mmap.MADV_MERGEABLE)
print("ready", flush=True)
sys.stdin.readline()
"""
# Experiments run over CHILDREN processes (like a fleet's guests: many mms, their page tables
# and VMAs): unique pages differ everywhere, "groups" repeat each page once per child (a page
# the guests share), "identical" pages are the same everywhere.
CHILDREN = 4

# ksmd runs as it does by default, sleeping between batches, so its caches go cold between
# batches as they do in use (a single hot batch per scan costs 1.3-1.7x less per page here).
SLEEP_MS = 20
PTS = (500, 4000)  # pages_to_scan: the one of every experiment, and a bigger one for two
SLEEPS_MS = (0, 50)  # other sleeps measured for the wall-clock model (20 comes with the scans)
Echo = Callable[[str], None]


@dataclass
class Observation:
    """One measured stretch: ksmd's CPU, and the cost terms the model counted meanwhile."""

    experiment: str
    cpu_ns: float
    terms: list[float]

    def as_dict(self) -> dict[str, Any]:
        return {
            "experiment": self.experiment,
            "cpu_ns": round(self.cpu_ns),
            "terms": {t: round(x, 1) for t, x in zip(TERMS, self.terms, strict=True)},
        }

    @property
    def pages(self) -> float:
        return self.terms[0] + self.terms[1] + sum(self.terms[3:6])


class KsmdCpu:
    """ksmd's CPU time in ns, from schedstat (ns) or stat (clock ticks)."""

    def __init__(self, proc: Path = procfs.PROC) -> None:
        pid = procfs.ksmd_pid(proc)
        if pid is None:
            raise KsmUnavailable("no ksmd thread in /proc", hint="is KSM built in (CONFIG_KSM)?")
        self.pid, self.proc = pid, proc
        self.source = "schedstat" if procfs.sched_runtime_ns(pid, proc) is not None else "stat"

    def ns(self) -> float:
        if self.source == "schedstat":
            v = procfs.sched_runtime_ns(self.pid, self.proc)
            if v is not None:
                return float(v)
        return procfs.cpu_seconds(self.pid, self.proc) * 1e9


class Calibrator:
    """Runs the experiments of the module docstring on `backend` (lock held by the caller)."""

    def __init__(self, backend: SysfsBackend, pages: int = 32768, echo: Echo | None = None):
        if pages < 4096:
            raise HarnessError(f"--pages {pages}: too few to measure", hint="use 4096 or more")
        self.k = backend
        self.n = pages
        self.echo = echo or (lambda s: print(s, file=sys.stderr, flush=True))
        self.cpu = KsmdCpu(backend.proc)
        self.salt = secrets.randbits(63)
        self.obs: list[Observation] = []
        self.sleeps: dict[int, float] = {}  # sleep_millisecs -> ns between batches
        self.gaps: list[float] = []  # ns between batches at SLEEP_MS, one per observed scan

    # -- the pieces -------------------------------------------------------------------------
    @contextmanager
    def children(self, kind: str, pages: int) -> Iterator[list[Popen[bytes]]]:
        """CHILDREN processes of `kind`, `pages` pages in all."""
        procs: list[Popen[bytes]] = []
        try:
            for i in range(CHILDREN):
                argv = [str(pages // CHILDREN), kind, str(self.salt), str(i)]
                p = spawn([sys.executable, "-c", CHILD, *argv], stdin=PIPE, stdout=PIPE)
                procs.append(p)
                assert p.stdout is not None
                if p.stdout.readline() != b"ready\n":
                    raise HarnessError(f"a calibration child ({kind}) did not start")
            yield procs
        finally:
            for p in procs:
                p.kill()
                p.wait(10)

    def _reset(self, pages_to_scan: int, sleep_ms: int) -> None:
        self.k.apply({"run": 2}, force=True)
        self.k.apply({"pages_to_scan": pages_to_scan, "sleep_millisecs": sleep_ms, "run": 0})

    def _model_of(self, pids: list[int]) -> Any:
        """A fresh model holding a shadow capture of the children, with the kernel's knobs."""
        from harness.ksm.model import ModelBackend
        from harness.shadow import Shadow

        model = ModelBackend(profile="host").kernel
        knobs = self.k.read_tunables().present()
        for name in ("pages_to_scan", "sleep_millisecs", "max_page_sharing", "smart_scan",
                     "use_zero_pages", "merge_across_nodes"):  # fmt: skip
            if name in knobs:
                model.sysfs.write(name, str(knobs[name]))
        shadow = Shadow(model, self.k.proc)
        shadow.replay(shadow.capture({pid: f"calibration-{i}" for i, pid in enumerate(pids)}))
        model.sysfs.write("run", "1")
        return model

    def _full_scans(self) -> int:
        return self.k.read_counters().full_scans or 0

    def _marks(self, until: int, timeout: float = 600.0) -> list[tuple[int, float, float]]:
        """(full_scans, ksmd CPU ns, monotonic s) at each scan end up to `until`: polled every
        ms, CPU read while ksmd sleeps after the scan's last batch. Should two ends fall
        between polls, the mark covers both (and says so by its count)."""
        marks: list[tuple[int, float, float]] = []
        seen = self._full_scans()
        deadline = time.monotonic() + timeout
        while seen < until:
            if time.monotonic() > deadline:
                raise HarnessError(f"ksmd made no full scan in {timeout:g} s during calibration")
            time.sleep(0.001)
            now = self._full_scans()
            if now != seen:
                t = time.monotonic()
                time.sleep(0.002)  # ksmd finishes its batch and goes to sleep
                seen = now
                marks.append((now, self.cpu.ns(), t))
        return marks

    def _terms(self, model: Any, meter: Meter, full_scans: int) -> list[float]:
        """Run the model to `full_scans`, batch for batch as the kernel did (same
        pages_to_scan), and sum its cost terms."""
        total = [0.0] * len(TERMS)
        while model.full_scans < full_scans:
            _, terms = meter.batch(int(model.pages_to_scan))
            total = [a + b for a, b in zip(total, terms, strict=True)]
        return total

    def scans(self, kind: str, count: int, pages: int | None = None, pts: int = PTS[0]) -> None:
        """`count` full scans over children of `kind` (`pages` pages, default the
        calibrator's) in batches of `pts` pages: one observation per scan."""
        self._reset(pts, SLEEP_MS)
        base = self._full_scans()  # 0 where run=2 resets it
        with self.children(kind, pages or self.n) as procs:
            model = self._model_of([p.pid for p in procs])
            c0, t0 = self.cpu.ns(), time.monotonic()
            self.k.apply({"run": 1})
            marks = self._marks(base + count)
            if kind == "identical" and pts == PTS[0]:
                self._sleeps()
        self.k.apply({"run": 2}, force=True)
        meter = Meter(model)
        prev = (base, c0, t0)
        for scan, cpu, t in marks:
            terms = self._terms(model, meter, scan - base)
            label = (
                f"{kind} scan {scan - base}"
                + (f" ({scan - prev[0]} scans)" if scan - prev[0] > 1 else "")
                + f", batches of {pts}"
            )
            self.obs.append(Observation(label, cpu - prev[1], terms))
            batches = terms[-1]
            if pts == PTS[0] and batches >= 20:
                # ksmd's wall time between batches at SLEEP_MS: the scan's time minus its CPU.
                self.gaps.append(((t - prev[2]) * 1e9 - (cpu - prev[1])) / batches)
            prev = (scan, cpu, t)
        per = [o.cpu_ns / max(1.0, o.pages) / 1e3 for o in self.obs[-len(marks) :]]
        self.echo(f"  {kind} ({pages or self.n} pages, batches of {pts}): ksmd "
                  + ", ".join(f"{x:.2f}" for x in per) + " us per page, scan by scan")  # fmt: skip

    def _sleeps(self) -> None:
        """One batch per scan (the merged children) at each of SLEEPS_MS: wall time between
        batches, less ksmd's CPU."""
        self.k.apply({"pages_to_scan": self.n + 4096})
        for ms in SLEEPS_MS:
            self.k.apply({"sleep_millisecs": ms})
            start = self._full_scans() + 1
            first = self._marks(start)[-1]
            n = max(10, min(40, int(2000 / (ms + 5))))
            last = self._marks(start + n)[-1]
            self.sleeps[ms] = ((last[2] - first[2]) * 1e9 - (last[1] - first[1])) / n
            self.echo(f"  sleep_millisecs {ms}: {self.sleeps[ms] / 1e6:.2f} ms between batches")

    # -- the whole calibration ----------------------------------------------------------------
    def run(self) -> Calibration:
        others = procfs.ksm_users(self.k.proc, exclude={os.getpid()})
        if others:
            raise HarnessError(
                f"{len(others)} process(es) use KSM: " + procfs.describe_users(others),
                hint="calibrate on a quiet host (before guests start): ksmd would scan them too",
            )
        t = self.k.read_tunables().present()
        fixed: dict[str, int | str] = {"smart_scan": 0, "use_zero_pages": 0}
        if "advisor_mode" in t:
            fixed["advisor_mode"] = "none"
        self.k.apply({"run": 2}, force=True)
        self.k.apply({**fixed, "max_page_sharing": 256, "run": 0})
        self.echo(f"calibrating ksmd on {self.n} pages per experiment (cpu from {self.cpu.source})")
        self.scans("unique", 4)
        self.scans("unique", 4, pages=max(1024, self.n // 16))  # a shallower unstable tree
        self.scans("groups", 3)
        self.scans("chained", 4)
        self.scans("identical", 3)
        self.scans("unique", 3, pts=PTS[1])  # fewer, bigger batches: the cost of a batch
        self.scans("identical", 3, pts=PTS[1])
        return self.result()

    def result(self) -> Calibration:
        costs, err = fit(self.obs)
        hz = host_hz(self.k.proc)
        gap = float(np.median(self.gaps)) if self.gaps else self.sleeps.get(SLEEP_MS, 0.0)
        self.sleeps[SLEEP_MS] = gap
        extras = [(gap * hz / 1e9) - msecs_to_jiffies(SLEEP_MS, hz)]
        return Calibration(
            release=release(),
            hz=hz,
            costs={t: round(costs[i], 2) for i, t in enumerate(TERMS)},
            sleep_extra=round(float(np.mean(extras)), 3),
            sleep0_ns=round(max(0.0, self.sleeps.get(0, 0.0)), 1),
            measured=now_text(),
            cpu_source=self.cpu.source,
            observations=[o.as_dict() for o in self.obs]
            + [
                {"experiment": f"sleep {ms} ms", "ns_between_batches": round(v)}
                for ms, v in self.sleeps.items()
            ],
            fit_error=round(err, 4),
        )


def fit(obs: list[Observation]) -> tuple[list[float], float]:
    """Non-negative least squares, each observation weighted by 1/its CPU (relative error):
    the cost of each term (TERMS order), and the relative RMS error of the fit."""
    a = np.array([o.terms for o in obs], dtype=float)
    b = np.array([o.cpu_ns for o in obs], dtype=float)
    w = 1.0 / np.maximum(b, 1.0)
    active = [i for i in range(a.shape[1]) if a[:, i].any()]
    x = np.zeros(a.shape[1])
    while active:
        sol, *_ = np.linalg.lstsq(a[:, active] * w[:, None], b * w, rcond=None)
        if (sol >= 0).all():
            x[active] = sol
            break
        active.pop(int(np.argmin(sol)))  # a cost cannot be negative: drop it and refit
    rel = (a @ x - b) * w
    return [float(v) for v in x], float(np.sqrt(np.mean(rel**2)))


def host_hz(proc: Path = procfs.PROC) -> int:
    """CONFIG_HZ: from /proc/config.gz or /boot/config-RELEASE (ksm_model.hostprobe's reader),
    else measured from jiffies in /proc/timer_list over 0.2 s, else 250."""
    from ksm_model.hostprobe import config_hz, read_config

    hz = config_hz(read_config(proc, Path("/boot"), release())[0])
    if hz:
        return hz
    try:
        j0, t0 = _jiffies(proc), time.monotonic()
        time.sleep(0.2)
        j1, t1 = _jiffies(proc), time.monotonic()
        measured = (j1 - j0) / (t1 - t0)
        return min((100, 250, 300, 1000), key=lambda hz: abs(hz - measured))
    except (OSError, ValueError):
        return 250


def _jiffies(proc: Path) -> int:
    for line in (proc / "timer_list").read_text().splitlines():
        if line.startswith("jiffies:"):
            return int(line.split()[1])
    raise ValueError("no jiffies line")
