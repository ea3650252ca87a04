"""The finding families: one module each, every module a `check(analysis) -> [Finding]`.

The catalogue (harness.doctor.catalog) names each kind's family; a test checks that every
kind has its family module and that each module reports only its own kinds.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from harness.doctor.analysis import Analysis
from harness.doctor.catalog import CATALOG, Finding

FAMILIES = (
    "ksm_state",
    "tuners",
    "vmas",
    "thp",
    "pins",
    "scan",
    "volatile",
    "profit",
    "numa",
)


def family(name: str) -> Callable[[Analysis], list[Finding]]:
    check: Callable[[Analysis], list[Finding]] = importlib.import_module(
        f"harness.doctor.findings.{name}"
    ).check
    return check


def run_all(a: Analysis) -> list[Finding]:
    """Every family's findings, most severe first (stable within one severity)."""
    out: list[Finding] = []
    for name in FAMILIES:
        out += family(name)(a)
    return sorted(out, key=lambda f: -int(f.severity))


assert {k.family for k in CATALOG} == set(FAMILIES)
