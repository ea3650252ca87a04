"""Run a Scenario on ksm_model: the same writes, in the same order, as the kernel runner.

The kernel runner's sequence is mirrored step by step (issue 3): run=0, run=2, the tunables
(with the same huge pages_to_scan), the processes created, filled and madvised one at a time,
run=1, then per full scan: run until full_scans moves, run=0, sample, actions, the
sleep_millisecs toggle that ends ksmd's sleep, run=1 (so the next scan starts at once on both
sides: what is jiffies-exact between scans is then the same). The model is reached through the one
adapter, harness.ksm.model.ModelBackend.
"""

from __future__ import annotations

import importlib
from typing import Any

from ksm_model.profiles import Profile

from harness.ksm.tunables import WRITE_ORDER
from harness.record import Snapshot
from harness.scenario import tokens as tk
from harness.scenario.errors import ModelUnavailable
from harness.scenario.kernel_runner import (
    BIG_PAGES_TO_SCAN,
    DEFAULT_SLEEP_MS,
    refusal,
    runner_tunables,
)
from harness.scenario.series import ScanSample, Series, relative
from harness.scenario.spec import (
    Action,
    Exit,
    Fork,
    RangeAction,
    Rerun,
    Scenario,
    SetTunable,
    Spawn,
    Write,
    range_of,
)
from harness.scenario.worker import HPAGE


class _Proc:
    """A model process with its buffer's address and size."""

    def __init__(self, proc: Any, addr: int, pages: int) -> None:
        self.proc = proc
        self.addr = addr
        self.pages = pages


class ModelRunner:
    """Runs scenarios on fresh ksm_model kernels (one per run)."""

    def __init__(
        self,
        profile: str | Profile = "host",
        page_size: int = 4096,
        sleep_millisecs: int = DEFAULT_SLEEP_MS,
        pages_to_scan: int = BIG_PAGES_TO_SCAN,
        **model_options: Any,
    ) -> None:
        self.profile = profile
        self.page_size = page_size
        self.sleep_millisecs = sleep_millisecs
        self.pages_to_scan = pages_to_scan
        self.model_options = model_options  # further Kernel options: hz, thp, pt_reclaim, ...
        self._mod = _import_model()

    @classmethod
    def for_host(cls, **kw: Any) -> ModelRunner:
        """A runner whose model is this host's kernel: profile "host", which ModelBackend
        gives the running kernel's CONFIG_HZ, THP mode and CONFIG_PT_RECLAIM."""
        return cls(profile="host", **kw)

    def advice(self, kind: str) -> int:
        """The model's MADV_* value for 'mergeable', 'unmergeable' or 'dontneed'."""
        name = "MADV_" + kind.upper()
        value = getattr(self._mod, name, None)
        if value is None:
            raise ModelUnavailable(f"ksm_model has no {name}, needed by a {kind} action")
        return int(value)

    def new_model(self) -> Any:
        """A fresh ModelBackend (the one adapter) for this runner's profile, page size and
        model options."""
        from harness.ksm.model import ModelBackend, host_settings

        host = host_settings(self.profile)
        options = {**(host.kernel_args() if host else {}), **self.model_options}
        kernel = self._mod.Kernel(
            profile=self.profile, numa_nodes=1, page_size=self.page_size, **options
        )
        return ModelBackend(kernel)

    def run(self, scenario: Scenario) -> Series:
        """Run the scenario on a fresh model kernel and return its series."""
        m = self.new_model()
        k, sysfs = m.kernel, m.kernel.sysfs
        sysfs.write("run", "0")
        sysfs.write("run", "2")
        have = m.read_tunables()
        numa, advisor = have.merge_across_nodes is not None, have.advisor_mode is not None
        absent = frozenset(k for k, v in have.as_dict().items() if v is None)
        tunables = runner_tunables(
            scenario, self.pages_to_scan, self.sleep_millisecs, numa, advisor, absent
        )
        for name in WRITE_ORDER:
            if name in tunables:
                sysfs.write(name, str(tunables[name]))
        procs: dict[str, _Proc] = {}
        for spec in scenario.processes:
            procs[spec.name] = self._start(k, spec.name, spec.pages, spec.thp)
        base = m.read_counters().as_dict()
        initial = self._snapshot(m, procs, base)
        samples: list[ScanSample] = []
        sleep = int(tunables["sleep_millisecs"])
        sysfs.write("run", "1")
        for scan in range(1, scenario.scans + 1):
            k.run_until(full_scans=int(sysfs.read("full_scans")) + 1)
            sysfs.write("run", "0")
            end = self._snapshot(m, procs, base)
            actions = scenario.actions_after(scan)
            outcomes = tuple(self._apply(k, a, procs) for a in actions)
            for a in actions:
                if isinstance(a, SetTunable) and a.name == "sleep_millisecs":
                    sleep = a.value
            after = self._snapshot(m, procs, base) if actions else None
            samples.append(ScanSample(scan, end, after, outcomes))
            if scan < scenario.scans:
                # KernelRunner._resume: a changed sleep_millisecs (written while run=0) ends
                # ksmd's sleep, then run=1 starts the next scan at once.
                current = int(sysfs.read("sleep_millisecs"))
                sysfs.write("sleep_millisecs", str(sleep + 1 if current == sleep else sleep))
                sysfs.write("run", "1")
        return Series("model", scenario, initial, tuple(samples))

    def _start(self, k: Any, name: str, pages: tuple[str, ...], thp: bool) -> _Proc:
        ps = self.page_size
        proc = k.spawn(name=name)
        # As the worker: a THP buffer starts on a 2 MiB boundary and is advised before use.
        addr = proc.mmap(len(pages) * ps, align=HPAGE if thp else 0)
        proc.madvise(addr, len(pages) * ps, self.advice("hugepage" if thp else "nohugepage"))
        i = 0
        for run in tk.encode_runs(pages):
            token, _, count = run.rpartition("*")
            self._fill(proc, addr + i * ps, token, int(count))
            i += int(count)
        proc.madvise(addr, len(pages) * ps, self.advice("mergeable"))
        return _Proc(proc, addr, len(pages))

    def _fill(self, proc: Any, addr: int, token: str, count: int) -> None:
        ps = self.page_size
        byte = tk.fill_byte(token)
        if byte is not None:
            proc.fill(addr, count * ps, byte)
            return
        data = tk.page_bytes(token, ps)
        for j in range(count):
            proc.write(addr + j * ps, data)

    def _apply(self, k: Any, action: Action, procs: dict[str, _Proc]) -> str:
        if isinstance(action, Write):
            p = procs[action.process]
            for page in action.pages:
                self._fill(p.proc, p.addr + page * self.page_size, action.content, 1)
        elif isinstance(action, RangeAction):
            p = procs[action.process]
            first, count = range_of(action, p.pages)
            ps = self.page_size
            p.proc.madvise(p.addr + first * ps, count * ps, self.advice(action.kind))
        elif isinstance(action, Spawn):
            spec = action.spec
            procs[spec.name] = self._start(k, spec.name, spec.pages, spec.thp)
        elif isinstance(action, Fork):
            p = procs[action.process]
            procs[action.child] = _Proc(p.proc.fork(), p.addr, p.pages)
        elif isinstance(action, Exit):
            procs.pop(action.process).proc.exit()
        elif isinstance(action, Rerun):
            k.sysfs.write("run", "2")
        elif isinstance(action, SetTunable):
            try:
                k.sysfs.write(action.name, str(action.value))
            except OSError as exc:
                return refusal(exc.errno)
        return "ok"

    def _snapshot(self, m: Any, procs: dict[str, _Proc], base: dict[str, int | None]) -> Snapshot:
        counters = relative(m.read_counters().as_dict(), base)
        stats = {}
        for name, p in procs.items():
            stat = m.stat_record(p.proc.pid)
            stat["anon_huge_kb"] = p.proc.anon_huge_bytes(p.addr, p.pages * self.page_size) >> 10
            stats[name] = stat
        return Snapshot(counters=counters, processes=stats)


def _import_model() -> Any:
    try:
        mod = importlib.import_module("ksm_model")
    except ImportError as exc:
        raise ModelUnavailable(
            f"cannot import ksm_model: {exc}", hint="pip install -e kernel-model"
        ) from None
    for name in ("Kernel", "MADV_MERGEABLE", "MADV_UNMERGEABLE"):
        if not hasattr(mod, name):
            raise ModelUnavailable(
                f"ksm_model has no {name} (the model is not built yet?)",
                hint="issue 3 defines the API the scenario runner drives",
            )
    return mod


def run_on_model(scenario: Scenario, profile: str | Profile = "host") -> Series:
    """Run the scenario on a fresh ksm_model Kernel and return the model series."""
    return ModelRunner(profile=profile).run(scenario)
