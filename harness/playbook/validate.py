"""Validation helpers bound to one playbook Source: every error carries file, line and field."""

from __future__ import annotations

import contextlib
import re
from typing import Any

from harness.playbook.load import PathKey, Source

_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,32}$")


class V:
    """Validation helpers bound to one Source, so every error carries file and line."""

    def __init__(self, src: Source) -> None:
        self.src = src

    def mapping(self, value: object, path: PathKey, what: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.src.error(path, f"expected {what} (a mapping), got {kind(value)}")
        return value

    def keys(self, d: dict[str, Any], path: PathKey, allowed: tuple[str, ...]) -> None:
        for key in d:
            if key not in allowed:
                raise self.src.error(
                    (*path, key),
                    f"unknown field {key!r}",
                    hint="allowed here: " + ", ".join(allowed),
                )

    def int_(self, value: object, path: PathKey, lo: int, hi: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.src.error(path, f"expected an integer {lo}..{hi}, got {kind(value)}")
        if not lo <= value <= hi:
            raise self.src.error(path, f"{value} is out of range {lo}..{hi}")
        return value

    def num(self, value: object, path: PathKey, lo: float, hi: float) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.src.error(path, f"expected a number {lo:g}..{hi:g}, got {kind(value)}")
        if not lo <= value <= hi:
            raise self.src.error(path, f"{value} is out of range {lo:g}..{hi:g}")
        return float(value)

    def str_(self, value: object, path: PathKey, choices: tuple[str, ...] | None = None) -> str:
        if not isinstance(value, str):
            raise self.src.error(path, f"expected a string, got {kind(value)}")
        if choices is not None and value not in choices:
            raise self.src.error(path, f"{value!r} is not one of {', '.join(choices)}")
        return value

    def name(self, value: object, path: PathKey) -> str:
        text = self.str_(value, path)
        if not _NAME.match(text):
            raise self.src.error(path, f"{text!r}: use 1-32 letters, digits, '_', '.', '-'")
        return text

    def tolerance(self, value: object, path: PathKey) -> float:
        """1% or 0.01 -> 0.01 (relative); 100 -> 100.0 pages (absolute)."""
        number: float | None = None
        if isinstance(value, str) and value.strip().endswith("%"):
            with contextlib.suppress(ValueError):
                number = float(value.strip()[:-1]) / 100
        elif isinstance(value, int | float) and not isinstance(value, bool):
            number = float(value)
        # A negative (or NaN) tolerance would make every convergence wait time out.
        if number is not None and number >= 0:
            return number
        raise self.src.error(
            path, f"expected a tolerance like 1% or 0.01 or 100 (pages), got {value!r}"
        )


def kind(value: object) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return f"a boolean ({value})"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"{type(value).__name__} {value!r}"
