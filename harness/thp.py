"""khugepaged held off while KSM is compared with the model.

khugepaged collapses runs of small pages (KSM pages, zero pages left by a THP split, fresh
pages) back into huge pages on its own schedule (scan_sleep_millisecs, 10 s by default), which
changes what ksmd sees at times the model cannot know. ksm_model does not model it; runs with
THP pin it instead: khugepaged_pinned() sets its scan interval to a day and restores the old
value afterwards. (Writing the interval wakes khugepaged once, so pin before the workload.)
The old value goes into the run's journal first (notes[JOURNAL_NOTE], harness.journal), so
`ksmh recover` puts it back after a crash (harness.recovery).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from harness.errors import HarnessError
from harness.journal import Journal, active

THP_ROOT = Path("/sys/kernel/mm/transparent_hugepage")
PIN_MS = 86_400_000  # a day: longer than any run
JOURNAL_NOTE = "khugepaged_scan_sleep_millisecs"


def _interval(root: Path) -> Path:
    return root / "khugepaged" / "scan_sleep_millisecs"


@contextmanager
def khugepaged_pinned(
    root: Path = THP_ROOT, journal: Journal | None = None
) -> Iterator[int | None]:
    """Hold khugepaged off while the block runs; yields the saved interval (None: no THP).
    The saved interval is recorded in `journal` (default: the run's, harness.journal.active)."""
    path = _interval(root)
    journal = journal if journal is not None else active()
    try:
        saved = int(path.read_text())
    except FileNotFoundError:
        yield None  # a kernel without THP has no khugepaged
        return
    except (OSError, ValueError) as exc:
        raise HarnessError(
            f"cannot read {path}: {exc}", hint="pinning khugepaged needs root"
        ) from None
    if journal is not None:
        journal.notes[JOURNAL_NOTE] = saved
        journal.save()
    try:
        path.write_text(str(PIN_MS))
    except OSError as exc:
        raise HarnessError(f"cannot write {path}: {exc}", hint="run as root") from None
    try:
        yield saved
    finally:
        path.write_text(str(saved))
        if journal is not None:
            journal.notes.pop(JOURNAL_NOTE, None)
            journal.save()


def restore_from_journal(j: Journal, root: Path = THP_ROOT) -> list[str]:
    """Put back the khugepaged interval a dead run pinned; one line per thing done."""
    saved = j.notes.get(JOURNAL_NOTE)
    if saved is None:
        return []
    path = _interval(root)
    try:
        now = path.read_text().strip()
        path.write_text(str(saved))
    except OSError as exc:
        return [f"could not restore {path} to {saved}: {exc}"]
    return (
        [f"restored khugepaged scan_sleep_millisecs {now} -> {saved}"] if now != str(saved) else []
    )
