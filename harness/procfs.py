"""Everything the harness reads from /proc, in one place, with the root injectable.

Tests pass a fake tree (tests/fixtures/proc) as `proc`; code on a live host uses PROC. Parsers
take text and are pure; readers take (pid, proc) and raise nothing but the documented errors.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path

from harness.errors import HarnessError, KsmUnavailable
from harness.ksm.types import PAGE_SIZE, KsmStat

PROC = Path("/proc")


# -- /proc/PID/ksm_stat ------------------------------------------------------------------------
def parse_ksm_stat(pid: int, text: str) -> KsmStat:
    """Parse /proc/PID/ksm_stat: 'name value' lines, yes/no for the two flags (6.14+ 'name:')."""
    values: dict[str, int | bool] = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        name = name.rstrip(":")
        value = value.strip()
        if value in ("yes", "no"):
            values[name] = value == "yes"
        elif value.lstrip("-").isdigit() and len(value) < 40:
            values[name] = int(value)

    def num(key: str) -> int | None:
        v = values.get(key)
        return None if v is None or isinstance(v, bool) else v

    def flag(key: str) -> bool | None:
        v = values.get(key)
        return v if isinstance(v, bool) else None

    return KsmStat(
        pid=pid,
        rmap_items=num("ksm_rmap_items"),
        zero_pages=num("ksm_zero_pages"),
        merging_pages=num("ksm_merging_pages"),
        process_profit=num("ksm_process_profit"),
        merge_any=flag("ksm_merge_any"),
        mergeable=flag("ksm_mergeable"),
    )


def ksm_stat(pid: int, proc: Path = PROC) -> KsmStat:
    """A process's KSM figures: ksm_stat (6.1+), else ksm_merging_pages (5.19-6.0).

    HarnessError when the process does not exist; KsmUnavailable when the kernel has neither
    file.
    """
    base = proc / str(pid)
    try:
        return parse_ksm_stat(pid, (base / "ksm_stat").read_text())
    except FileNotFoundError:
        pass
    except PermissionError:
        raise HarnessError(f"cannot read /proc/{pid}/ksm_stat", hint="run as root") from None
    try:
        merging = int((base / "ksm_merging_pages").read_text().strip())
    except FileNotFoundError:
        if not base.exists():
            raise HarnessError(f"no process with pid {pid}") from None
        raise KsmUnavailable(f"this kernel has no per-process KSM stats for pid {pid}") from None
    return KsmStat(pid=pid, merging_pages=merging)


# -- /proc/meminfo ---------------------------------------------------------------------------------
def thp_enabled(pid: int, proc: Path = PROC) -> bool | None:
    """The THP_enabled line of /proc/PID/status: False after prctl(PR_SET_THP_DISABLE)
    (None when absent)."""
    try:
        for line in (proc / str(pid) / "status").read_text().splitlines():
            if line.startswith("THP_enabled:"):
                return line.split()[1] == "1"
    except OSError:
        return None
    return None


def parse_meminfo(text: str) -> dict[str, int]:
    """/proc/meminfo text -> name: bytes (values given in kB are converted)."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            out[name] = int(parts[0]) * (1024 if len(parts) > 1 else 1)
    return out


def meminfo(proc: Path = PROC) -> dict[str, int]:
    """/proc/meminfo in bytes; empty when unreadable."""
    try:
        return parse_meminfo((proc / "meminfo").read_text())
    except OSError:
        return {}


def mem_available(proc: Path = PROC) -> int | None:
    """MemAvailable in bytes, None when unknown."""
    return meminfo(proc).get("MemAvailable")


# -- /proc/PID/smaps -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Vma:
    """One mapping of /proc/PID/smaps: [start, end) bytes, VmFlags, name, and its counters."""

    start: int
    end: int
    flags: tuple[str, ...]
    name: str = ""
    anon_huge_kib: int = 0  # AnonHugePages
    ksm_kib: int = 0  # KSM (6.6+)
    rss_kib: int = 0
    shared_hugetlb_kib: int = 0  # hugetlbfs pages are not in Rss
    private_hugetlb_kib: int = 0

    @property
    def pages(self) -> int:
        return (self.end - self.start) // PAGE_SIZE

    @property
    def mergeable(self) -> bool:
        return "mg" in self.flags

    @property
    def resident_kib(self) -> int:
        """Rss, plus the hugetlbfs pages smaps counts apart."""
        return self.rss_kib + self.shared_hugetlb_kib + self.private_hugetlb_kib


_VMA_COUNTERS = {
    "AnonHugePages:": "anon_huge_kib",
    "KSM:": "ksm_kib",
    "Rss:": "rss_kib",
    "Shared_Hugetlb:": "shared_hugetlb_kib",
    "Private_Hugetlb:": "private_hugetlb_kib",
}


def parse_smaps(text: str) -> list[Vma]:
    """Every VMA of an smaps text with its VmFlags (ascending addresses, as the kernel lists)."""
    vmas: list[Vma] = []
    cur: dict[str, object] | None = None
    for line in text.splitlines():
        head = line.split(None, 5)
        if head and "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
            lo, _, hi = head[0].partition("-")
            try:
                cur = {
                    "start": int(lo, 16),
                    "end": int(hi, 16),
                    "name": head[5].strip() if len(head) > 5 else "",
                }
            except ValueError:
                cur = None
            continue
        if cur is None or not head:
            continue
        if head[0] in _VMA_COUNTERS and len(head) > 1 and head[1].isdigit():
            cur[_VMA_COUNTERS[head[0]]] = int(head[1])
        elif head[0] == "VmFlags:":
            vmas.append(Vma(flags=tuple(line.split()[1:]), **cur))  # type: ignore[arg-type]
            cur = None
    return vmas


def smaps(pid: int, proc: Path = PROC) -> list[Vma]:
    """The VMAs of a live process; HarnessError if it is gone or unreadable."""
    try:
        return parse_smaps((proc / str(pid) / "smaps").read_text())
    except FileNotFoundError:
        raise HarnessError(f"no process {pid}") from None
    except ProcessLookupError:
        raise HarnessError(f"no process {pid}") from None
    except PermissionError:
        raise HarnessError(f"cannot read /proc/{pid}/smaps", hint="run as root") from None


# -- /proc/PID/stat, comm, cmdline: identity and liveness -------------------------------------
def comm(pid: int, proc: Path = PROC) -> str | None:
    try:
        return (proc / str(pid) / "comm").read_text().strip()
    except OSError:
        return None


def cmdline(pid: int, proc: Path = PROC, limit: int = 200) -> str:
    """The command line on one line (whitespace runs as one space), cut to `limit` characters
    ('' when unreadable)."""
    try:
        raw = (proc / str(pid) / "cmdline").read_bytes()
    except OSError:
        return ""
    # One line: arguments may hold newlines (python -c SCRIPT), and messages are one line.
    text = " ".join(raw.replace(b"\0", b" ").decode(errors="replace").split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _stat_fields(pid: int, proc: Path) -> list[str] | None:
    """The fields of /proc/PID/stat after the command (field 3 first), None if gone."""
    try:
        text = (proc / str(pid) / "stat").read_text()
    except OSError:
        return None
    return text.rpartition(")")[2].split()


def start_time(pid: int, proc: Path = PROC) -> int | None:
    """Field 22 of /proc/PID/stat: clock ticks since boot. With the pid it names a process
    uniquely (a pid can be reused, a (pid, start time) pair cannot)."""
    fields = _stat_fields(pid, proc)
    if fields is None or len(fields) < 20:
        return None
    return int(fields[19])


def pid_alive(pid: int, proc: Path = PROC, started: int | None = None) -> bool:
    """True when `pid` exists (and, if `started` is given, is the process that started then).

    A zombie counts as dead: it holds no memory and will never act again.
    """
    fields = _stat_fields(pid, proc)
    if fields is None or not fields or fields[0] in ("Z", "X"):
        return False
    return started is None or (len(fields) >= 20 and int(fields[19]) == started)


def parent_pid(pid: int, proc: Path = PROC) -> int | None:
    """Field 4 of /proc/PID/stat: the parent's pid (1 once the real parent died), None if gone."""
    fields = _stat_fields(pid, proc)
    return int(fields[1]) if fields is not None and len(fields) > 1 else None


def lineage(pid: int, proc: Path = PROC) -> list[int]:
    """`pid` and its ancestors up to (excluding) init, nearest first."""
    out: list[int] = []
    cur: int | None = pid
    while cur is not None and cur > 1 and cur not in out:
        out.append(cur)
        cur = parent_pid(cur, proc)
    return out


def cpu_seconds(pid: int, proc: Path = PROC) -> float:
    """utime + stime of a process, in seconds (fields 14 and 15 of /proc/PID/stat)."""
    fields = _stat_fields(pid, proc)
    if fields is None:
        raise HarnessError(f"cannot read /proc/{pid}/stat")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def sched_runtime_ns(pid: int, proc: Path = PROC) -> int | None:
    """The task's CPU time in nanoseconds (the first field of /proc/PID/schedstat, its
    sum_exec_runtime; CONFIG_SCHED_INFO), or None when the file is missing or unreadable.
    Finer than cpu_seconds(), which counts in clock ticks (10 ms at USER_HZ 100)."""
    try:
        return int((proc / str(pid) / "schedstat").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def task_cpu_seconds(pid: int, proc: Path = PROC) -> float:
    """CPU time of a task in seconds: from schedstat (ns) where it exists, else from stat
    (clock ticks). HarnessError when the task is gone."""
    ns = sched_runtime_ns(pid, proc)
    return ns / 1e9 if ns is not None else cpu_seconds(pid, proc)


def pids(proc: Path = PROC) -> list[int]:
    """Every numeric entry of proc, ascending."""
    try:
        return sorted(int(e.name) for e in proc.iterdir() if e.name.isdigit())
    except OSError as exc:
        raise HarnessError(f"cannot list {proc}: {exc.strerror}") from None


def ksmd_pid(proc: Path = PROC) -> int | None:
    """The PID of the ksmd kernel thread, or None (no KSM, or /proc hides it)."""
    for pid in pids(proc):
        if comm(pid, proc) == "ksmd":
            return pid
    return None


# -- who KSM scans ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class KsmUser:
    """A process KSM knows about, and why we think so."""

    pid: int
    comm: str
    reason: str  # "ksm_mergeable: yes", "ksm_rmap_items 12", "VM_MERGEABLE mapping"
    cmdline: str = ""

    def describe(self) -> str:
        what = self.cmdline or self.comm
        return f"pid {self.pid} ({what}; {self.reason})"


def ksm_user(pid: int, proc: Path = PROC) -> KsmUser | None:
    """The one rule for "KSM scans this process, or still counts its pages":

    - ksm_stat says `ksm_mergeable: yes` (6.14+: some VMA is VM_MERGEABLE), or
    - ksm_stat shows rmap_items (KSM still counts pages of it, e.g. after MADV_UNMERGEABLE
      until ksmd next walks it), or
    - on kernels without the ksm_mergeable line: some VMA in smaps has the `mg` flag.
    None for every other process, and for processes that vanish while we look.
    """
    try:
        text = (proc / str(pid) / "ksm_stat").read_text()
    except FileNotFoundError:
        text = ""
    except OSError:
        return None
    stat = parse_ksm_stat(pid, text)
    reason = None
    if stat.mergeable:
        reason = "ksm_mergeable: yes"
    elif stat.rmap_items:
        reason = f"ksm_rmap_items {stat.rmap_items}"
    elif stat.mergeable is None:
        try:
            if any(v.mergeable for v in smaps(pid, proc)):
                reason = "VM_MERGEABLE mapping"
        except HarnessError:
            return None
    if reason is None:
        return None
    name = comm(pid, proc)
    if name is None:
        return None  # exited meanwhile
    return KsmUser(pid, name, reason, cmdline(pid, proc))


def ksm_users(proc: Path = PROC, exclude: set[int] | frozenset[int] = frozenset()) -> list[KsmUser]:
    """Every process KSM scans or still counts (see ksm_user), by pid, minus `exclude`."""
    out = []
    for pid in pids(proc):
        if pid in exclude:
            continue
        user = ksm_user(pid, proc)
        if user is not None:
            out.append(user)
    return out


def describe_users(users: list[KsmUser]) -> str:
    """ksm_users() as one line for an error message."""
    return ", ".join(u.describe() for u in users)


# -- /proc/PID/pagemap and /proc/kpageflags ---------------------------------------------------
PM_PRESENT = 1 << 63
PM_SWAP = 1 << 62
PM_FILE = 1 << 61  # file page or shared anonymous
PM_EXCLUSIVE = 1 << 56
PFN_MASK = (1 << 55) - 1
KPF_COMPOUND_HEAD = 1 << 15
KPF_COMPOUND_TAIL = 1 << 16
KPF_THP = 1 << 22
KPF_ZERO_PAGE = 1 << 24
KPF_KSM = 1 << 21


def read_pagemap(fd: int, first_page: int, count: int) -> bytes:
    """`count` little-endian u64 pagemap entries from an open /proc/PID/pagemap, from page
    `first_page` on; fewer when the mapping shrank meanwhile."""
    return os.pread(fd, count * 8, first_page * 8)


def read_kpageflags(fd: int, pfn: int, count: int = 1) -> bytes:
    """`count` u64 flag words of /proc/kpageflags from `pfn` on (root only)."""
    try:
        return os.pread(fd, count * 8, pfn * 8)
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.ENXIO):
            return b""
        raise
