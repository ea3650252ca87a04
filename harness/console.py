"""Terminal output through `rich` when a person is watching, plain text otherwise.

Tables (`ksmh status`, `ksmh fleet list`, `ksmh hosts check`), the live `ksmh watch` screen
and the fleet boot progress bar are drawn by rich only when their stream is a terminal. When it
is not (a pipe, a file, a test), the same commands print plain aligned text whose exact
format is part of their interface (scripts parse it, tests assert it). Importing rich is
deferred to the terminal path, so plain output never pays for it.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Sequence
from types import TracebackType
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table


def terminal(stream: IO[str] | None = None) -> Console | None:
    """A rich Console on `stream` (default stdout) when it is a terminal, else None."""
    stream = sys.stdout if stream is None else stream
    if not stream.isatty():
        return None
    from rich.console import Console

    return Console(file=stream, highlight=False)


def plural(n: int, noun: str, plural_form: str | None = None) -> str:
    """'1 guest', '2 guests', '0 guests', '3 processes' (plural_form for the irregular ones)."""
    if n == 1:
        return f"{n} {noun}"
    regular = noun + ("es" if noun.endswith(("s", "sh", "ch", "x")) else "s")
    return f"{n} {plural_form or regular}"


def plain_table(rows: Sequence[Sequence[str]], indent: str = "", gap: str = "  ") -> list[str]:
    """Left-aligned columns, widths from the widest cell; trailing spaces stripped."""
    if not rows:
        return []
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [
        indent + gap.join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    ]


def rich_table(
    header: Sequence[str],
    rows: Sequence[Sequence[str]],
    title: str | None = None,
    right: Sequence[int] = (),
) -> Table:
    """A rich Table of strings; columns whose index is in `right` are right-aligned."""
    from rich.table import Table

    table = Table(title=title, title_justify="left", header_style="bold")
    for i, name in enumerate(header):
        table.add_column(name, justify="right" if i in right else "left", no_wrap=True)
    for row in rows:
        table.add_row(*row)
    return table


class BootProgress:
    """A progress bar on stderr while guests boot (rich), silent when stderr is no terminal.

    Thread-safe: boot threads call `step(ok)` as each guest is ready or has failed.
    """

    def __init__(
        self, total: int, label: str, enabled: bool | None = None, console: Console | None = None
    ) -> None:
        self.total = total
        self.label = label
        self.done = 0
        self.failed = 0
        self._lock = threading.Lock()
        if console is None and (enabled or (enabled is None and sys.stderr.isatty())):
            from rich.console import Console

            console = Console(stderr=True)
        self._bar = None
        if console is not None and enabled is not False:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

            self._bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[failed]}"),
                console=console,
                transient=False,
            )
            self._task = self._bar.add_task(label, total=total, failed="")

    def __enter__(self) -> BootProgress:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._bar is not None:
            self._bar.stop()

    def step(self, ok: bool) -> None:
        with self._lock:
            self.done += 1
            self.failed += 0 if ok else 1
            if self._bar is not None:
                note = f"{self.failed} failed" if self.failed else ""
                self._bar.update(self._task, completed=self.done, failed=note)
