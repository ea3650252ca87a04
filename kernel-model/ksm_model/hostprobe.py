"""Read the running kernel's settings that a model of it needs (the only ksm_model module
that does I/O; the model's core never imports it).

    from ksm_model.hostprobe import host_profile, probe
    Kernel(profile=host_profile())      # what Kernel(profile="host") does
    host = probe()
    k = Kernel(profile="host", **host.kernel_args())
    k.ksmd_runtime_ns = host.ksmd_runtime_ns  # for the scan-time advisor's first step

host_profile(): the running kernel's release, the file names in /sys/kernel/mm/ksm and the
line names of /proc/self/ksm_stat, handed to ksm_model.profiles.select. Behaviour that only a
probe can tell (stable backports) is measured by harness.kernels.detect, which drives KSM.

probe(): the host settings beside the profile:
- hz: CONFIG_HZ from /proc/config.gz, else /boot/config-$(uname -r), else 250;
- pt_reclaim: CONFIG_PT_RECLAIM=y in the same config (else False);
- thp, thp_use_zero_page: /sys/kernel/mm/transparent_hugepage/{enabled,use_zero_page};
- ksmd_runtime_ns: ksmd's accumulated CPU time (the first field of /proc/<ksmd>/schedstat,
  its sum_exec_runtime: what task_sched_runtime() gives the advisor), or None.
"""

from __future__ import annotations

import gzip
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


DEFAULT_HZ = 250
_HZ_RE = re.compile(r"^CONFIG_HZ=(\d+)$", re.M)


@dataclass(frozen=True)
class HostSettings:
    """What probe() found; `sources` says where each value came from."""

    release: str
    hz: int
    pt_reclaim: bool
    thp: str
    thp_use_zero_page: bool
    ksmd_runtime_ns: int | None
    sources: dict[str, str]

    def kernel_args(self) -> dict[str, Any]:
        """Keyword arguments for ksm_model.Kernel."""
        return {
            "hz": self.hz,
            "thp": self.thp,
            "thp_use_zero_page": self.thp_use_zero_page,
            "pt_reclaim": self.pt_reclaim,
        }


def config_hz(text: str) -> int | None:
    """CONFIG_HZ from a kernel .config text."""
    m = _HZ_RE.search(text)
    return int(m.group(1)) if m else None


def config_pt_reclaim(text: str) -> bool:
    """CONFIG_PT_RECLAIM=y in a kernel .config text."""
    return re.search(r"^CONFIG_PT_RECLAIM=y$", text, re.M) is not None


def boot_config(boot: Path, release: str) -> tuple[str, str]:
    """(/boot/config-RELEASE's text, its path); ("", "default") when unreadable. Also for a
    kernel that is installed but not running (a guest's)."""
    cfg = boot / f"config-{release}"
    try:
        text = cfg.read_text(errors="replace")
        if config_hz(text):
            return text, str(cfg)
    except OSError:
        pass
    return "", "default"


def read_config(proc: Path, boot: Path, release: str) -> tuple[str, str]:
    """(the running kernel's .config text, where it came from): /proc/config.gz, else
    /boot/config-RELEASE; ("", "default") when unreadable."""
    try:
        text = gzip.decompress((proc / "config.gz").read_bytes()).decode()
        if config_hz(text):
            return text, str(proc / "config.gz")
    except (OSError, EOFError, gzip.BadGzipFile, UnicodeDecodeError):
        pass
    return boot_config(boot, release)


def bracketed(text: str) -> str | None:
    """The [selected] word of a sysfs choice file such as "always [madvise] never"."""
    m = re.search(r"\[(\w+)\]", text)
    return m.group(1) if m else None


def read_thp(sys_root: Path) -> tuple[str, bool, str]:
    """(enabled mode, use_zero_page, where); a kernel without THP reads as never."""
    base = sys_root / "kernel/mm/transparent_hugepage"
    try:
        mode = bracketed((base / "enabled").read_text()) or "never"
    except OSError:
        return "never", False, "absent"
    try:
        zero = (base / "use_zero_page").read_text().strip() == "1"
    except OSError:
        zero = False
    return mode, zero, str(base)


def ksmd_pid(proc: Path) -> int | None:
    """The pid of the ksmd kernel thread."""
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() == "ksmd":
                return int(entry.name)
        except OSError:
            continue
    return None


def ksmd_runtime_ns(proc: Path) -> int | None:
    """ksmd's sum_exec_runtime in ns (None without ksmd or schedstat)."""
    pid = ksmd_pid(proc)
    if pid is None:
        return None
    try:
        return int((proc / str(pid) / "schedstat").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def probe(
    proc: Path = Path("/proc"),
    sys_root: Path = Path("/sys"),
    boot: Path = Path("/boot"),
    release: str | None = None,
) -> HostSettings:
    """The running kernel's model-relevant settings (every path injectable for tests)."""
    rel = release if release is not None else os.uname().release
    config, config_from = read_config(proc, boot, rel)
    thp, zero, thp_from = read_thp(sys_root)
    return HostSettings(
        release=rel,
        hz=config_hz(config) or DEFAULT_HZ,
        pt_reclaim=config_pt_reclaim(config),
        thp=thp,
        thp_use_zero_page=zero,
        ksmd_runtime_ns=ksmd_runtime_ns(proc),
        sources={"config": config_from, "thp": thp_from},
    )
