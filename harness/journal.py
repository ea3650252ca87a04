"""A journal of what a run changed on the host, so that a SIGKILLed run can be undone.

Before its first knob write or guest boot, a run writes /run/ksm-harness/journal/<id>.json:
the original KSM tunables, who owns the run (pid and start time, which together name one
process even after its pid is reused), and the fleets and guests it boots, as they boot. A
clean end removes the file. `ksmh recover` (harness.recovery) undoes the journals of dead
owners. Every write is atomic (a temporary file, fsync, rename, fsync of the directory), so a
crash leaves either the old journal or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from harness import procfs
from harness.errors import HarnessError
from harness.ksm.lock import STATE_DIR, private_dir

JOURNAL_DIR = Path(os.environ.get("KSM_HARNESS_JOURNAL", str(STATE_DIR / "journal")))
VERSION = 1
_ACTIVE: list[Journal] = []  # journals this process began and has not removed, innermost last


def active() -> Journal | None:
    """The innermost journal this process is writing (None outside a run): where a helper
    that changes one more host setting (e.g. harness.thp) records the original value."""
    return _ACTIVE[-1] if _ACTIVE else None


@dataclass
class FleetEntry:
    """A fleet a run booted: enough to find and stop its guests after a crash."""

    run_id: str
    backend: str
    uri: str | None = None
    runtime_root: str = ""
    guests: dict[str, int | None] = field(default_factory=dict)  # name -> QEMU pid


@dataclass
class Journal:
    """One run's journal; `path` is where it lives (None until written)."""

    run_id: str
    kind: str  # "playbook", "pytest", "scenario", "bench", ...
    owner_pid: int
    owner_start: int | None
    owner_cmdline: str
    tunables: dict[str, int | str]  # the original knobs, as read before the first write
    created: str
    fleets: list[FleetEntry] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)
    path: Path | None = field(default=None, compare=False)

    # -- writing ---------------------------------------------------------------------------
    @classmethod
    def begin(
        cls,
        run_id: str,
        kind: str,
        tunables: dict[str, int | str],
        directory: Path = JOURNAL_DIR,
        proc: Path = procfs.PROC,
    ) -> Journal:
        """Create and write the journal of a run owned by this process."""
        pid = os.getpid()
        j = cls(
            run_id=run_id,
            kind=kind,
            owner_pid=pid,
            owner_start=procfs.start_time(pid, proc),
            owner_cmdline=procfs.cmdline(pid, proc),
            tunables=dict(tunables),
            created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        )
        j.path = private_dir(directory, mode=0o700) / f"{_safe(run_id)}.json"
        j.save()
        _ACTIVE.append(j)
        return j

    def add_fleet(self, entry: FleetEntry) -> None:
        self.fleets.append(entry)
        self.save()

    def set_guests(self, fleet_run_id: str, guests: dict[str, int | None]) -> None:
        for f in self.fleets:
            if f.run_id == fleet_run_id:
                f.guests = dict(guests)
        self.save()

    def save(self) -> None:
        if self.path is None:
            raise HarnessError("journal has no path (use Journal.begin)")
        data = {"version": VERSION, **{k: v for k, v in asdict(self).items() if k != "path"}}
        _atomic_write(self.path, json.dumps(data, indent=2) + "\n")

    def release(self) -> None:
        """This process stops writing the journal (it stays on disk for `ksmh recover`)."""
        _ACTIVE[:] = [j for j in _ACTIVE if j is not self]

    def remove(self) -> None:
        """The run ended cleanly: nothing left to undo."""
        self.release()
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            _fsync_dir(self.path.parent)

    # -- reading ---------------------------------------------------------------------------
    def owner_alive(self, proc: Path = procfs.PROC) -> bool:
        return procfs.pid_alive(self.owner_pid, proc, started=self.owner_start)

    def describe_owner(self) -> str:
        return f"pid {self.owner_pid} ({self.owner_cmdline or '?'})"


def load(path: Path) -> Journal:
    """Read one journal; HarnessError naming the file when it is not a journal of ours."""
    try:
        data = json.loads(path.read_text())
        if data.pop("version", None) != VERSION:
            raise ValueError("unknown version")
        fleets = [FleetEntry(**f) for f in data.pop("fleets", [])]
        return Journal(**data, fleets=fleets, path=path)
    except (OSError, ValueError, TypeError) as exc:
        raise HarnessError(
            f"{path}: not a readable ksm-harness journal ({exc})",
            hint=f"inspect it, then remove it: rm {path}",
        ) from None


def journals(directory: Path = JOURNAL_DIR) -> list[Path]:
    """Journal files, oldest first (by name, which starts with the run's time stamp)."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.glob("*.json") if not p.name.startswith("."))


def _safe(run_id: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in run_id)[:120]


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
