"""What every benchmark under bench/ shares: a figures table on stdout and `--json FILE`.

A benchmark records named figures as it measures them (`Figures.add`), prints them as one
table at the end, and with `--json FILE` also writes them, with the run's context (host,
kernel, time, arguments), as one JSON document (`-` writes it to stdout instead of the
table). Benchmarks assert nothing: they measure, and where the real kernel has a counterpart
they measure it in the same run and give the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any


def add_json_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--json",
        metavar="FILE",
        default=None,
        help="also write the figures as JSON to FILE ('-': JSON on stdout instead of the table)",
    )


class Figures:
    """Named figures of one benchmark run, in the order they were measured."""

    def __init__(self, name: str, args: argparse.Namespace) -> None:
        self.name = name
        self.args = {k: v for k, v in vars(args).items() if k != "json"}
        self.rows: list[tuple[str, Any, str]] = []  # (key, value, unit)
        self.notes: list[str] = []
        self.started = time.time()

    def add(self, key: str, value: Any, unit: str = "") -> Any:
        """Record one figure (None: not measured in this run); returns the value."""
        self.rows.append((key, value, unit))
        return value

    def note(self, text: str) -> None:
        """A sentence printed under the table and kept in the JSON (context, not a figure)."""
        self.notes.append(text)

    def as_dict(self) -> dict[str, Any]:
        return {
            "benchmark": self.name,
            "host": socket.gethostname(),
            "kernel": os.uname().release,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self.started)),
            "seconds": round(time.time() - self.started, 1),
            "args": self.args,
            "figures": {k: v for k, v, _ in self.rows},
            "units": {k: u for k, _, u in self.rows if u},
            "notes": self.notes,
        }

    def table(self) -> str:
        cells = [(k, _fmt(v), u) for k, v, u in self.rows]
        wk = max((len(k) for k, _, _ in cells), default=0)
        wv = max((len(v) for _, v, _ in cells), default=0)
        lines = [f"{self.name}"]
        lines += [f"  {k:<{wk}}  {v:>{wv}}  {u}".rstrip() for k, v, u in cells]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def finish(self, json_path: str | None) -> None:
        """Print the table (unless JSON goes to stdout) and write the JSON when asked."""
        doc = json.dumps(self.as_dict(), indent=2, default=str) + "\n"
        if json_path == "-":
            sys.stdout.write(doc)
            return
        print(self.table(), flush=True)
        if json_path:
            path = Path(json_path)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(doc)
            print(f"figures written to {path}")


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:,.3f}" if abs(v) < 10 else f"{v:,.1f}"
    return str(v)
