"""Host facts for run.json, MemAvailable, and ksmd's CPU time from its /proc stat."""

from __future__ import annotations

import os
import platform
import socket
import sys
from pathlib import Path
from typing import Any

from harness.errors import HarnessError
from harness.run import run

PROC = Path("/proc")


def meminfo(proc: Path = PROC) -> dict[str, int]:
    """/proc/meminfo in bytes."""
    out: dict[str, int] = {}
    try:
        for line in (proc / "meminfo").read_text().splitlines():
            name, _, rest = line.partition(":")
            parts = rest.split()
            if parts and parts[0].isdigit():
                out[name] = int(parts[0]) * (1024 if len(parts) > 1 else 1)
    except OSError:
        pass
    return out


def mem_available(proc: Path = PROC) -> int | None:
    return meminfo(proc).get("MemAvailable")


def ksmd_pid(proc: Path = PROC) -> int | None:
    """The PID of the ksmd kernel thread, or None (no KSM, or /proc hides it)."""
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() == "ksmd":
                return int(entry.name)
        except OSError:
            continue
    return None


def cpu_seconds(pid: int, proc: Path = PROC) -> float:
    """utime + stime of a process, in seconds (fields 14 and 15 of /proc/PID/stat)."""
    try:
        stat = (proc / str(pid) / "stat").read_text()
    except OSError as exc:
        raise HarnessError(f"cannot read /proc/{pid}/stat: {exc}") from None
    fields = stat.rpartition(")")[2].split()
    ticks = int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


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
