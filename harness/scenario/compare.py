"""Compare a kernel series with a model series, sample by sample and counter by counter.

    kernel, model, result = run_both(scenario)
    assert result.ok, result.report()

The report starts with the first difference (full scan F, counter, kernel value, model value),
then the scenario (with its seed), every difference, and the differing counters across all F.
"""

from __future__ import annotations

from dataclasses import dataclass

from harness.console import plural
from harness.ksm.sysfs import SysfsBackend
from harness.record import Difference, Snapshot, diff_snapshots
from harness.scenario.kernel_runner import KernelRunner, run_on_kernel
from harness.scenario.model_runner import ModelRunner
from harness.scenario.series import Series
from harness.scenario.spec import Scenario, action_text


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
            f"{plural(len(self.differences), 'difference')}:",
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
    diffs += diff_snapshots(kernel.initial, model.initial, scan=0, phase="initial")
    for ks, ms in zip(kernel.samples, model.samples, strict=False):
        diffs += diff_snapshots(ks.end, ms.end, scan=ks.scan, phase="end")
        if ks.outcomes != ms.outcomes:
            diffs.append(Difference(ks.scan, "outcome", "actions", ks.outcomes, ms.outcomes))
        if (ks.after_actions is None) != (ms.after_actions is None):
            diffs.append(
                Difference(ks.scan, "after actions", "snapshot", ks.after_actions, ms.after_actions)
            )
        elif ks.after_actions is not None and ms.after_actions is not None:
            diffs += diff_snapshots(
                ks.after_actions, ms.after_actions, scan=ks.scan, phase="after actions"
            )
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


def run_both(
    scenario: Scenario,
    backend: SysfsBackend | None = None,
    *,
    profile: str = "6.11",
) -> tuple[Series, Series, Comparison]:
    """Run on the kernel, then on the model, and compare.

    Without `backend` the KSM lock is taken and the knobs saved/restored here; with one (the
    pytest `ksm` fixture) the caller already holds both.
    """
    model_runner = ModelRunner(profile=profile)  # fails fast if the model is missing
    kernel = run_on_kernel(scenario) if backend is None else KernelRunner(backend).run(scenario)
    model = model_runner.run(scenario)
    return kernel, model, compare(kernel, model)
