"""The small grammars of the twin and forecast options: knob sets, what-ifs, shares, durations.

    knob set     pages_to_scan=1000,sleep_millisecs=20     (any tunable but run)
    what-if      mps16:max_page_sharing=16,smart_scan=0    (NAME:KNOBS)
    share        95%  or 0.95
    duration     90s, 10m, 1h30m, or a number of seconds

Values are checked as `ksmh set` checks them (harness.ksm.tunables), before anything runs.
"""

from __future__ import annotations

import contextlib
import math
import re

from harness.errors import HarnessError, KsmWriteRefused
from harness.ksm.tunables import validate

# Knobs a what-if twin may change; the rest follows the kernel.
WHAT_IF_KNOBS = (
    "max_page_sharing",
    "use_zero_pages",
    "smart_scan",
    "merge_across_nodes",
    "pages_to_scan",
    "sleep_millisecs",
    "stable_node_chains_prune_millisecs",
)
# Knobs that change how fast a scan goes in wall time: a what-if with one of them runs on its
# own clock (harness.twin.timeline) instead of scan for scan with the kernel.
RATE_KNOBS = ("pages_to_scan", "sleep_millisecs", "smart_scan")
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,32}$")
_DURATION = re.compile(r"^(?:(\d{1,6})h)?(?:(\d{1,6})m)?(?:(\d{1,9}(?:\.\d{1,6})?)s)?$")


def knob_set(text: str, allowed: tuple[str, ...] | None = None) -> dict[str, int | str]:
    """'K=V,K=V' -> validated values (write order). `allowed` limits the knob names."""
    values: dict[str, object] = {}
    for part in text.split(","):
        key, sep, value = part.strip().partition("=")
        if not sep or not key or not value:
            raise HarnessError(
                f"{text!r}: expected KNOB=VALUE[,KNOB=VALUE...], got {part.strip()!r}",
                hint="e.g. pages_to_scan=1000,sleep_millisecs=20",
            )
        if key in values:
            raise HarnessError(f"{text!r}: {key} is given twice")
        values[key.strip()] = value.strip()
    if "run" in values:
        raise HarnessError(f"{text!r}: run is not a knob to compare", hint="leave run out")
    if allowed is not None:
        bad = [k for k in values if k not in allowed]
        if bad:
            raise HarnessError(
                f"{text!r}: {bad[0]} cannot be varied here", hint="knobs: " + ", ".join(allowed)
            )
    try:
        return validate(values)
    except KsmWriteRefused as exc:
        raise HarnessError(f"{text!r}: {exc.message}", hint=exc.hint) from None


def what_if(text: str) -> tuple[str, dict[str, int | str]]:
    """'NAME:K=V,...' -> (name, knobs)."""
    name, sep, rest = text.partition(":")
    if not sep or not _NAME.match(name):
        raise HarnessError(
            f"--what-if {text!r}: expected NAME:KNOB=VALUE[,KNOB=VALUE...]",
            hint="NAME is 1-32 letters, digits, '_', '.', '-'; e.g. mps16:max_page_sharing=16",
        )
    return name, knob_set(rest, WHAT_IF_KNOBS)


def share(text: str, what: str = "--target") -> float:
    """'95%' or '0.95' -> 0.95 (0 < share <= 1)."""
    t = text.strip()
    try:
        v = float(t[:-1]) / 100 if t.endswith("%") else float(t)
    except ValueError:
        v = math.nan
    if not (0 < v <= 1):
        raise HarnessError(
            f"{what} {text!r}: expected a share like 95% or 0.95 (above 0, at most 100%)"
        )
    return v


def duration(text: str, what: str = "--within") -> float:
    """'10m', '90s', '1h30m' or a bare number of seconds -> seconds (> 0)."""
    t = text.strip()
    m = _DURATION.match(t)
    seconds = math.nan
    if t and m and any(m.groups()):
        h, mi, s = (float(g) if g else 0.0 for g in m.groups())
        seconds = h * 3600 + mi * 60 + s
    else:
        with contextlib.suppress(ValueError):
            seconds = float(t)
    if not (0 < seconds < 10 * 365 * 86400):
        raise HarnessError(f"{what} {text!r}: expected a duration like 90s, 10m or 1h30m")
    return seconds


def show(knobs: dict[str, int | str]) -> str:
    """Knobs as 'K=V,K=V' (the grammar knob_set reads)."""
    return ",".join(f"{k}={v}" for k, v in knobs.items()) or "(current)"
