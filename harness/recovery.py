"""Undo what dead runs left behind, and the session every KSM-changing run takes.

`recover()` reads every journal (harness.journal) whose owner is dead: it stops that run's
guests (plain QEMU and libvirt), drops the merges they left when nothing else uses KSM, puts the
original knobs back (and khugepaged's interval, harness.thp), and removes the journal. It
never touches a journal whose owner is alive.
`ksmh recover` calls it; so do `ksmh run`, `ksmh set`, `ksmh fleet up` and the pytest `ksm`
fixture before they start (with a one-line notice when there was something to do).

`ksm_session()` is how a run changes KSM safely: the host lock, recovery of dead runs, a journal
with the original knobs, save/restore of every knob, leftover merges dropped at the end.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from harness import procfs
from harness.console import plural
from harness.errors import HarnessError, RestoreIncomplete
from harness.guests.backend import GuestBackend
from harness.journal import JOURNAL_DIR, FleetEntry, Journal, journals, load
from harness.ksm.lock import DEFAULT_LOCK, ksm_lock
from harness.ksm.sysfs import KSM_ROOT, SysfsBackend
from harness.ksm.types import Tunables
from harness.signals import shielded, signals_as_interrupt
from harness.thp import restore_from_journal

Echo = Callable[[str], None]


def stop_fleet(entry: FleetEntry) -> list[str]:
    """Stop every guest of one fleet run, by its run directory and by name; one line each."""
    from harness.guests.fleet import Fleet, guest_name

    lines: list[str] = []
    root = Path(entry.runtime_root) if entry.runtime_root else None
    if root is not None and (root / entry.run_id).is_dir():
        try:
            fleet = Fleet.attach(entry.run_id, root)
            for name in fleet.down():
                lines.append(f"stopped guest {name} of fleet {entry.run_id}")
        except HarnessError as exc:
            lines.append(f"fleet {entry.run_id}: {exc.message}")
    prefix = guest_name(entry.run_id, 0)[: -len("00")]
    for backend in _leftover_backends(entry):
        try:
            for lo in backend.leftovers():
                if lo.name.startswith(prefix):
                    backend.remove_leftover(lo)
                    lines.append(f"stopped guest {lo.name} ({lo.backend}, pid {lo.pid or '-'})")
        except HarnessError as exc:
            lines.append(f"fleet {entry.run_id}: {exc.message}")
        finally:
            close = getattr(backend, "close", None)
            if close is not None:
                with contextlib.suppress(HarnessError):
                    close()
    if root is not None and (root / entry.run_id).is_dir():
        # Sockets, pid files and logs of a fleet whose guests are all gone now.
        shutil.rmtree(root / entry.run_id, ignore_errors=True)
        lines.append(f"removed fleet directory {root / entry.run_id}")
    return lines


def _leftover_backends(entry: FleetEntry) -> list[GuestBackend]:
    from harness.guests.qemu_backend import QemuBackend

    backends: list[GuestBackend] = [QemuBackend()]
    if entry.backend == "libvirt":
        from harness.guests.libvirt_backend import LIBVIRT_RUN, LibvirtBackend, _socket_answers

        if entry.uri not in (None, "qemu:///system") or _socket_answers(
            LIBVIRT_RUN / "libvirt-sock"
        ):
            with contextlib.suppress(HarnessError):
                backends.append(LibvirtBackend(entry.uri or "qemu:///system", start_daemons=False))
    return backends


def undo(j: Journal, ksm_root: Path = KSM_ROOT, proc: Path = procfs.PROC) -> list[str]:
    """Undo one dead run: its guests, its leftover merges, its knobs; then drop the journal."""
    lines: list[str] = []
    for entry in j.fleets:
        lines += stop_fleet(entry)
    problems: list[str] = []
    if j.tunables and (ksm_root / "run").exists():
        backend = SysfsBackend(root=ksm_root, proc=proc)
        before = backend.read_tunables().present()
        c = backend.read_counters()
        if (c.pages_shared or c.ksm_zero_pages) and not procfs.ksm_users(proc):
            # The dead run's guests are gone; the merges that remain are theirs alone.
            backend.apply({"run": 2}, force=True)
            lines.append("dropped leftover merges (run=2): no process uses KSM any more")
        problems = backend.restore(Tunables(**j.tunables))  # type: ignore[arg-type]
        after = backend.read_tunables().present()
        for name, value in j.tunables.items():
            if before.get(name) != value and after.get(name) == value:
                lines.append(f"restored {name} {before.get(name)} -> {value}")
        lines += [f"could not restore {p}" for p in problems]
    thp = restore_from_journal(j, ksm_root.parent / "transparent_hugepage")
    lines += thp
    problems += [t for t in thp if t.startswith("could not")]
    if problems:
        lines.append(f"kept journal {j.path} (run `ksmh recover` again once fixed)")
    else:
        j.remove()
        lines.append(f"removed journal of run {j.run_id} (owner {j.describe_owner()} is gone)")
    return lines


def recover(
    directory: Path = JOURNAL_DIR,
    *,
    ksm_root: Path = KSM_ROOT,
    proc: Path = procfs.PROC,
) -> list[str]:
    """Undo every journal whose owner is dead; one line per thing done. The caller holds the
    host lock (a live run's journal has a live owner and is left alone anyway)."""
    lines: list[str] = []
    for path in journals(directory):
        try:
            j = load(path)
        except HarnessError as exc:
            lines.append(f"skipped {exc.message}")
            continue
        if j.owner_alive(proc):
            continue
        lines += undo(j, ksm_root, proc)
    return lines


def recover_first(
    echo: Echo,
    *,
    directory: Path = JOURNAL_DIR,
    ksm_root: Path = KSM_ROOT,
    proc: Path = procfs.PROC,
) -> list[str]:
    """recover() with a one-line notice (and the details) when there was something to undo."""
    lines = recover(directory, ksm_root=ksm_root, proc=proc)
    if lines:
        echo(f"recovered what an earlier run left behind ({plural(len(lines), 'action')}):")
        for line in lines:
            echo(f"  {line}")
    return lines


@contextmanager
def run_session(
    backend: SysfsBackend | None,
    run_id: str,
    kind: str,
    *,
    echo: Echo,
    lock_path: Path = DEFAULT_LOCK,
    journal_dir: Path = JOURNAL_DIR,
    take_lock: bool = True,
    on_wait: Callable[[], None] | None = None,
    proc: Path = procfs.PROC,
) -> Iterator[Journal | None]:
    """Lock, recover, journal, save: everything a run needs before changing KSM or booting.

    `backend` is the real KSM the run will change (None for a run that only boots guests,
    e.g. a model-only run on a host with KSM). On exit, however the body ends (SIGTERM and
    SIGHUP included), merges left by the run's now-dead processes are dropped, the knobs are
    restored (best effort and complete; see BackendBase.restore) and the journal is removed,
    unless something could not be restored: then the journal stays for `ksmh recover` and
    RestoreIncomplete is raised (if nothing else is already on its way). Without the lock
    (take_lock=False: the caller holds it, or there is nothing to protect) the journal is
    still written when its directory can be.
    """
    with _lock_if(take_lock, lock_path, on_wait):
        root = backend.root if backend is not None else KSM_ROOT
        proc = backend.proc if backend is not None else proc
        if take_lock:
            recover_first(echo, directory=journal_dir, ksm_root=root, proc=proc)
        before = backend.read_tunables() if backend is not None else None
        knobs = before.present() if before is not None else {}
        journal = _begin_journal(run_id, kind, knobs, journal_dir, proc, echo)
        problems: list[str] = []
        try:
            with signals_as_interrupt():
                yield journal
        finally:
            with shielded():  # a second Ctrl-C waits until the knobs are back
                if backend is not None and before is not None:
                    with contextlib.suppress(HarnessError):
                        _drop_leftover_merges(backend)
                    problems = backend.restore(before)
                if problems:
                    echo(f"kept journal {journal and journal.path}: " + "; ".join(problems))
                    if journal is not None:
                        journal.release()
                elif journal is not None:
                    journal.remove()
        if problems:
            raise RestoreIncomplete(
                "KSM knobs not restored: " + "; ".join(problems),
                hint="`ksmh status` shows them; `ksmh recover` retries",
            )


@contextmanager
def _lock_if(take: bool, path: Path, on_wait: Callable[[], None] | None) -> Iterator[None]:
    if not take:
        yield
        return
    if on_wait is not None:
        on_wait()
    with ksm_lock(path):
        yield


def _begin_journal(
    run_id: str, kind: str, knobs: dict[str, int | str], directory: Path, proc: Path, echo: Echo
) -> Journal | None:
    try:
        return Journal.begin(run_id, kind, knobs, directory, proc)
    except (HarnessError, OSError) as exc:
        if knobs:
            raise HarnessError(
                f"cannot write the run journal in {directory}: {exc}",
                hint="a run that changes KSM knobs must be able to record them first",
            ) from None
        echo(f"no run journal ({exc}): a crash of this run would leave its guests running")
        return None


def _drop_leftover_merges(backend: SysfsBackend) -> None:
    """The run's processes are gone but their KSM pages stay counted until ksmd rescans: unmerge
    now (saved() then restores run), unless someone else's merges would go too."""
    c = backend.read_counters()
    if (c.pages_shared or c.ksm_zero_pages) and not procfs.ksm_users(
        backend.proc, exclude={os.getpid()}
    ):
        backend.apply({"run": 2}, force=True)
