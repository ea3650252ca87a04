"""SysfsBackend: the real kernel, through /sys/kernel/mm/ksm and /proc.

Both roots are parameters so unit tests run against fake trees in tests/fixtures, as
prometheus client_python's ProcessCollector(proc=...) does.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from harness import procfs
from harness.errors import HarnessError, KsmUnavailable
from harness.ksm.backend import BackendBase
from harness.ksm.types import KsmStat
from harness.paths import is_root

KSM_ROOT = Path("/sys/kernel/mm/ksm")
PROC_ROOT = Path("/proc")


class SysfsBackend(BackendBase):
    """The running kernel's KSM."""

    source = "kernel"

    def __init__(self, root: Path = KSM_ROOT, proc: Path = PROC_ROOT) -> None:
        self.root = Path(root)
        self.proc = Path(proc)
        if not (self.root / "run").exists():
            raise KsmUnavailable(
                f"no KSM at {self.root} (kernel built without CONFIG_KSM?)",
                hint="use --backend model to predict what KSM would do",
            )
        self.page_size = os.sysconf("SC_PAGE_SIZE") if self.root == KSM_ROOT else 4096

    def writable(self) -> bool:
        """True when this process may write the knobs (root on a read-write sysfs)."""
        return os.access(self.root / "run", os.W_OK)

    def _read(self, name: str) -> str | None:
        try:
            return (self.root / name).read_text()
        except FileNotFoundError:
            return None

    def _write(self, name: str, text: str) -> None:
        path = self.root / name
        if not path.exists():
            raise OSError(errno.ENOENT, f"no such KSM file: {name}")
        # One write() call with a newline, exactly what `echo V > file` does (the kernel's
        # parsers accept it); O_TRUNC keeps plain-file trees in tests byte-identical too.
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
        try:
            os.write(fd, (text + "\n").encode())
        finally:
            os.close(fd)

    def _mem_available(self) -> int | None:
        return procfs.mem_available(self.proc)

    def ksm_stat(self, pid: int) -> KsmStat:
        return procfs.ksm_stat(pid, self.proc)

    def registered(self) -> int | None:
        try:
            users = len(procfs.ksm_users(self.proc))
        except HarnessError:
            return None
        # /proc/PID/ksm_stat is root-only (0400): without root, 0 only means "none of ours".
        return None if users == 0 and not is_root() else users
