"""Counted nouns: no "1 guests" anywhere."""

from __future__ import annotations

from harness.text import count, plural


def test_counted_nouns() -> None:
    assert [count(n, "guest") for n in (0, 1, 2)] == ["0 guests", "1 guest", "2 guests"]
    assert count(1, "process") == "1 process" and count(3, "process") == "3 processes"
    assert count(2, "series", "series") == "2 series"
    assert count(12395, "page", sep=",") == "12,395 pages"
    assert plural(1, "night") == "night" and plural(5, "night") == "nights"
