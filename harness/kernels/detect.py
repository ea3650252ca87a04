"""Which ksm_model profile a real kernel is: its release, its files, and a behaviour probe.

The release gives the mainline profile (ksm_model.profiles.for_release). Stable trees and
distributions backport, so the kernel's own files decide what they can show (general_profit,
pages_scanned, ksm_zero_pages, smart_scan, advisor_mode, the ksm_stat lines), and a short
probe scenario measures the two behaviours a file cannot show, where the release number
cannot tell (kernels older than the feature's mainline release):

- fork_resets_counters: after a fork, does the child's ksm_stat start at ksm_rmap_items 0
  (the fix) or at its parent's count (before)?
- pages_scanned_exact: one full scan in one batch of 8 pages adds 8 to pages_scanned (6.10+
  and backports) or nothing (6.6-6.9, which accounted only batches that did not end a scan).

The probe is a differential scenario like any other (harness.scenario), run by the same runner
on the host (KernelRunner, under the KSM lock) or in a guest (GuestRunner); it takes 3 full
scans, about a second.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ksm_model.profiles import FEATURES, PROBED, Profile, release_tuple, select

from harness.scenario.kernel_runner import KernelRunner
from harness.scenario.spec import Scenario

PROBE_PAGES = 8
PROBE = Scenario.from_mapping(
    {
        "name": "profile-probe",
        "scans": 3,
        "processes": [{"name": "p1", "pages": PROBE_PAGES, "fill": "a"}],
        "actions": [{"after": 2, "do": "fork", "process": "p1", "child": "c1"}],
    }
)


@dataclass(frozen=True)
class KernelFacts:
    """What a kernel shows of itself: release, KSM file names, ksm_stat line names, and the
    probed behaviours (empty when not probed)."""

    release: str
    files: frozenset[str]
    stat_fields: frozenset[str] | None = None
    probed: dict[str, bool] = field(default_factory=dict)

    def profile(self) -> Profile:
        return select(self.release, self.files, self.stat_fields, self.probed)


def facts_from_tree(release: str, ksm_root: Path, stat_file: Path | None = None) -> KernelFacts:
    """Facts from a /sys/kernel/mm/ksm directory and a /proc/PID/ksm_stat file (real ones, or
    the fake trees of the unit tests)."""
    files = frozenset(p.name for p in ksm_root.iterdir())
    fields = None
    if stat_file is not None and stat_file.exists():
        fields = stat_line_names(stat_file.read_text())
    return KernelFacts(release, files, fields)


def stat_line_names(text: str) -> frozenset[str]:
    """'ksm_rmap_items 0\\nksm_merge_any: no\\n' -> {ksm_rmap_items, ksm_merge_any}."""
    return frozenset(line.split()[0].rstrip(":") for line in text.splitlines() if line.strip())


def needs_probe(release: str) -> tuple[str, ...]:
    """The probed features a kernel of `release` may have only through a backport."""
    rel = release_tuple(release)
    return tuple(f for f in PROBED if rel < FEATURES[f][0])


def probe(runner: KernelRunner, files: Iterable[str]) -> dict[str, bool]:
    """Run the probe scenario on `runner`'s kernel; the probed features it shows."""
    series = runner.run(PROBE)
    out: dict[str, bool] = {}
    forked = series.at(2).after_actions
    assert forked is not None
    inherited = forked.processes["c1"]["ksm_rmap_items"]
    out["fork_resets_counters"] = inherited == 0
    if "pages_scanned" in set(files):
        out["pages_scanned_exact"] = series.at(1).end.counters["pages_scanned"] == PROBE_PAGES
    return out


def detect(
    runner: KernelRunner,
    release: str,
    files: Iterable[str],
    stat_fields: Iterable[str] | None,
    run_probe: bool = True,
) -> KernelFacts:
    """The facts of the kernel behind `runner`, probed where the release cannot tell."""
    facts = KernelFacts(
        release, frozenset(files), None if stat_fields is None else frozenset(stat_fields)
    )
    if run_probe and needs_probe(release):
        wanted = set(needs_probe(release))
        found = probe(runner, facts.files)
        facts = KernelFacts(
            facts.release,
            facts.files,
            facts.stat_fields,
            {k: v for k, v in found.items() if k in wanted},
        )
    return facts
