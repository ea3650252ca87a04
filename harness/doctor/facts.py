"""Collection of facts: everything the finding families judge, read once.

Host: the KSM knobs and counters, THP settings, MemAvailable, NUMA nodes. Per examined
process: smaps (VmFlags, AnonHugePages, Rss), ksm_stat, VmPin/VmLck, pinning file
descriptors (VFIO, io_uring), numa_maps on multi-node hosts, and, as root, the content keys
of its mergeable and candidate memory (harness.doctor.content) plus its KSM page frames
(harness.doctor.exposure). Every process KSM scans (procfs.ksm_users) is also listed with
the size of its mergeable memory, because all of them make up one full scan.

While the memory is captured a KnobWatch samples the knobs and names their writers; the
window lasts at least `window` seconds. Then a sample of mergeable pages is keyed again to
measure volatility.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import procfs
from harness.doctor import content as ct
from harness.doctor.exposure import KpageFlags
from harness.doctor.paths import KSM_ROOT, NODE_ROOT, THP_ROOT
from harness.doctor.watch import KnobWatch, Tuner, WatchResult, known_tuners
from harness.errors import HarnessError
from harness.ksm.types import PAGE_SIZE, KsmStat
from harness.shadow import ShadowError

PIN_FDS = ("/dev/vfio/", "anon_inode:[io_uring]", "/dev/infiniband/")


@dataclass
class Options:
    """What to look at and the thresholds findings use."""

    window: float = 2.0  # seconds of knob sampling (at least the capture's duration)
    min_vma: int = 1 << 20  # candidate VMAs smaller than this are not keyed
    min_duplicates: int = 256  # pages of duplicates before a VMA finding is made
    max_scan_seconds: float = 600.0  # a longer full scan is slow-full-scan
    target_scan_seconds: float = 60.0  # the scan time the suggested pages_to_scan gives
    volatile_fraction: float = 0.9  # changed share of the sample for volatile-process
    max_read: int = 64 << 30  # bytes of memory the doctor keys at most, all processes
    content: bool = True  # False: no content keys (no root, or --no-content)


@dataclass
class HostFacts:
    ksm_root: Path
    present: bool
    thp_root: Path = THP_ROOT
    knobs: dict[str, str] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=dict)
    thp: dict[str, str] = field(default_factory=dict)  # enabled, defrag (raw text)
    meminfo: dict[str, int] = field(default_factory=dict)
    nodes: list[int] = field(default_factory=list)
    root: bool = False
    page_size: int = 4096

    def knob(self, name: str) -> int | None:
        v = self.knobs.get(name)
        return int(v) if v is not None and v.lstrip("-").isdigit() else None

    @property
    def advisor(self) -> str | None:
        mode = self.knobs.get("advisor_mode")
        if mode is None:
            return None
        found = re.search(r"\[([^\]]+)\]", mode)
        return found.group(1) if found else mode


@dataclass
class ProcessFacts:
    pid: int
    name: str  # the guest name, or comm-pid
    comm: str = ""
    cmdline: str = ""
    vmas: list[procfs.Vma] = field(default_factory=list)
    stat: KsmStat | None = None
    status: dict[str, int] = field(default_factory=dict)  # VmPin, VmLck in kB
    pin_fds: list[tuple[str, str]] = field(default_factory=list)  # (fd, target)
    numa: dict[int, int] = field(default_factory=dict)  # node -> pages of mergeable VMAs
    content: ct.ProcessContent | None = None
    volatile: tuple[int, int] | None = None  # (sampled, changed)
    error: str | None = None

    @property
    def mergeable_vmas(self) -> list[procfs.Vma]:
        return [v for v in self.vmas if v.mergeable]

    @property
    def mergeable_rss_pages(self) -> int:
        return sum(v.rss_kib for v in self.mergeable_vmas) * 1024 // PAGE_SIZE


@dataclass
class UserFacts:
    """A process KSM scans (any, examined or not) and the size it adds to a full scan."""

    pid: int
    comm: str
    cmdline: str
    reason: str
    mergeable_pages: int  # present pages of its mergeable VMAs (smaps Rss)


@dataclass
class Facts:
    host: HostFacts
    options: Options
    selection: str  # "all", "pids" or "guests RUN_ID"
    processes: dict[int, ProcessFacts] = field(default_factory=dict)
    users: list[UserFacts] = field(default_factory=list)
    tuners: list[Tuner] = field(default_factory=list)
    watch: WatchResult | None = None
    not_checked: list[str] = field(default_factory=list)
    seconds: float = 0.0
    bytes_keyed: int = 0


def read_host(ksm_root: Path, proc: Path, thp_root: Path, node_root: Path) -> HostFacts:
    h = HostFacts(ksm_root, (ksm_root / "run").exists(), thp_root, root=os.geteuid() == 0)
    if h.present:
        for entry in sorted(ksm_root.iterdir()):
            try:
                text = entry.read_text().strip()
            except OSError:
                continue
            if text.lstrip("-").isdigit() and entry.name in _COUNTERS:
                h.counters[entry.name] = int(text)
            else:
                h.knobs[entry.name] = text
    for name in ("enabled", "defrag"):
        with contextlib.suppress(OSError):
            h.thp[name] = (thp_root / name).read_text().strip()
    h.meminfo = procfs.meminfo(proc)
    try:
        h.nodes = sorted(
            int(p.name[4:]) for p in node_root.glob("node[0-9]*") if p.name[4:].isdigit()
        )
    except OSError:
        h.nodes = []
    return h


_COUNTERS = frozenset(
    {
        "pages_shared", "pages_sharing", "pages_unshared", "pages_volatile", "full_scans",
        "pages_scanned", "pages_skipped", "stable_node_chains", "stable_node_dups",
        "ksm_zero_pages", "general_profit",
    }
)  # fmt: skip


def read_status(pid: int, proc: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        text = (proc / str(pid) / "status").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmPin", "VmLck", "VmRSS") and rest.split() and rest.split()[0].isdigit():
            out[name] = int(rest.split()[0])
    return out


def read_pin_fds(pid: int, proc: Path) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    try:
        fds = sorted((proc / str(pid) / "fd").iterdir(), key=lambda p: int(p.name))
    except (OSError, ValueError):
        return out
    for fd in fds:
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith(PIN_FDS) and target != "/dev/vfio/vfio":
            out.append((fd.name, target))
    return out


_NUMA_N = re.compile(r"\bN(\d+)=(\d+)\b")


def read_numa(pid: int, proc: Path, vmas: list[procfs.Vma]) -> dict[int, int]:
    """node -> pages of the mergeable VMAs, from /proc/PID/numa_maps."""
    starts = {v.start for v in vmas if v.mergeable}
    out: dict[int, int] = {}
    try:
        text = (proc / str(pid) / "numa_maps").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        addr, _, rest = line.partition(" ")
        try:
            if int(addr, 16) not in starts:
                continue
        except ValueError:
            continue
        for node, pages in _NUMA_N.findall(rest):
            out[int(node)] = out.get(int(node), 0) + int(pages)
    return out


def read_process(pid: int, name: str, proc: Path, multi_node: bool) -> ProcessFacts:
    p = ProcessFacts(pid, name, procfs.comm(pid, proc) or "", procfs.cmdline(pid, proc, 400))
    try:
        p.vmas = procfs.smaps(pid, proc)
        p.stat = procfs.ksm_stat(pid, proc)
    except HarnessError as exc:
        p.error = exc.message
        return p
    p.status = read_status(pid, proc)
    p.pin_fds = read_pin_fds(pid, proc)
    if multi_node:
        p.numa = read_numa(pid, proc, p.vmas)
    return p


def read_users(proc: Path, facts: dict[int, ProcessFacts]) -> list[UserFacts]:
    out = []
    me = os.getpid()
    for u in procfs.ksm_users(proc, exclude={me}):
        known = facts.get(u.pid)
        if known is not None and not known.error:
            pages = known.mergeable_rss_pages
        else:
            try:
                vmas = procfs.smaps(u.pid, proc)
            except HarnessError:
                vmas = []
            pages = sum(v.rss_kib for v in vmas if v.mergeable) * 1024 // PAGE_SIZE
        out.append(UserFacts(u.pid, u.comm, u.cmdline, u.reason, pages))
    return out


def collect(
    targets: dict[int, str],
    selection: str,
    options: Options,
    *,
    ksm_root: Path = KSM_ROOT,
    proc: Path = procfs.PROC,
    thp_root: Path = THP_ROOT,
    node_root: Path = NODE_ROOT,
) -> Facts:
    """Read every fact about the host and `targets` (pid -> name); see the module docstring."""
    t0 = time.monotonic()
    host = read_host(ksm_root, proc, thp_root, node_root)
    facts = Facts(host, options, selection)
    multi = len(host.nodes) > 1
    for pid, name in sorted(targets.items()):
        facts.processes[pid] = read_process(pid, name, proc, multi)
    facts.users = read_users(proc, facts.processes)
    facts.tuners = known_tuners(proc, ksm_root)
    watch = KnobWatch(ksm_root, proc, use_fanotify=host.root) if host.present else None
    if watch is not None:
        watch.start()
    try:
        samples = _capture_all(facts, proc)
        remaining = options.window - (time.monotonic() - t0)
        if remaining > 0:
            time.sleep(remaining)
        for pid, sample in samples.items():
            if sample:
                facts.processes[pid].volatile = ct.changed_pages(pid, sample, proc)
    finally:
        if watch is not None:
            facts.watch = watch.stop()
            if watch.why_not and host.root:
                facts.not_checked.append(f"knob writers cannot be named ({watch.why_not})")
    _not_checked(facts)
    facts.seconds = time.monotonic() - t0
    return facts


def _capture_all(facts: Facts, proc: Path) -> dict[int, list[tuple[int, Any]]]:
    """Content keys of every examined process within the read budget; volatility samples."""
    samples: dict[int, list[tuple[int, Any]]] = {}
    if not facts.options.content or not facts.host.root:
        return samples
    flags = KpageFlags(proc)
    budget = facts.options.max_read
    try:
        for p in facts.processes.values():
            if p.error:
                continue
            size = sum(v.resident_kib for v in p.vmas if v.mergeable or ct.vma_kind(v)) * 1024
            if size > budget:
                facts.not_checked.append(
                    f"pid {p.pid} ({p.name}): contents not keyed, the read budget "
                    f"(--max-read) is spent"
                )
                continue
            try:
                p.content = ct.capture(p.pid, p.vmas, flags, proc, facts.options.min_vma)
            except (ShadowError, HarnessError) as exc:
                p.error = exc.message
                continue
            budget -= p.content.bytes_read
            facts.bytes_keyed += p.content.bytes_read
            samples[p.pid] = ct.volatility_sample(p.content)
    finally:
        flags.close()
    ct.mark_self_dups(p.content for p in facts.processes.values() if p.content is not None)
    return samples


def _not_checked(facts: Facts) -> None:
    unreadable = [p for p in facts.processes.values() if p.error]
    if not facts.host.root:
        # One line: everything a non-root doctor misses, whatever the processes.
        facts.not_checked = [
            "not root: other users' processes"
            + (f" ({len(unreadable)} examined)" if unreadable else "")
            + ", page contents (would-merge counts, volatility), page frames (THP, KSM pages, "
            "the sharing matrix) and knob writers were not checked"
        ]
    elif unreadable:
        facts.not_checked.append(
            "could not read "
            + ", ".join(f"pid {p.pid} ({p.error})" for p in unreadable[:5])
            + (f" and {len(unreadable) - 5} more" if len(unreadable) > 5 else "")
        )
