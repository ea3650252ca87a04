"""Render a results directory: plots + report.md, from run.json, samples.csv and guests.csv."""

from __future__ import annotations

from pathlib import Path

from harness.report.markdown import render_markdown
from harness.report.results import Results, read_results

REPORT_FILE = "report.md"


def render(directory: Path, res: Results | None = None) -> Path:
    """(Re)draw every plot and report.md in `directory`; return the report's path.

    Without matplotlib (a fleet host: `hosts prepare` ships no plotting stack) report.md is
    written without plots; `ksmh run --inventory` re-renders on the controller after fetching.
    """
    directory = Path(directory)
    if res is None:
        res = read_results(directory)
    try:
        from harness.report.plots import render_plots  # imports matplotlib
    except ImportError:
        plots: dict[str, str] = {}
    else:
        plots = render_plots(res, directory)
    path = directory / REPORT_FILE
    path.write_text(render_markdown(res, plots))
    return path
