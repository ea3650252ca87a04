"""Small helpers the finding families share: subjects, sizes, sysfs evidence."""

from __future__ import annotations

from harness.doctor.catalog import Evidence
from harness.doctor.facts import Facts, HostFacts, ProcessFacts
from harness.units import format_size

PAGE = 4096


def subject(p: ProcessFacts) -> str:
    return f"pid {p.pid} ({p.name})"


def pages(n: int) -> str:
    """'2,048 pages (8 MiB)'."""
    return f"{n:,} pages ({format_size(n * PAGE)})"


def knob(h: HostFacts, name: str) -> Evidence:
    return Evidence(str(h.ksm_root / name), h.knobs.get(name, str(h.counters.get(name, "-"))))


def window(f: Facts) -> float:
    return f.watch.seconds if f.watch is not None else f.options.window
