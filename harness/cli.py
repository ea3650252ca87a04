"""`ksmh`: the command-line entry point.

Each area registers its own subcommands (a module with `register(subparsers)`), so this file
only builds the parser and turns HarnessError into one line plus a hint, exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from collections.abc import Sequence
from typing import Any

from harness import __version__
from harness.errors import HarnessError

# Modules that contribute subcommands, in --help order.
COMMAND_MODULES = (
    "harness.ksm.cli",
    "harness.remote.cli",
    "harness.monitoring.cli",
    "harness.guests.cli",
    "harness.playbook.cli",
    "harness.doctor.cli",
    "harness.report.cli",
    "harness.kernels.cli",
    "harness.twin.cli",
)


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """--help names every option's default: "(default: X)" is appended unless the help text
    already says it (some say it better, e.g. "default 127.0.0.1:9712 if free")."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        d = action.default
        if (
            "default" in text
            or not action.option_strings
            or d is None
            or d is False
            or d == []
            or d is argparse.SUPPRESS
        ):
            return text
        return f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """ksmh's parser class, inherited by every subcommand's parser: defaults in --help."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
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
    except Exception as exc:
        traceback.print_exc()
        print(f"ksmh: internal error (a bug, please report it): {exc!r}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
