"""The host's transparent huge pages while KSM is compared with the model.

khugepaged collapses runs of small pages (KSM pages, zero pages left by a THP split, fresh
pages) back into huge pages on its own schedule (scan_sleep_millisecs, 10 s by default), which
changes what ksmd sees at times the model cannot know. ksm_model does not model it; runs with
THP pin it instead: khugepaged_pinned() sets its scan interval to a day and restores the old
value afterwards. (Writing the interval wakes khugepaged once, so pin before the workload.)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from harness.errors import HarnessError

THP_ROOT = Path("/sys/kernel/mm/transparent_hugepage")
PIN_MS = 86_400_000  # a day: longer than any run


@contextmanager
def khugepaged_pinned(root: Path = THP_ROOT) -> Iterator[int | None]:
    """Hold khugepaged off while the block runs; yields the saved interval (None: no THP)."""
    path = root / "khugepaged" / "scan_sleep_millisecs"
    try:
        saved = int(path.read_text())
    except FileNotFoundError:
        yield None  # a kernel without THP has no khugepaged
        return
    except (OSError, ValueError) as exc:
        raise HarnessError(
            f"cannot read {path}: {exc}", hint="pinning khugepaged needs root"
        ) from None
    try:
        path.write_text(str(PIN_MS))
    except OSError as exc:
        raise HarnessError(f"cannot write {path}: {exc}", hint="run as root") from None
    try:
        yield saved
    finally:
        path.write_text(str(saved))
