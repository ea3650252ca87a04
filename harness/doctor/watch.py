"""The doctor's sampling window: who writes the KSM knobs, and how the counters move.

While the doctor captures memory, a thread samples every knob and counter every 20 ms and,
as root, reads fanotify events on the knob files: a FAN_MODIFY event carries the pid of the
process that wrote the file (sysfs writes go through vfs_write, which notifies; measured on
6.18), so a tuner is named even when it keeps no file open. A knob that changes without an
event was changed by the kernel itself (the advisor rewrites pages_to_scan) or, without root
(no fanotify), by someone we cannot name.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from harness import procfs

# fanotify(7)
FAN_CLASS_NOTIF = 0x0
FAN_CLOEXEC = 0x1
FAN_NONBLOCK = 0x2
FAN_MODIFY = 0x2
FAN_MARK_ADD = 0x1
AT_FDCWD = -100
_META = struct.Struct("IBBHQii")  # event_len, vers, reserved, metadata_len, mask, fd, pid

KNOBS = (
    "run",
    "pages_to_scan",
    "sleep_millisecs",
    "merge_across_nodes",
    "use_zero_pages",
    "max_page_sharing",
    "smart_scan",
    "advisor_mode",
    "stable_node_chains_prune_millisecs",
)
COUNTERS = ("full_scans", "pages_scanned", "pages_sharing", "pages_shared")


@dataclass
class Write:
    """One process's writes of one knob file during the window."""

    file: str
    pid: int
    comm: str | None
    cmdline: str
    count: int = 0


@dataclass
class WatchResult:
    """What the window saw: every knob's values in order, the writers, counter deltas."""

    seconds: float = 0.0
    values: dict[str, list[str]] = field(default_factory=dict)  # knob -> distinct values seen
    writes: dict[tuple[str, int], Write] = field(default_factory=dict)
    counters_start: dict[str, int] = field(default_factory=dict)
    counters_end: dict[str, int] = field(default_factory=dict)
    fanotify: bool = False  # writers could be named

    def changed(self) -> dict[str, list[str]]:
        """Knobs that took more than one value in the window."""
        return {k: v for k, v in self.values.items() if len(v) > 1}

    def delta(self, counter: str) -> int | None:
        a, b = self.counters_start.get(counter), self.counters_end.get(counter)
        return None if a is None or b is None else b - a


def _read(root: Path, name: str) -> str | None:
    try:
        return (root / name).read_text().strip()
    except OSError:
        return None


def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.fanotify_init.argtypes = [ctypes.c_uint, ctypes.c_uint]
        libc.fanotify_mark.argtypes = [
            ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int, ctypes.c_char_p,
        ]  # fmt: skip
        return libc
    except (OSError, AttributeError):
        return None


def open_fanotify(files: list[Path]) -> tuple[int | None, str | None]:
    """A fanotify fd watching FAN_MODIFY on `files`, or (None, why not)."""
    libc = _libc()
    if libc is None:
        return None, "no fanotify in this C library"
    fd = libc.fanotify_init(
        FAN_CLASS_NOTIF | FAN_CLOEXEC | FAN_NONBLOCK, os.O_RDONLY | os.O_CLOEXEC
    )
    if fd < 0:
        return None, f"fanotify_init: {os.strerror(ctypes.get_errno())}"
    for path in files:
        if libc.fanotify_mark(fd, FAN_MARK_ADD, FAN_MODIFY, AT_FDCWD, bytes(path)) != 0:
            err = os.strerror(ctypes.get_errno())
            os.close(fd)
            return None, f"fanotify_mark {path}: {err}"
    return fd, None


class KnobWatch:
    """Samples knobs and counters and drains fanotify in a thread until stop()."""

    interval = 0.02

    def __init__(self, ksm_root: Path, proc: Path = procfs.PROC, use_fanotify: bool = True):
        self.root = ksm_root
        self.proc = proc
        self.result = WatchResult()
        self._names: dict[str, str] = {}
        files = [ksm_root / k for k in KNOBS if (ksm_root / k).exists()]
        self.fd: int | None = None
        self.why_not: str | None = None
        if use_fanotify and files:
            self.fd, self.why_not = open_fanotify(files)
        self.result.fanotify = self.fd is not None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="doctor-watch", daemon=True)
        self._t0 = 0.0

    def start(self) -> KnobWatch:
        self._t0 = time.monotonic()
        self.result.counters_start = self._counters()
        self._sample()
        self._thread.start()
        return self

    def stop(self) -> WatchResult:
        self._stop.set()
        self._thread.join()
        self._drain()
        self._sample()
        self.result.counters_end = self._counters()
        self.result.seconds = time.monotonic() - self._t0
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        return self.result

    def _counters(self) -> dict[str, int]:
        out = {}
        for name in COUNTERS:
            text = _read(self.root, name)
            if text is not None and text.lstrip("-").isdigit():
                out[name] = int(text)
        return out

    def _sample(self) -> None:
        for name in KNOBS:
            value = _read(self.root, name)
            if value is None:
                continue
            seen = self.result.values.setdefault(name, [])
            if not seen or seen[-1] != value:
                seen.append(value)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._drain()
            self._sample()
            if self.fd is not None:
                with contextlib.suppress(OSError):
                    select.select([self.fd], [], [], self.interval)
            else:
                self._stop.wait(self.interval)

    def _drain(self) -> None:
        if self.fd is None:
            return
        while True:
            try:
                data = os.read(self.fd, 8192)
            except (BlockingIOError, OSError):
                return
            if not data:
                return
            off = 0
            while off + _META.size <= len(data):
                length, _v, _r, _m, _mask, efd, pid = _META.unpack_from(data, off)
                name = self._file_name(efd)
                if efd >= 0:
                    os.close(efd)
                if name is not None and pid != os.getpid():
                    self._note(name, pid)
                off += max(length, _META.size)

    def _file_name(self, efd: int) -> str | None:
        if efd < 0:
            return None
        try:
            return Path(os.readlink(f"/proc/self/fd/{efd}")).name
        except OSError:
            return None

    def _note(self, name: str, pid: int) -> None:
        key = (name, pid)
        w = self.result.writes.get(key)
        if w is None:
            # Named at once: a short-lived writer (`echo > file`) may be gone in a moment.
            w = Write(name, pid, procfs.comm(pid, self.proc), procfs.cmdline(pid, self.proc))
            self.result.writes[key] = w
        w.count += 1


# Daemons known to tune KSM on their own: comm or argv[0..1] basename -> what it is.
KNOWN_TUNERS = {
    "ksmtuned": "ksmtuned (the KSM tuning daemon of qemu-kvm)",
    "momd": "MOM, the oVirt Memory Overcommitment Manager",
    "mom-vdsm": "MOM inside vdsm (oVirt)",
}


@dataclass(frozen=True)
class Tuner:
    pid: int
    comm: str
    cmdline: str
    why: str  # what it is, or the KSM file it holds open
    evidence_file: str
    evidence_value: str


def known_tuners(
    proc: Path = procfs.PROC, ksm_root: Path = Path("/sys/kernel/mm/ksm")
) -> list[Tuner]:
    """Processes that tune KSM: a known daemon by name, or one holding a KSM knob file open."""
    found: dict[int, Tuner] = {}
    me = os.getpid()
    for pid in procfs.pids(proc):
        if pid == me:
            continue
        comm = procfs.comm(pid, proc)
        if comm is None:
            continue
        cmd = procfs.cmdline(pid, proc)
        words = [Path(w).name for w in cmd.split()[:2]]
        name = next((n for n in (comm, *words) if n in KNOWN_TUNERS), None)
        if name is not None:
            found[pid] = Tuner(
                pid, comm, cmd, KNOWN_TUNERS[name], f"/proc/{pid}/cmdline", cmd or comm
            )
            continue
        held = _ksm_fd(proc, pid, ksm_root)
        if held is not None:
            fd, target = held
            found[pid] = Tuner(
                pid, comm, cmd, f"holds {target} open", f"/proc/{pid}/fd/{fd}", target
            )
    return [found[p] for p in sorted(found)]


def _ksm_fd(proc: Path, pid: int, ksm_root: Path) -> tuple[str, str] | None:
    prefix = str(ksm_root) + "/"
    try:
        fds = list((proc / str(pid) / "fd").iterdir())
    except OSError:
        return None
    for fd in fds:
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith(prefix):
            return fd.name, target
    return None
