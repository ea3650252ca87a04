"""The regression rule of `ksmh trend`: robust spread of previous nights, steps named by night.

A night is *outside* when its value differs from the median of its baseline by more than

    threshold = max(k x 1.4826 x MAD, rel x |median|, abs)

where the baseline is the last `window` nights before it that have a value, MAD is their median
absolute deviation (x 1.4826 estimates a standard deviation for normal noise, without letting
one wild night inflate it) and `rel`/`abs` are per-metric floors: below them a change is
run-to-run noise on these machines however quiet the baseline was. Nothing is judged before
`min_nights` nights of baseline exist.

Walking the series in order, an outside night opens an *excursion*: its baseline is frozen and
the following nights stay in it while they are outside that frozen baseline on the same side.
An excursion ends when a night comes back inside (a transient), or when it has lasted `window`
nights (a level change: the new level is now its own baseline). The metric is *flagged* when
the latest night is in an open excursion; the flag names the night the excursion started.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

MAD_TO_SIGMA = 1.4826


@dataclass(frozen=True)
class Rule:
    """Window and strictness; floors come per metric family (see Floors)."""

    window: int = 10
    min_nights: int = 5
    k: float = 4.0

    def __post_init__(self) -> None:
        if self.min_nights < 2 or self.window < self.min_nights or self.k <= 0:
            raise ValueError("need 2 <= min_nights <= window and k > 0")


@dataclass(frozen=True)
class Floors:
    """Smallest change that can count: relative to the baseline median, and absolute."""

    rel: float = 0.0
    abs: float = 0.0


@dataclass(frozen=True)
class Baseline:
    median: float
    mad: float
    threshold: float
    nights: int


@dataclass(frozen=True)
class Excursion:
    """Nights start..end (indices into the series) outside the baseline frozen at start."""

    start: int
    end: int
    baseline: Baseline
    direction: int  # +1 above, -1 below
    kind: str  # "open" (reaches the latest night), "transient" or "level change"


def baseline(values: Sequence[float], rule: Rule, floors: Floors) -> Baseline | None:
    """The spread of `values` (the nights before the one judged); None if too few."""
    if len(values) < rule.min_nights:
        return None
    med = statistics.median(values)
    mad = statistics.median(abs(v - med) for v in values)
    threshold = max(rule.k * MAD_TO_SIGMA * mad, floors.rel * abs(med), floors.abs)
    return Baseline(med, mad, threshold, len(values))


def _side(value: float, base: Baseline) -> int:
    """+1 / -1 when value is outside base above / below, 0 inside."""
    diff = value - base.median
    if abs(diff) <= base.threshold:
        return 0
    return 1 if diff > 0 else -1


def excursions(
    series: Sequence[float | None], rule: Rule, floors: Floors = Floors()
) -> list[Excursion]:
    """Every excursion of the series, in order (None values are nights without the metric)."""
    found: list[Excursion] = []
    seen: list[tuple[int, float]] = []  # (index, value) of nights with a value
    open_: tuple[int, Baseline, int, int] | None = None  # start, baseline, side, nights in it
    for i, value in enumerate(series):
        if value is None:
            continue
        if open_ is not None:
            start, base, side, length = open_
            if _side(value, base) == side and length < rule.window:
                open_ = (start, base, side, length + 1)
                seen.append((i, value))
                continue
            kind = "level change" if length >= rule.window else "transient"
            found.append(Excursion(start, seen[-1][0], base, side, kind))
            open_ = None
        base_now = baseline([v for _, v in seen[-rule.window :]], rule, floors)
        if base_now is not None:
            side = _side(value, base_now)
            if side:
                open_ = (i, base_now, side, 1)
        seen.append((i, value))
    if open_ is not None:
        start, base, side, _length = open_
        found.append(Excursion(start, seen[-1][0], base, side, "open"))
    return found


def flag(series: Sequence[float | None], rule: Rule, floors: Floors = Floors()) -> Excursion | None:
    """The open excursion when the latest night is outside its baseline (a metric the latest
    night does not have is not flagged)."""
    if not series or series[-1] is None:
        return None
    found = excursions(series, rule, floors)
    if found and found[-1].kind == "open":
        return found[-1]
    return None
