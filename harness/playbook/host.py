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
