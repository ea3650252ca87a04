"""Run a Scenario on ksm_model: the same writes, in the same order, as the kernel runner.

The kernel runner's sequence is mirrored step by step through the model's public API (issue 3):
run=0, run=2, the tunables (with the same huge pages_to_scan), the processes created, filled and
madvised one at a time, run=1, then per full scan: run until full_scans moves, run=0, sample,
actions, run=1 and the sleep_millisecs toggle that ends ksmd's sleep (so the next scan starts
at once, on both sides: what is jiffies-exact between scans is then the same).

The model is reached through a Protocol rather than its concrete classes, so this module
depends on the documented API only.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any, Protocol, cast

from harness.ksm.tunables import WRITE_ORDER
from harness.ksm.types import COUNTER_NAMES
from harness.scenario import tokens as tk
from harness.scenario.errors import ModelUnavailable
from harness.scenario.kernel_runner import (
    BIG_PAGES_TO_SCAN,
    DEFAULT_SLEEP_MS,
    refusal,
    runner_tunables,
)
from harness.scenario.series import STAT_FIELDS, ScanSample, Series, Snapshot, StatValue, relative
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


class ModelProcess(Protocol):
    pid: int

    def mmap(self, length: int, node: int = 0, align: int = 0) -> int: ...
    def write(self, addr: int, data: bytes) -> None: ...
    def fill(self, addr: int, length: int, byte: int) -> None: ...
    def madvise(self, addr: int, length: int, advice: int) -> None: ...
    def fork(self) -> ModelProcess: ...
    def exit(self) -> None: ...
    def ksm_stat(self) -> Mapping[str, StatValue]: ...
    def anon_huge_bytes(self, addr: int | None = None, length: int | None = None) -> int: ...


class ModelSysfs(Protocol):
    def read(self, name: str) -> str: ...
    def write(self, name: str, value: str) -> None: ...


class ModelKernel(Protocol):
    sysfs: ModelSysfs

    def spawn(self, name: str) -> ModelProcess: ...
    def run_until(self, *, full_scans: int) -> None: ...


class _Proc:
    """A model process with its buffer's address and size."""

    def __init__(self, proc: ModelProcess, addr: int, pages: int) -> None:
        self.proc = proc
        self.addr = addr
        self.pages = pages


class ModelRunner:
    """Runs scenarios on fresh ksm_model kernels (one Kernel per run)."""

    def __init__(
        self,
        profile: str = "6.11",
        page_size: int = 4096,
        sleep_millisecs: int = DEFAULT_SLEEP_MS,
        pages_to_scan: int = BIG_PAGES_TO_SCAN,
        *,
        hz: int = 250,
        thp: str = "madvise",
        pt_reclaim: bool = False,
    ) -> None:
        self.profile = profile
        self.page_size = page_size
        self.sleep_millisecs = sleep_millisecs
        self.pages_to_scan = pages_to_scan
        self.hz = hz
        self.thp = thp
        self.pt_reclaim = pt_reclaim
        self._mod = _import_model()
        self._kernel_cls = self._mod.Kernel
        self.MERGEABLE = int(self._mod.MADV_MERGEABLE)

    @classmethod
    def for_host(cls, **kw: Any) -> ModelRunner:
        """A runner whose model is this host's kernel: profile "host", and the running
        kernel's CONFIG_HZ, THP mode and CONFIG_PT_RECLAIM (ksm_model.hostprobe)."""
        from ksm_model.hostprobe import probe

        host = probe()
        return cls(profile="host", hz=host.hz, thp=host.thp, pt_reclaim=host.pt_reclaim, **kw)

    def advice(self, kind: str) -> int:
        """The model's MADV_* value for 'mergeable', 'unmergeable' or 'dontneed'."""
        name = "MADV_" + kind.upper()
        value = getattr(self._mod, name, None)
        if value is None:
            raise ModelUnavailable(f"ksm_model has no {name}, needed by a {kind} action")
        return int(value)

    def new_kernel(self) -> ModelKernel:
        kernel = self._kernel_cls(
            profile=self.profile,
            numa_nodes=1,
            page_size=self.page_size,
            hz=self.hz,
            thp=self.thp,
            pt_reclaim=self.pt_reclaim,
        )
        return cast(ModelKernel, kernel)

    def run(self, scenario: Scenario) -> Series:
        """Run the scenario on a fresh model kernel and return its series."""
        k = self.new_kernel()
        sysfs = k.sysfs
        sysfs.write("run", "0")
        sysfs.write("run", "2")
        numa = _has_file(sysfs, "merge_across_nodes")
        advisor = _has_file(sysfs, "advisor_mode")
        tunables = runner_tunables(
            scenario, self.pages_to_scan, self.sleep_millisecs, numa, advisor
        )
        for name in WRITE_ORDER:
            if name in tunables:
                sysfs.write(name, str(tunables[name]))
        procs: dict[str, _Proc] = {}
        for spec in scenario.processes:
            procs[spec.name] = self._start(k, spec.name, spec.pages, spec.thp)
        base = self._counters(k)
        initial = self._snapshot(k, procs, base)
        samples: list[ScanSample] = []
        sleep = int(tunables["sleep_millisecs"])
        sysfs.write("run", "1")
        for scan in range(1, scenario.scans + 1):
            k.run_until(full_scans=int(sysfs.read("full_scans")) + 1)
            sysfs.write("run", "0")
            end = self._snapshot(k, procs, base)
            actions = scenario.actions_after(scan)
            outcomes = tuple(self._apply(k, a, procs) for a in actions)
            for a in actions:
                if isinstance(a, SetTunable) and a.name == "sleep_millisecs":
                    sleep = a.value
            after = self._snapshot(k, procs, base) if actions else None
            samples.append(ScanSample(scan, end, after, outcomes))
            if scan < scenario.scans:
                sysfs.write("run", "1")
                # KernelRunner._resume: a changed sleep_millisecs ends ksmd's sleep now.
                current = int(sysfs.read("sleep_millisecs"))
                sysfs.write("sleep_millisecs", str(sleep + 1 if current == sleep else sleep))
        return Series("model", scenario, initial, tuple(samples))

    def _start(self, k: ModelKernel, name: str, pages: tuple[str, ...], thp: bool) -> _Proc:
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
        proc.madvise(addr, len(pages) * ps, self.MERGEABLE)
        return _Proc(proc, addr, len(pages))

    def _fill(self, proc: ModelProcess, addr: int, token: str, count: int) -> None:
        ps = self.page_size
        byte = tk.fill_byte(token)
        if byte is not None:
            proc.fill(addr, count * ps, byte)
            return
        data = tk.page_bytes(token, ps)
        for j in range(count):
            proc.write(addr + j * ps, data)

    def _apply(self, k: ModelKernel, action: Action, procs: dict[str, _Proc]) -> str:
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

    def _counters(self, k: ModelKernel) -> dict[str, int | None]:
        out: dict[str, int | None] = {}
        for name in COUNTER_NAMES:
            try:
                out[name] = int(k.sysfs.read(name))
            except (OSError, KeyError):
                out[name] = None  # the profile has no such file
        return out

    def _snapshot(
        self, k: ModelKernel, procs: dict[str, _Proc], base: dict[str, int | None]
    ) -> Snapshot:
        counters = relative(self._counters(k), base)
        stats = {}
        for name, p in procs.items():
            stat = dict(p.proc.ksm_stat())
            stat["anon_huge_kb"] = p.proc.anon_huge_bytes(p.addr, p.pages * self.page_size) >> 10
            stats[name] = {f: _stat_value(stat.get(f)) for f in STAT_FIELDS}
        return Snapshot(counters=counters, processes=stats)


def _has_file(sysfs: ModelSysfs, name: str) -> bool:
    try:
        sysfs.read(name)
    except (OSError, KeyError):
        return False
    return True


def _stat_value(v: object) -> StatValue:
    if v is None or isinstance(v, bool | int):
        return v
    raise ModelUnavailable(f"ksm_model returned {v!r} in ksm_stat(); expected int or bool")


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


def run_on_model(scenario: Scenario, profile: str = "6.11") -> Series:
    """Run the scenario on a fresh ksm_model Kernel and return the model series."""
    return ModelRunner(profile=profile).run(scenario)
