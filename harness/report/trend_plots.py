"""One PNG per metric family of a trend: a panel per series, a line per metric, nights on x.

Follows harness.report.plots: matplotlib's Agg backend, one file per figure, None (no file)
when no series has data for it. A flagged metric gets its baseline band (median +- threshold)
from the night its step started, and a red marker on that night.
"""

from __future__ import annotations

from pathlib import Path

from harness.report.mpl import plt
from harness.report.plots import _save
from harness.report.trend import Family, Group, Metric, Trend

SCALE = {"bytes": (2**20, "MiB"), "seconds": (1, "s"), "pages": (1, "pages"), "ratio": (1, "")}
MAX_TICKS = 16


def _ticks(group: Group) -> list[str]:
    return [n.started.strftime("%m-%d %H:%M") if n.started else n.run_id for n in group.nights]


def _draw(ax: object, m: Metric, color: str, divisor: float) -> None:
    xs = [i for i, v in enumerate(m.values) if v is not None]
    ys = [v / divisor for v in m.values if v is not None]
    ax.plot(xs, ys, "o-", color=color, markersize=3, label=m.label or m.family.name)  # type: ignore[attr-defined]
    e = m.flagged
    if e is None:
        return
    lo = (e.baseline.median - e.baseline.threshold) / divisor
    hi = (e.baseline.median + e.baseline.threshold) / divisor
    ax.fill_between([max(e.start - 1, 0), len(m.values) - 1], lo, hi, color=color, alpha=0.12)  # type: ignore[attr-defined]
    start = m.values[e.start]
    if start is not None:
        ax.plot([e.start], [start / divisor], "X", color="red", markersize=9)  # type: ignore[attr-defined]


def plot_family(family: Family, groups: list[Group], out: Path) -> str | None:
    """`<family>.png` with one panel per series that has this family's metrics."""
    panels = [(g, [m for m in g.metrics if m.family.name == family.name]) for g in groups]
    panels = [(g, ms) for g, ms in panels if ms]
    if not panels:
        return None
    divisor, unit = SCALE[family.unit]
    fig, axes = plt.subplots(
        len(panels), 1, figsize=(9, 3.6 * len(panels)), squeeze=False, sharex=False
    )
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for row, (g, ms) in enumerate(panels):
        ax = axes[row][0]
        for i, m in enumerate(ms):
            _draw(ax, m, colors[i % len(colors)], divisor)
        ticks = _ticks(g)
        step = max(1, -(-len(ticks) // MAX_TICKS))
        ax.set_xticks(range(0, len(ticks), step), ticks[::step], rotation=30, fontsize=7)
        ax.set_ylabel(f"{family.name} ({unit})" if unit else family.name)
        flagged = sum(1 for m in ms if m.flagged is not None)
        ax.set_title(f"{g.title}" + (f": {flagged} flagged" if flagged else ""), fontsize=9)
        if family.unit == "pages":
            ax.axhline(0, color="grey", lw=0.6)
            # A few pages of one counter next to thousands of another: keep both readable.
            if max((abs(v) for m in ms for v in m.values if v is not None), default=0) > 100:
                ax.set_yscale("symlog", linthresh=10)
        if len(ms) <= 14:
            ax.legend(fontsize=7, ncol=2)
        ax.grid(alpha=0.3)
    fig.suptitle(family.title, fontsize=11)
    return _save(fig, out / f"{family.name}.png")


def render_plots(trend: Trend, out: Path) -> dict[str, str]:
    """Every family's plot that has data: {family: file name}."""
    made: dict[str, str] = {}
    for family in trend.families:
        name = plot_family(family, trend.groups, out)
        if name:
            made[family.name] = name
    return made
