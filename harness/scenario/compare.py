"""Compare a kernel series with a model series, sample by sample and counter by counter.

    kernel, model, result = run_both(scenario)
    assert result.ok, result.report()

The report starts with the first difference (full scan F, counter, kernel value, model value),
then the scenario (with its seed), every difference, and the differing counters across all F.
"""

from __future__ import annotations

from dataclasses import dataclass

from harness.ksm.sysfs import SysfsBackend
from harness.ksm.types import COUNTER_NAMES
from harness.scenario.kernel_runner import KernelRunner, run_on_kernel
from harness.scenario.model_runner import ModelRunner
from harness.scenario.series import STAT_FIELDS, Series, Snapshot
from harness.scenario.spec import Scenario, action_text


@dataclass(frozen=True)
class Difference:
    """One value that differs: where (F and phase), what, and both values."""

    scan: int  # 0 for the initial snapshot taken before run=1
    phase: str  # "initial", "end" (of scan F), "after actions", "outcome"
    field: str  # a counter name, "<process>.<ksm_stat field>", "processes", "samples"
    kernel: object
    model: object

    def __str__(self) -> str:
        return (
            f"F={self.scan} {self.phase}: {self.field} kernel={self.kernel!r} model={self.model!r}"
        )


@dataclass(frozen=True)
class Comparison:
    """The outcome of compare(): empty `differences` means identical series."""

    kernel: Series
    model: Series
    differences: tuple[Difference, ...]

    @property
    def ok(self) -> bool:
        return not self.differences

    @property
    def first(self) -> Difference | None:
        return self.differences[0] if self.differences else None

    def report(self, limit: int = 25) -> str:
        """A readable account: first difference, scenario, differences, series table."""
        s = self.kernel.scenario
        n = len(self.kernel.samples)
        if self.ok:
            return f"scenario {s.name!r}: kernel and model agree at all {n} sampled full scans"
        first = self.differences[0]
        lines = [
            f"scenario {s.name!r}"
            + (f" (seed {s.seed})" if s.seed is not None else "")
            + f": kernel and model differ; first at {first}",
            s.describe(),
            f"{len(self.differences)} difference(s):",
        ]
        lines += [f"  {d}" for d in self.differences[:limit]]
        if len(self.differences) > limit:
            lines.append(f"  ... {len(self.differences) - limit} more")
        lines.append(self.table())
        return "\n".join(lines)

    def table(self, max_fields: int = 6) -> str:
        """The differing fields at the end of every scan, as kernel/model columns."""
        fields: list[str] = []
        for d in self.differences:
            if d.phase == "end" and d.field not in fields and d.field != "processes":
                fields.append(d.field)
        fields = fields[:max_fields]
        if not fields:
            return ""
        width = max(14, *(len(f) for f in fields))
        out = [
            "end-of-scan values, kernel/model:",
            "  F   " + "".join(f.ljust(width + 2) for f in fields),
        ]
        for ks, ms in zip(self.kernel.samples, self.model.samples, strict=False):
            cells = []
            for f in fields:
                cell = f"{_value(ks.end, f)}/{_value(ms.end, f)}"
                cells.append(cell.ljust(width + 2))
            actions = "; ".join(action_text(a) for a in self.kernel.scenario.actions_after(ks.scan))
            out.append(
                f"  {ks.scan:<3} " + "".join(cells) + (f"  then {actions}" if actions else "")
            )
        return "\n".join(out)


def _value(snap: Snapshot, field: str) -> object:
    if field in snap.counters:
        return snap.counters[field]
    proc, _, name = field.partition(".")
    return snap.processes.get(proc, {}).get(name, "-")


def compare(kernel: Series, model: Series) -> Comparison:
    """Every difference between two series of the same scenario, in time order."""
    diffs: list[Difference] = []
    _snapshots(0, "initial", kernel.initial, model.initial, diffs)
    for ks, ms in zip(kernel.samples, model.samples, strict=False):
        _snapshots(ks.scan, "end", ks.end, ms.end, diffs)
        if ks.outcomes != ms.outcomes:
            diffs.append(Difference(ks.scan, "outcome", "actions", ks.outcomes, ms.outcomes))
        if (ks.after_actions is None) != (ms.after_actions is None):
            diffs.append(
                Difference(ks.scan, "after actions", "snapshot", ks.after_actions, ms.after_actions)
            )
        elif ks.after_actions is not None and ms.after_actions is not None:
            _snapshots(ks.scan, "after actions", ks.after_actions, ms.after_actions, diffs)
    if len(kernel.samples) != len(model.samples):
        diffs.append(
            Difference(
                min(len(kernel.samples), len(model.samples)) + 1,
                "end",
                "samples",
                len(kernel.samples),
                len(model.samples),
            )
        )
    return Comparison(kernel=kernel, model=model, differences=tuple(diffs))


def _snapshots(scan: int, phase: str, k: Snapshot, m: Snapshot, out: list[Difference]) -> None:
    names = list(COUNTER_NAMES) + sorted((set(k.counters) | set(m.counters)) - set(COUNTER_NAMES))
    for name in names:
        kv, mv = k.counters.get(name), m.counters.get(name)
        if kv != mv:
            out.append(Difference(scan, phase, name, kv, mv))
    if set(k.processes) != set(m.processes):
        out.append(Difference(scan, phase, "processes", sorted(k.processes), sorted(m.processes)))
    for proc in k.processes:
        if proc not in m.processes:
            continue
        for f in STAT_FIELDS:
            kv, mv = k.processes[proc].get(f), m.processes[proc].get(f)
            if kv != mv:
                out.append(Difference(scan, phase, f"{proc}.{f}", kv, mv))


def run_both(
    scenario: Scenario,
    backend: SysfsBackend | None = None,
    *,
    profile: str = "host",
) -> tuple[Series, Series, Comparison]:
    """Run on the kernel, then on the model, and compare.

    Without `backend` the KSM lock is taken and the knobs saved/restored here; with one (the
    pytest `ksm` fixture) the caller already holds both. The default profile "host" models
    the running kernel: its version, CONFIG_HZ and THP settings (ModelRunner.for_host).
    """
    # Built first: fails fast if the model is missing.
    model_runner = ModelRunner.for_host() if profile == "host" else ModelRunner(profile=profile)
    kernel = run_on_kernel(scenario) if backend is None else KernelRunner(backend).run(scenario)
    model = model_runner.run(scenario)
    return kernel, model, compare(kernel, model)
