"""`ksmh doctor`: why memory does or does not merge, and who shares merged pages with whom.

    facts (harness.doctor.facts)      read once: KSM knobs/counters, THP, MemAvailable, NUMA,
                                      each examined process's smaps, ksm_stat, pins, and, as
                                      root, content keys (harness.shadow) and KSM page frames
    analysis (harness.doctor.analysis) scanned / could merge / merged per process, would-merge
                                      per ignored VMA, the sharing matrix (exposure)
    findings (harness.doctor.findings) one module per family, each finding with severity,
                                      evidence (file and value) and a concrete fix
    render (harness.doctor.render)    text or JSON; exit status 1 when a finding needs action

The catalogue of findings (harness.doctor.catalog) also renders README.md's "Why nothing
merges" section (harness.doctor.readme).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from harness import procfs
from harness.doctor.analysis import Analysis, analyse
from harness.doctor.catalog import Finding
from harness.doctor.facts import KSM_ROOT, NODE_ROOT, THP_ROOT, Options, collect
from harness.doctor.findings import run_all
from harness.doctor.render import exit_status


@dataclass
class Diagnosis:
    analysis: Analysis
    findings: list[Finding]

    @property
    def exit_status(self) -> int:
        return exit_status(self.findings)

    def of_kind(self, kind: str) -> list[Finding]:
        return [f for f in self.findings if f.kind == kind]


def diagnose(
    targets: Mapping[int, str],
    selection: str = "pids",
    options: Options | None = None,
    *,
    group_of: Mapping[int, str] | None = None,
    ksm_root: Path = KSM_ROOT,
    proc: Path = procfs.PROC,
    thp_root: Path = THP_ROOT,
    node_root: Path = NODE_ROOT,
) -> Diagnosis:
    """Examine `targets` (pid -> name) and the host; read-only, changes nothing."""
    facts = collect(
        dict(targets),
        selection,
        options or Options(),
        ksm_root=ksm_root,
        proc=proc,
        thp_root=thp_root,
        node_root=node_root,
    )
    a = analyse(facts, group_of)
    return Diagnosis(a, run_all(a))
