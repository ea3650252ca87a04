"""PNG plots of a run, drawn with matplotlib's Agg backend (no display needed).

Each function writes one file and returns its name, or None when the run has no data for it
(e.g. no sweep): the report then leaves that figure out rather than showing an empty frame.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from harness.report.mpl import plt
from harness.report.results import Results

COUNTERS = ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile")
STYLE = {"kernel": "-", "model": "--"}
DPI = 100


def _save(fig: Any, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path.name


def plot_counters(res: Results, out: Path) -> str | None:
    """KSM counters over wall-clock time, measured points only: the kernel as sampled (a
    line), the model as markers at the sync points where it was read (no line: between them
    it was not known); phase starts as vertical lines. scans.png compares per full scan."""
    if not res.samples:
        return None
    fig, ax = plt.subplots(figsize=(9, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, name in enumerate(COUNTERS):
        for source in res.sources():
            xs, ys = res.series(source, name)
            if not xs:
                continue
            if source == "model":  # known only at sync points: markers, no interpolation
                ax.plot(xs, ys, linestyle="none", marker="o", markersize=3,
                        color=colors[i % len(colors)], label=f"{name} ({source})")  # fmt: skip
            else:
                ax.plot(xs, ys, STYLE.get(source, ":"), color=colors[i % len(colors)],
                        label=f"{name} ({source})")  # fmt: skip
    for phase in res.run.get("phases", []):
        if phase.get("t_start") is not None:
            ax.axvline(phase["t_start"], color="grey", lw=0.6, ls=":")
            ax.text(phase["t_start"], ax.get_ylim()[1], " " + phase["name"], fontsize=7,
                    va="top", color="grey")  # fmt: skip
    ax.set_xlabel("seconds since start")
    ax.set_ylabel("pages")
    ax.set_title("KSM counters over time: kernel (line) vs model at sync points (dots)")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    return _save(fig, out / "counters.png")


def plot_scans(res: Results, out: Path) -> str | None:
    """The comparison per full scan: the model's counters at the end of every scan it made
    (a line: each point is a real end-of-scan state), the kernel's frozen end-of-scan samples
    where the run took them (markers)."""
    if not res.scans:
        return None
    fig, ax = plt.subplots(figsize=(9, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, name in enumerate(COUNTERS):
        color = colors[i % len(colors)]
        xs, ys = res.scan_series("model", name)
        if xs:
            ax.plot(xs, ys, "--", color=color, label=f"{name} (model)")
        xs, ys = res.scan_series("kernel", name)
        if xs:
            ax.plot(xs, ys, linestyle="none", marker="o", markersize=4, color=color,
                    label=f"{name} (kernel, frozen)")  # fmt: skip
    ax.set_xlabel("full scans since the start of the run")
    ax.set_ylabel("pages")
    ax.set_title("KSM counters at the end of each full scan")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    return _save(fig, out / "scans.png")


def plot_convergence(res: Results, out: Path) -> str | None:
    """Seconds to converge: one bar per converged wait (from the start of its phase, which
    holds the content change and any earlier waits), and per sweep value."""
    bars: list[tuple[str, float]] = []
    for phase in res.run.get("phases", []):
        for w in phase.get("waits", []):
            if w.get("kind") != "converged" or w.get("seconds") is None:
                continue
            seconds = float(w["seconds"])
            if w.get("t_end") is not None and phase.get("t_start") is not None:
                seconds = float(w["t_end"]) - float(phase["t_start"])
            bars.append((f"{phase['name']}:L{w.get('line', '?')}", seconds))
    sweeps = [s for p in res.run.get("phases", []) for s in p.get("sweeps", [])]
    if not bars and not sweeps:
        return None
    ncols = 2 if sweeps and bars else 1
    fig, axes = plt.subplots(1, ncols, figsize=(9 if ncols == 2 else 6, 4), squeeze=False)
    col = 0
    if bars:
        ax = axes[0][col]
        ax.bar([b[0] for b in bars], [b[1] for b in bars], color="tab:blue")
        ax.set_ylabel("seconds from phase start")
        ax.set_title("time to converge")
        ax.tick_params(axis="x", labelrotation=30, labelsize=7)
        col += 1
    if sweeps:
        ax = axes[0][col]
        for s in sweeps:
            pts = [(p["value"], p["seconds"], p.get("ksmd_cpu_seconds")) for p in s["points"]
                   if p.get("seconds") is not None]  # fmt: skip
            if not pts:
                continue
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label="seconds to converge")
            cpu = [(p[0], p[2]) for p in pts if p[2] is not None]
            if cpu:
                ax2 = ax.twinx()
                ax2.plot([c[0] for c in cpu], [c[1] for c in cpu], "s--", color="tab:red",
                         label="ksmd CPU seconds")  # fmt: skip
                ax2.set_ylabel("ksmd CPU seconds", color="tab:red")
            ax.set_xscale("log")
            ax.set_xlabel(s["tunable"])
            ax.set_ylabel("seconds to converge")
            ax.set_title(f"sweep of {s['tunable']}")
    return _save(fig, out / "convergence.png")


def plot_guests(res: Results, out: Path) -> str | None:
    """Merging pages of each guest over time (its QEMU's ksm_stat): kernel solid, model dashed."""
    series: dict[tuple[str, str], tuple[list[float], list[float]]] = {}
    for row in res.guests:
        if row.get("merging_pages") is None:
            continue
        xs, ys = series.setdefault((row["source"], row["guest"]), ([], []))
        xs.append(float(row["t"]))
        ys.append(float(row["merging_pages"]))
    if not series:
        return None
    guests = sorted({g for _, g in series})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, ax = plt.subplots(figsize=(9, 4))
    for (source, guest), (xs, ys) in sorted(series.items()):
        i = guests.index(guest)
        ax.plot(xs, ys, STYLE.get(source, ":"), color=colors[i % len(colors)],
                marker="o" if source == "model" else None, markersize=3,
                label=f"{guest.rsplit('-', 1)[-1]} ({source})")  # fmt: skip
    ax.set_xlabel("seconds since start")
    ax.set_ylabel("merging pages (ksm_stat)")
    ax.set_title("merging pages per guest: kernel (solid) vs model (dashed)")
    if len(series) <= 16:
        ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    return _save(fig, out / "guests.png")


def plot_heatmap(res: Results, out: Path) -> str | None:
    """Guest-by-guest pages of identical content, from the last shadow capture."""
    m = res.run.get("sharing_matrix")
    if not m or not m.get("guests"):
        return None
    names = [g.rsplit("-", 1)[-1] for g in m["guests"]]
    data = m["pages"]
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * len(names) + 3), max(3.5, 0.5 * len(names) + 2)))
    im = ax.imshow(data, cmap="viridis")
    ax.set_xticks(range(len(names)), names, fontsize=7, rotation=45)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    if len(names) <= 8:
        for i, row in enumerate(data):
            for j, v in enumerate(row):
                ax.text(j, i, str(v), ha="center", va="center", fontsize=7, color="w")
    ax.set_title("pages of row guest also in column guest", fontsize=10)
    fig.colorbar(im, ax=ax, label="pages")
    return _save(fig, out / "heatmap.png")


def render_plots(res: Results, out: Path) -> dict[str, str]:
    """Draw every plot that has data; returns {kind: file name}."""
    made: dict[str, str] = {}
    for kind, fn in (
        ("counters", plot_counters),
        ("scans", plot_scans),
        ("convergence", plot_convergence),
        ("guests", plot_guests),
        ("heatmap", plot_heatmap),
    ):
        name = fn(res, out)
        if name:
            made[kind] = name
    return made
