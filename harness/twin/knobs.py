"""The small grammars of the twin and forecast options: knob sets and what-ifs (shares and
durations are harness.units').

    knob set     pages_to_scan=1000,sleep_millisecs=20     (any tunable but run)
    what-if      mps16:max_page_sharing=16,smart_scan=0    (NAME:KNOBS)

Values are checked as `ksmh set` checks them (harness.ksm.tunables), before anything runs.
"""

from __future__ import annotations

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


def show(knobs: dict[str, int | str]) -> str:
    """Knobs as 'K=V,K=V' (the grammar knob_set reads)."""
    return ",".join(f"{k}={v}" for k, v in knobs.items()) or "(current)"
