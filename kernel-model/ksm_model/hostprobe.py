"""Read the running kernel's settings that a model of it needs (the only ksm_model module
that does I/O; the model's core never imports it).

    from ksm_model.hostprobe import host_profile
    Kernel(profile=host_profile())      # what Kernel(profile="host") does

host_profile(): the running kernel's release, the file names in /sys/kernel/mm/ksm and the
line names of /proc/self/ksm_stat, handed to ksm_model.profiles.select. Behaviour that only a
probe can tell (stable backports) is measured by harness.kernels.detect, which drives KSM.
"""

from __future__ import annotations

import os
from pathlib import Path

from ksm_model.profiles import Profile, select

KSM_ROOT = Path("/sys/kernel/mm/ksm")


def ksm_files(root: Path = KSM_ROOT) -> list[str] | None:
    """The names in /sys/kernel/mm/ksm (None: no KSM, or unreadable)."""
    try:
        return sorted(p.name for p in root.iterdir())
    except OSError:
        return None


def stat_fields(proc: Path = Path("/proc")) -> list[str] | None:
    """The line names of this process's /proc/self/ksm_stat (None: no such file)."""
    try:
        text = (proc / "self" / "ksm_stat").read_text()
    except OSError:
        return None
    return [line.split()[0].rstrip(":") for line in text.splitlines() if line.strip()]


def host_profile(
    root: Path = KSM_ROOT, proc: Path = Path("/proc"), release: str | None = None
) -> Profile:
    """The running kernel's profile from its release and files (every path injectable)."""
    return select(
        release if release is not None else os.uname().release,
        ksm_files(root),
        stat_fields(proc),
    )
