"""`--help` of every ksmh subcommand names every option's default."""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import pytest

from harness.cli import build_parser, main


def parsers(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from parsers(sub, (*path, name))


def test_every_option_with_a_default_shows_it() -> None:
    missing = []
    for path, parser in parsers(build_parser()):
        formatter = parser._get_formatter()
        for a in parser._actions:
            if not a.option_strings or a.help == argparse.SUPPRESS:
                continue
            if a.default in (None, argparse.SUPPRESS) or a.default is False or a.default == []:
                continue  # a flag, or nothing to show
            text = formatter._get_help_string(a) or ""  # type: ignore[attr-defined]
            if "default" not in text:
                missing.append(f"ksmh {' '.join(path)} {a.option_strings[0]}")
    assert missing == []


@pytest.mark.parametrize(
    ("argv", "shown"),
    [
        (["watch"], "seconds between refreshes (default 1)"),
        (["export"], "HOST:PORT (default loopback)"),  # said by the help text itself
        (["fleet", "up"], "guests booting at once (default: 2 per CPU, 2-16:"),
        (["fleet", "up"], "virtual CPUs per guest (default: 1)"),
        (["fleet", "exec"], "seconds per agent command (default: 600.0)"),
        (["monitoring", "config"], "window of rate() rules (default: 5m)"),
        (["monitoring", "config"], "Prometheus scrape_interval (default: 15s)"),
        (["run"], "(default: auto)"),
    ],
)
def test_help_output(argv: list[str], shown: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([*argv, "--help"])
    assert info.value.code == 0
    assert shown in " ".join(capsys.readouterr().out.split())
