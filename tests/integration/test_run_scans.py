"""Per-full-scan series in a real run: the kernel sampled frozen at the end of each scan of a
wait (`scan_samples: true`), the model recording every scan it makes; the two line up scan for
scan (the same numbering from the start of the run)."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.ksm.lock import ksm_lock
from harness.playbook.runner import Runner, RunOptions
from harness.playbook.schema import loads_playbook
from harness.report.results import read_results

PLAYBOOK = """
name: scans
fleet: {count: 1, memory_mib: 128}
ksm: {pages_to_scan: 8000, sleep_millisecs: 20}
scan_samples: true
phases:
  - name: fill
    steps:
      - fill: {region: a, size: 16MiB, pattern: "byte:0x5a"}
      - ksm: {run: 1}
      - wait: {full_scans: +4}
"""


@pytest.mark.ksm_kernel
@pytest.mark.qemu
def test_kernel_frozen_scans_line_up_with_the_models(tmp_path: Path) -> None:
    opts = RunOptions(backend="kernel", out=tmp_path, echo=lambda s: None, take_lock=False)
    with ksm_lock():
        outcome = Runner(loads_playbook(PLAYBOOK, "scans.yaml"), opts).run()
    res = read_results(outcome.directory)
    kernel = {r["scan"]: r for r in res.scans if r["source"] == "kernel"}
    model = {r["scan"]: r for r in res.scans if r["source"] == "model"}
    # Every scan of the model, numbered from the start (ksmd goes on between the last syncs).
    assert sorted(model) == list(range(1, len(model) + 1)) and len(model) >= 4
    assert len(kernel) >= 2, f"too few provably end-of-scan samples: {sorted(kernel)}"
    assert set(kernel) <= {1, 2, 3, 4}  # frozen samples are taken during the wait only
    for scan in sorted(kernel):
        k, m = kernel[scan], model[scan]
        assert k["t"] is not None and m["t"] is None  # measured vs computed
        for name in ("pages_shared", "pages_sharing"):
            # 16 MiB of one byte in one guest: 4096 pages; the guest's own memory adds a little.
            assert abs(k[name] - m[name]) <= max(8, 0.005 * k[name]), (scan, name, k, m)
    if 1 in kernel:
        assert kernel[1]["pages_sharing"] == 0  # a first visit only records checksums
    if 2 in kernel:
        assert kernel[2]["pages_sharing"] >= 4095 - 16  # merged at the second visit
