"""Counted nouns in messages: "1 guest", "4 guests", "1 process", never "1 guests"."""

from __future__ import annotations


def plural(n: int, noun: str, many: str | None = None) -> str:
    """`noun` for n == 1, else `many` (default: noun + "s", or + "es" after s/sh/ch/x)."""
    if n == 1:
        return noun
    if many is not None:
        return many
    return noun + ("es" if noun.endswith(("s", "sh", "ch", "x")) else "s")


def count(n: int, noun: str, many: str | None = None, *, sep: str = "") -> str:
    """'1 guest', '3 guests'; sep="," groups thousands ('12,395 pages')."""
    number = f"{n:,}" if sep == "," else str(n)
    return f"{number} {plural(n, noun, many)}"
