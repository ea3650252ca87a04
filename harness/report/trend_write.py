"""Write a trend's files: trend.json, the plots (when matplotlib is there) and trend.md.

Apart from harness.report.trend, which the two renderers import for its types.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from harness.report.trend import TREND_JSON, TREND_MD, Trend, to_json
from harness.report.trend_markdown import render_markdown


def write_trend(trend: Trend, inputs: Sequence[Path], out: Path) -> Path:
    """Write trend.json, the plots and trend.md into out; returns trend.md's path."""
    out.mkdir(parents=True, exist_ok=True)
    doc = to_json(trend, inputs)
    (out / TREND_JSON).write_text(json.dumps(doc, indent=2) + "\n")
    try:
        from harness.report.trend_plots import render_plots  # imports matplotlib
    except ImportError:
        plots: dict[str, str] = {}
    else:
        plots = render_plots(trend, out)
    path = out / TREND_MD
    path.write_text(render_markdown(trend, doc, plots))
    return path
