"""`ksmh`: the command-line entry point.

Each area registers its own subcommands (a module with `register(subparsers)`), so this file
only builds the parser and turns HarnessError into one line plus a hint, exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from harness import __version__
from harness.errors import HarnessError

# Modules that contribute subcommands, in --help order.
COMMAND_MODULES = (
    "harness.cli_ksm",
    "harness.remote.cli",
    "harness.monitoring.cli",
    "harness.guests.cli",
    "harness.playbook.cli",
    "harness.twin.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ksmh",
        description="Drive Kernel Samepage Merging on fleets of guests and compare with a model.",
    )
    parser.add_argument("--version", action="version", version=f"ksmh {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except HarnessError as exc:
        print(f"ksmh: error: {exc.message}", file=sys.stderr)
        if exc.hint:
            print(f"  hint: {exc.hint}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ksmh: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
