"""The kernel matrix on real guests: Debian kernels booted under QEMU, each running its own KSM,
the spec's worked examples plus KSM_MATRIX_SEEDS random scenarios inside, every one exact
against the model of that kernel.

The default suite checks both Debian guest kernels, 6.1 and 6.12, with 30 random scenarios each
besides the worked examples (KSM_MATRIX_KERNELS / KSM_MATRIX_SEEDS change that; ~90 s here: the
6.12 guest boots in 7-10 s under TCG, the 6.1 one in 9-26 s, a scenario takes 0.5 s on 6.12 and
0.65 s on 6.1). `make test-long` runs it with 100 seeds, and the nightly matrix is `make kernels`
(every installed kernel and the host, 200 seeds).

`ksmh kernels check` runs as a real process: while its guest is up, the run's journal must name
the guest's QEMU (so `ksmh recover` could stop it after a SIGKILL), and once it is done, neither
the journal nor the guest may be left. The guests have mem_merge off (the host's KSM never sees
them), so no host lock is needed. The time per kernel is printed and kept in matrix.json.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness import procfs
from harness.errors import HarnessError
from harness.guests.image import installed_kernels
from harness.journal import JOURNAL_DIR, Journal, journals, load
from harness.pytest_plugin import require
from harness.scenario.examples import worked_examples

pytestmark = pytest.mark.qemu
SEEDS = int(os.environ.get("KSM_MATRIX_SEEDS", "30"))
KERNELS = os.environ.get("KSM_MATRIX_KERNELS", "6.1 6.12").split()


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


def journal_of(pid: int) -> Journal | None:
    """The run journal owned by process `pid`, if it wrote one."""
    for path in journals(JOURNAL_DIR):
        try:
            j = load(path)
        except HarnessError:
            continue
        if j.owner_pid == pid:
            return j
    return None


@pytest.mark.parametrize("series", KERNELS)
def test_guest_kernel_matches_its_model_exactly(series: str, tmp_path: Path) -> None:
    release = installed(series)
    out = tmp_path / "matrix"
    cmd = [sys.executable, "-m", "harness.cli", "kernels", "check", "--kernel", release]
    proc = subprocess.Popen(
        [*cmd, "--seeds", str(SEEDS), "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stderr is not None
    said: list[str] = []
    journaled: Journal | None = None
    running: dict[int, str] = {}  # QEMU pid -> its command line while the guest is up
    for line in proc.stderr:
        said.append(line.rstrip("\n"))
        if "guest up in" in line and os.geteuid() == 0:
            journaled = journal_of(proc.pid)
            for fleet in journaled.fleets if journaled else []:
                running.update({p: procfs.cmdline(p) for p in fleet.guests.values() if p})
    stdout, _ = proc.communicate(timeout=60)
    log = "\n".join(said)
    if os.geteuid() == 0:
        # Like every run's fleet, the guest is in a journal while it runs ...
        assert journaled is not None and journaled.kind == "kernels", log
        assert len(journaled.fleets) == 1 and journaled.tunables == {}  # no knob of the host
        [(qemu, command)] = running.items()
        assert command.startswith("qemu-system-") and journaled.fleets[0].run_id in command
        # ... and after a clean end neither the journal nor the guest is left.
        assert journal_of(proc.pid) is None
        assert procfs.cmdline(qemu) != command, f"QEMU {qemu} of the guest still runs"
    doc = json.loads((out / "matrix.json").read_text())
    [k] = doc["kernels"]
    assert k["error"] is None, k["error"]
    assert k["mismatches"] == [], (out / "matrix.md").read_text()
    assert (k["release"], k["where"]) == (release, "guest")
    assert k["scenarios"] == k["exact"] == len(worked_examples()) + SEEDS
    # The profile is the release's, adjusted by what the kernel showed (a fork-reset probe).
    assert k["profile"].split("+")[0].split("-")[0] == series
    assert set(k["probed"]) == {"fork_resets_counters"}
    assert proc.returncode == 0, log
    assert f"| {release} | guest | {k['profile']} |" in (out / "matrix.md").read_text()
    assert f"{k['exact']}/{k['scenarios']} exact" in stdout
    print(
        f"\n{release}: {k['exact']}/{k['scenarios']} exact, profile {k['profile']}, "
        f"{k['seconds']:.0f} s (boot {k['boot_seconds']:.0f} s)"
    )
