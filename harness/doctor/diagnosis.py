"""diagnose(): facts, analysis and findings for a set of processes; read-only."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from harness import procfs
from harness.doctor.analysis import Analysis, analyse
from harness.doctor.catalog import Finding
from harness.doctor.facts import Options, collect
from harness.doctor.findings import run_all
from harness.doctor.paths import KSM_ROOT, NODE_ROOT, THP_ROOT
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
