"""Run ksmh as a real unprivileged user (nobody, uid 65534), wherever the checkout is.

CI clones the repository where it likes, possibly under a directory other users cannot
enter (/root/...). So the command runs in a private mount namespace (`unshare --mount`, root)
in which the checkout, and the venv when it lives elsewhere, are bind-mounted under a
world-readable scratch directory; then `setpriv` drops to nobody and runs the venv's Python
there. PYTHONPATH points at the mounted `harness` and `ksm_model`, because the venv's
editable-install finders name the checkout's real path. Files of the checkout must be
world-readable (git's default with umask 022); `check()` says so if they are not.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from harness.run import run, spawn

REPO = Path(__file__).resolve().parents[2]
UID = 65534

# Mounts, then the user switch; "$@" is the command. $0: the mount list file (src\tdst lines).
SHELL = (
    'while IFS="$(printf "\\t")" read -r src dst; do mount --bind "$src" "$dst" || exit 97; '
    'done < "$0"; exec setpriv --reuid=65534 --regid=65534 --clear-groups -- "$@"'
)


@dataclass
class Nobody:
    """A scratch directory nobody may use (`home`), and how to run ksmh there as nobody."""

    top: Path  # world-readable scratch root; the mounts live under it
    home: Path  # nobody's writable directory (cwd, caches, TMPDIR)
    python: Path  # the venv's interpreter as seen inside the namespace
    pythonpath: str
    mounts: Path

    def argv(self, args: Sequence[str | Path]) -> list[str]:
        """`ksmh ARGS` as nobody (`python -m harness.cli`); a first arg "-c" runs Python code."""
        tail = [str(a) for a in args]
        if not tail or tail[0] != "-c":
            tail = ["-m", "harness.cli", *tail]
        return [
            "unshare", "--mount", "--propagation", "private", "--",
            "sh", "-c", SHELL, str(self.mounts), str(self.python), *tail,
        ]  # fmt: skip

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """A minimal environment, as a fresh login of a user without a home would have."""
        return {
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": "/nonexistent",
            "LANG": "C.UTF-8",
            "PYTHONPATH": self.pythonpath,
            "PYTHONDONTWRITEBYTECODE": "1",
            "XDG_CACHE_HOME": str(self.home / "cache"),
            "TMPDIR": str(self.home / "tmp"),
            "KSM_HARNESS_LOCK": os.environ.get("KSM_HARNESS_LOCK", "/run/ksm-harness/ksm.lock"),
            **(extra or {}),
        }

    def ksmh(
        self, *args: str | Path, env: Mapping[str, str] | None = None, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        return run(self.argv(args), env=self.env(env), cwd=self.home, check=False,
                   timeout=timeout)  # fmt: skip

    def start(
        self, *args: str | Path, env: Mapping[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        return spawn(self.argv(args), env=self.env(env), cwd=self.home,
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip

    def check(self) -> None:
        """Fail with the reason when nobody cannot import the harness from the mount."""
        proc = self.ksmh("-c", "import harness.cli, ksm_model, numpy, yaml", timeout=60)
        assert proc.returncode == 0, (
            "user nobody cannot import the harness from the checkout (are its files "
            f"world-readable?): {proc.stderr.strip()[-400:]}"
        )


@contextmanager
def as_nobody() -> Iterator[Nobody]:
    """The scratch directory and mounts for running ksmh as nobody; removed afterwards."""
    top = Path(tempfile.mkdtemp(prefix="ksmh-nobody-"))
    try:
        top.chmod(0o755)
        home = top / "home"
        home.mkdir()
        (home / "tmp").mkdir()
        for d in (home, home / "tmp"):
            os.chown(d, UID, UID)
        view = top / "repo"
        view.mkdir()
        mounts = [(REPO, view)]
        prefix = Path(sys.prefix)
        if prefix.is_relative_to(REPO):
            python = view / prefix.relative_to(REPO) / "bin" / "python"
        else:
            (top / "venv").mkdir()
            mounts.append((prefix, top / "venv"))
            python = top / "venv" / "bin" / "python"
        listing = top / "mounts"
        listing.write_text("".join(f"{src}\t{dst}\n" for src, dst in mounts))
        listing.chmod(stat.S_IRUSR)
        yield Nobody(top, home, python, f"{view}:{view / 'kernel-model'}", listing)
    finally:
        shutil.rmtree(top)
