"""The overcommit playbook on the real kernel with THP guests (the fleet default), scaled down
for CI: kernel and model within 0.5% on pages_shared, pages_sharing and stable_node_dups at the
end of both phases (identical fill, then one guest rewritten with random pages), every counter's
difference printed.

Scaled: 3 guests of 256 MiB filling 96 MiB (the playbook: 4 x 384 MiB filling 192 MiB, ~3 min
here), the size expectations scaled with it; the steps and knobs are the playbook's own. The full
playbook with THP measured kernel - model: pages_shared -1 / -3, pages_sharing +125 / -10,
stable_node_dups 0 / 0 (fill-identical / split).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from harness.ksm.lock import ksm_lock
from harness.ksm.sysfs import SysfsBackend
from harness.playbook.runner import Runner, RunOptions
from harness.playbook.schema import loads_playbook
from tests.integration.test_run_quickstart import (
    anon_huge_kb,
    check_nothing_left,
    check_results_dir,
    qemu_processes_of,
)

ROOT = Path(__file__).resolve().parents[2]
OVERCOMMIT = ROOT / "playbooks" / "overcommit.yaml"
# (playbook text, CI text): sizes only; a change to the playbook that breaks one fails here.
SCALE = (
    ("count: 4, memory_mib: 384", "count: 3, memory_mib: 256"),
    ("size: 192MiB", "size: 96MiB"),
    ('"saved_bytes >= 500MiB"', '"saved_bytes >= 250MiB"'),  # 3 x 24576 pages in chains
    ('"delta.pages_sharing <= -40000"', '"delta.pages_sharing <= -20000"'),  # guest 0's 24576
)
CLOSE = ("pages_shared", "pages_sharing", "stable_node_dups")


def scaled_overcommit() -> str:
    text = OVERCOMMIT.read_text()
    for old, new in SCALE:
        assert old in text, f"{OVERCOMMIT} no longer has {old!r}"
        text = text.replace(old, new)
    return text


@pytest.mark.ksm_kernel
@pytest.mark.qemu
def test_overcommit_with_thp_guests_matches_the_kernel(tmp_path: Path) -> None:
    playbook = loads_playbook(scaled_overcommit(), str(OVERCOMMIT))
    assert playbook.fleet.thp is True  # the default, what production runs
    huge: dict[int, int] = {}
    fleet_id: list[str] = []

    def echo(line: str) -> None:
        if m := re.search(r"fleet (\S+) ready", line):
            fleet_id.append(m.group(1))
        if "ksm run=1" in line and fleet_id:  # filled, KSM not started yet
            huge.update({p: anon_huge_kb(p) for p in qemu_processes_of(fleet_id[0])})

    kernel = SysfsBackend()
    opts = RunOptions(backend="kernel", out=tmp_path, export=None, echo=echo, take_lock=False)
    with ksm_lock():
        before = kernel.read_tunables()
        outcome = Runner(playbook, opts).run()
        after = kernel.read_tunables()
    assert outcome.exit_status == 0, outcome.failed
    run = check_results_dir(outcome.directory)
    check_nothing_left(run)
    assert after == before
    # The guests really ran on huge pages: 96 MiB filled each, in 2 MiB pages.
    assert all(g["thp"] is True for g in run["guests"])  # type: ignore[attr-defined]
    assert len(huge) == 3 and all(kb >= 48 * 1024 for kb in huge.values()), huge
    phases = run["phases"]
    assert [p["name"] for p in phases] == ["fill-identical", "split"]  # type: ignore[attr-defined]
    for phase in phases:  # type: ignore[attr-defined]
        k, m = phase["counters"]["kernel"]["end"], phase["counters"]["model"]["end"]
        diff = {n: (k[n], m[n], k[n] - m[n]) for n in k if isinstance(k[n], int) and n in m}
        print(json.dumps({"phase": phase["name"], "kernel, model, kernel - model": diff}))
        for name in CLOSE:
            assert abs(k[name] - m[name]) <= 0.005 * k[name], (phase["name"], name, diff[name])
        assert all(e["status"] == "passed" for e in phase["expectations"])
