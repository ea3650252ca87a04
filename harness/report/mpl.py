"""matplotlib, set up once: the Agg backend (no display needed) and a config directory it can
write. Without one (a user whose home is not writable, e.g. nobody's /nonexistent) matplotlib
prints two warnings on every run and rebuilds its font cache in a temporary directory; the
harness's cache directory (harness.paths) takes its place then."""

from __future__ import annotations

import os
from pathlib import Path

from harness.paths import cache_dir


def _config_dir() -> None:
    if os.environ.get("MPLCONFIGDIR"):
        return
    xdg = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    existing = next((p for p in (Path(xdg) / "matplotlib", Path(xdg)) if p.exists()), None)
    if existing is not None and os.access(existing, os.W_OK | os.X_OK):
        return  # matplotlib's own default works
    if existing is None and os.access(Path(xdg).parent, os.W_OK | os.X_OK):
        return  # it can create it
    mine = cache_dir() / "matplotlib"
    try:
        mine.mkdir(parents=True, exist_ok=True)
    except OSError:
        return  # matplotlib falls back to a temporary directory (and says so)
    os.environ["MPLCONFIGDIR"] = str(mine)


_config_dir()

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["plt"]
