"""Host facts for run.json and the THP switch QEMU inherits."""

from __future__ import annotations

import os
import platform
import socket
import sys
from pathlib import Path
from typing import Any

from harness.errors import HarnessError
from harness.procfs import PROC, meminfo
from harness.run import run

PR_SET_THP_DISABLE = 41


def set_thp_disable(disable: bool) -> bool:
    """prctl(PR_SET_THP_DISABLE) on this process; children inherit it across fork and exec.

    Returns False when the call is not available (not Linux, or refused)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return False
    return int(libc.prctl(PR_SET_THP_DISABLE, int(disable), 0, 0, 0)) == 0


def thp_enabled(pid: int, proc: Path = PROC) -> bool | None:
    """The THP_enabled line of /proc/PID/status (None when absent)."""
    try:
        for line in (proc / str(pid) / "status").read_text().splitlines():
            if line.startswith("THP_enabled:"):
                return line.split()[1] == "1"
    except OSError:
        return None
    return None


def qemu_version() -> str | None:
    try:
        out = run(["qemu-system-x86_64", "--version"], timeout=10, check=False).stdout
    except HarnessError:
        return None
    return out.splitlines()[0].strip() if out else None


def host_facts(proc: Path = PROC) -> dict[str, Any]:
    mem = meminfo(proc)
    uname = os.uname()
    return {
        "hostname": socket.gethostname(),
        "kernel_release": uname.release,
        "kernel_version": uname.version,
        "machine": uname.machine,
        "cpus": os.cpu_count(),
        "mem_total_mib": mem.get("MemTotal", 0) // 2**20,
        "mem_available_mib": mem.get("MemAvailable", 0) // 2**20,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "qemu": qemu_version(),
    }
