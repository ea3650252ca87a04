"""The kernel matrix on real guests: Debian's 6.1 and 6.12 kernels booted under QEMU, each
running its own KSM, the spec's worked examples plus KSM_MATRIX_SEEDS (default 30) random
scenarios inside, every one exact against the model of that kernel.

The guests have mem_merge off (the host's KSM never sees them), so no host lock is needed.
The time per kernel is printed (pytest -s) and kept in matrix.json.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from harness.cli import main
from harness.guests.backend import RUNTIME_ROOT
from harness.guests.fleet import list_runs
from harness.guests.image import installed_kernels
from harness.pytest_plugin import require
from harness.scenario.examples import worked_examples

pytestmark = pytest.mark.qemu
SEEDS = int(os.environ.get("KSM_MATRIX_SEEDS", "30"))


def installed(series: str) -> str:
    """The newest installed guest kernel of a series (e.g. 6.12 -> 6.12.117+deb12-amd64)."""
    found = [r for r in installed_kernels() if r.startswith(series + ".")]
    if not found:
        require(
            "qemu",
            f"no Debian guest kernel {series}.* installed (scripts/bootstrap.sh installs "
            "linux-image-amd64 and linux-image-6.12-amd64)",
        )
    return found[-1]


@pytest.mark.parametrize("series", ["6.1", "6.12"])
def test_guest_kernel_matches_its_model_exactly(
    series: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    release = installed(series)
    out = tmp_path / "matrix"
    rc = main(["kernels", "check", "--kernel", release, "--seeds", str(SEEDS), "--out", str(out)])
    doc = json.loads((out / "matrix.json").read_text())
    [k] = doc["kernels"]
    assert k["error"] is None, k["error"]
    assert k["mismatches"] == [], (out / "matrix.md").read_text()
    assert (k["release"], k["where"]) == (release, "guest")
    assert k["scenarios"] == k["exact"] == len(worked_examples()) + SEEDS
    # The profile is the release's, adjusted by what the kernel showed (a fork-reset probe).
    assert k["profile"].split("+")[0].split("-")[0] == series
    assert set(k["probed"]) == {"fork_resets_counters"}
    assert rc == 0
    assert f"| {release} | guest | {k['profile']} |" in (out / "matrix.md").read_text()
    # Nothing left behind: the guest is stopped and its runtime directory removed.
    assert not [
        r for r in list_runs(RUNTIME_ROOT) if (r.get("owner") or {}).get("pid") == os.getpid()
    ]
    with capsys.disabled():
        print(
            f"\n{release}: {k['exact']}/{k['scenarios']} exact, profile {k['profile']}, "
            f"{k['seconds']:.0f} s (boot {k['boot_seconds']:.0f} s)"
        )
