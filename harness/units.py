"""Sizes: the one grammar every size in the harness is read with, and how sizes are shown.

    SIZE  = NUMBER [UNIT]          e.g. 64MiB, 64M, "1 GiB", 4096, 1.5GiB (whole bytes only)
    UNIT  = B | K | KiB | M | MiB | G | GiB | T | TiB     (binary multiples; letters any case)

`K`/`KiB` = 1024 bytes, `M`/`MiB` = 1024^2, `G`/`GiB` = 1024^3, `T`/`TiB` = 1024^4.
The decimal spellings `KB`/`MB`/`GB`/`TB` are refused with a hint naming the binary one: they
mean powers of 1000 elsewhere, and guessing would be wrong half of the time. A bare number
means the unit its field documents (bytes for playbook sizes and expectations, MiB for
`--memory`); the error message says which. The guest agent (harness/guests/data/ksmh-agent.c)
reads the same grammar for its `fill` size (bytes when bare).

Shares and durations of the twin, forecast and playbook options, too:

    SHARE     95%  or 0.95                        (above 0, at most 100%)
    DURATION  90s, 10m, 1h30m, or a number of seconds
"""

from __future__ import annotations

import contextlib
import math
import re

from harness.errors import HarnessError

UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "k": 2**10,
    "kib": 2**10,
    "m": 2**20,
    "mib": 2**20,
    "g": 2**30,
    "gib": 2**30,
    "t": 2**40,
    "tib": 2**40,
}
# Bare-number units a field may declare, by name.
BARE = {"bytes": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}
GRAMMAR = "K/KiB, M/MiB, G/GiB, T/TiB (binary: 1M = 1024 KiB)"
MAX_DIGITS = 30  # a size needs at most ~20 digits; longer text is refused before int()

_SIZE = re.compile(r"^\s*(\d{1,30}(?:\.\d{1,30})?)\s*([A-Za-z]{0,3})\s*$", re.ASCII)
_DECIMAL = {"kb", "mb", "gb", "tb"}


class SizeError(HarnessError):
    """A size that does not follow the grammar above; the hint says what would."""


def size_hint(bare: str = "bytes") -> str:
    """The hint every size error carries."""
    return f"sizes take {GRAMMAR}; a bare number means {bare}"


def parse_size(value: object, *, bare: str = "bytes", what: str = "size") -> int:
    """Bytes from an int (counted in `bare` units) or a size string; SizeError otherwise.

    Booleans and non-integral byte counts are refused; so are negative numbers.
    """
    mult = BARE[bare]
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise SizeError(f"expected a {what} like 64MiB, got {_show(value)}", hint=size_hint(bare))
    if isinstance(value, int):
        if value < 0:
            raise SizeError(f"{what} {value} is negative", hint=size_hint(bare))
        return value * mult
    m = _SIZE.match(value)
    if not m:
        raise SizeError(f"expected a {what} like 64MiB, got {_show(value)}", hint=size_hint(bare))
    number, unit = m.group(1), m.group(2).lower()
    if unit in _DECIMAL:
        binary = unit[0].upper() + "iB"
        raise SizeError(
            f"{value.strip()!r}: {m.group(2)} is a decimal unit; write {number}{binary} "
            f"(or {number}{unit[0].upper()}) for the binary size",
            hint=size_hint(bare),
        )
    if unit not in UNITS:
        raise SizeError(f"{value.strip()!r}: unknown unit {m.group(2)!r}", hint=size_hint(bare))
    scale = UNITS[unit] if unit else mult
    whole, _, frac = number.partition(".")
    # Exact arithmetic: 1.5GiB is 1610612736 bytes; 1.3 bytes is refused.
    numerator = int(whole + frac) * scale
    denominator = 10 ** len(frac)
    if numerator % denominator:
        raise SizeError(f"{value.strip()!r} is not a whole number of bytes", hint=size_hint(bare))
    return int(numerator // denominator)


def unit_factor(unit: str, bare: str = "bytes") -> int:
    """The multiplier of a unit of the grammar ('' is the bare unit); SizeError otherwise."""
    u = unit.strip().lower()
    if u in _DECIMAL:
        raise SizeError(
            f"{unit.strip()} is a decimal unit; write {u[0].upper()}iB (or {u[0].upper()}) "
            "for the binary size",
            hint=size_hint(bare),
        )
    if u not in UNITS:
        raise SizeError(f"unknown unit {unit.strip()!r}", hint=size_hint(bare))
    return UNITS[u] if u else BARE[bare]


def _show(value: object) -> str:
    if value is None:
        return "nothing"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def format_size(n: float | None) -> str:
    """A size for people: exact units when exact ('240 MiB', '1 GiB'), else 1 decimal."""
    if n is None:
        return "-"
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            value = n / scale
            return f"{int(value)} {unit}" if float(value).is_integer() else f"{value:.1f} {unit}"
    return f"{n:g} B"


def human_bytes(n: float | None) -> str:
    """1536 -> '1.5 KiB'; None -> '-'."""
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


_DURATION = re.compile(r"^(?:(\d{1,6})h)?(?:(\d{1,6})m)?(?:(\d{1,9}(?:\.\d{1,6})?)s)?$")


def share(text: str, what: str = "--target") -> float:
    """'95%' or '0.95' -> 0.95 (0 < share <= 1)."""
    t = text.strip()
    try:
        v = float(t[:-1]) / 100 if t.endswith("%") else float(t)
    except ValueError:
        v = math.nan
    if not (0 < v <= 1):
        raise HarnessError(
            f"{what} {text!r}: expected a share like 95% or 0.95 (above 0, at most 100%)"
        )
    return v


def duration(text: str, what: str = "--within") -> float:
    """'10m', '90s', '1h30m' or a bare number of seconds -> seconds (> 0)."""
    t = text.strip()
    m = _DURATION.match(t)
    seconds = math.nan
    if t and m and any(m.groups()):
        h, mi, s = (float(g) if g else 0.0 for g in m.groups())
        seconds = h * 3600 + mi * 60 + s
    else:
        with contextlib.suppress(ValueError):
            seconds = float(t)
    if not (0 < seconds < 10 * 365 * 86400):
        raise HarnessError(f"{what} {text!r}: expected a duration like 90s, 10m or 1h30m")
    return seconds
