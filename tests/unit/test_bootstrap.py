"""scripts/bootstrap.sh as non-root with packages missing: one message, one command, exit 1."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.run import run

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def sandbox() -> Iterator[Path]:
    """A world-readable copy of the script, and a dpkg-query that knows no package.

    The fake dpkg-query stands for a machine without the packages, which this one cannot be
    made into on demand; the user (nobody, via setpriv) is real.
    """
    top = Path(tempfile.mkdtemp(prefix="ksmh-boot-"))
    try:
        (top / "scripts").mkdir()
        shutil.copy(REPO / "scripts" / "bootstrap.sh", top / "scripts" / "bootstrap.sh")
        (top / "bin").mkdir()
        fake = top / "bin" / "dpkg-query"
        fake.write_text("#!/bin/sh\nexit 1\n")
        for p in [top, *top.rglob("*")]:
            p.chmod(p.stat().st_mode | stat.S_IROTH | stat.S_IXOTH)
        yield top
    finally:
        shutil.rmtree(top)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to user nobody")
def test_non_root_lists_missing_packages_and_the_command(sandbox: Path) -> None:
    proc = run(
        [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "bash",
            str(sandbox / "scripts" / "bootstrap.sh"),
        ],
        env={"PATH": f"{sandbox / 'bin'}:/usr/bin:/bin"},
        check=False,
    )
    assert proc.returncode == 1
    lines = proc.stderr.splitlines()
    assert lines[0].startswith("ksm-harness: missing system packages: qemu-system-x86 ")
    assert "prometheus" in lines[0] and "openssh-server" in lines[0]
    missing = lines[0].split(": ", 2)[2]
    assert lines[1] == f"  install them with: sudo apt-get install -y {missing}"
    assert len(lines) == 2
    assert not (sandbox / ".venv").exists()
