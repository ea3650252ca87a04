"""Expectations: a small checked language for what a phase must show.

    pages_sharing >= 0.95 * model        the kernel's value against 0.95 x the model's
    model.pages_shared == 256            a prefix picks the source (kernel | model | host)
    delta.pages_sharing >= 8192          the change since the phase began
    saved_bytes >= 100MiB                units: B, KiB, MiB, GiB, and % (= /100)
    kernel == model: pages_shared, pages_sharing                 exact, counter by counter
    kernel ~= model within 2%: pages_shared, pages_sharing       relative tolerance
    verify: clean                        every guest's latest verify found 0 bad bytes
    mem_available_min >= 1GiB            host facts: mem_available, mem_available_min

An unprefixed name means the run's primary source: the kernel, or the model in a model-only
run. An expectation that needs a source the run does not have is "skipped", never "passed".
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from harness.console import plural
from harness.ksm.types import COUNTER_NAMES
from harness.record import within
from harness.units import SizeError, format_size, unit_factor

SOURCES = ("kernel", "model", "host")
DERIVED = ("saved_bytes", "sharing_ratio", "waste_ratio")
HOST_NAMES = ("mem_available", "mem_available_min")
NAMES = (*COUNTER_NAMES, *DERIVED)
OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    "<=": operator.le,
    "==": operator.eq,
    "!=": operator.ne,
    ">": operator.gt,
    "<": operator.lt,
}
MAX_TEXT = 400
# Quantities counted in bytes: their values are shown as sizes (MiB, GiB) in verdicts.
BYTE_NAMES = frozenset({"saved_bytes", "general_profit", *HOST_NAMES})
_NUM = r"-?(?:[0-9]{1,30}(?:\.[0-9]{0,30})?|\.[0-9]{1,30})(?:[eE][-+]?[0-9]{1,3})?"
_TERM = re.compile(
    rf"^\s*(?:(?P<num>{_NUM})\s*(?P<unit>[A-Za-z]{{1,3}}|%)?)?\s*(?:(?P<star>\*)\s*(?P<ref>[A-Za-z_.]+))?\s*$"
)
_PAIR = re.compile(
    r"^\s*kernel\s*(?P<op>==|~=)\s*model\s*(?:within\s+(?P<tol>\d+(?:\.\d*)?|\.\d+)\s*%)?\s*:\s*(?P<names>.+)$"
)
_CMP = re.compile(r"^(?P<lhs>.+?)\s*(?P<op>>=|<=|==|!=|>|<)\s*(?P<rhs>.+)$")


class ExpectationSyntax(ValueError):
    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


@dataclass(frozen=True)
class Ref:
    """A value looked up at evaluation time: [source.][delta.]name."""

    source: str | None  # None: the run's primary source
    name: str
    delta: bool = False

    def label(self, primary: str) -> str:
        return f"{self.source or primary}.{'delta.' if self.delta else ''}{self.name}"


@dataclass(frozen=True)
class Term:
    """factor x ref, or a constant when ref is None."""

    factor: float
    ref: Ref | None = None


@dataclass(frozen=True)
class Verdict:
    status: str  # passed | failed | skipped
    detail: str

    @property
    def failed(self) -> bool:
        return self.status == "failed"


@dataclass
class Context:
    """What an expectation can see when it is evaluated (the end of its step)."""

    values: Mapping[str, Mapping[str, float | int | None]]  # source -> name -> value
    start: Mapping[str, Mapping[str, float | int | None]]  # source -> name -> value at phase start
    primary: str  # "kernel" or "model"
    verify: Mapping[str, int | str] | None = None  # guest -> mismatched bytes, or an error text

    def get(self, ref: Ref) -> float | None:
        source = ref.source or self.primary
        cur = self.values.get(source, {}).get(ref.name)
        if cur is None:
            return None
        if not ref.delta:
            return float(cur)
        base = self.start.get(source, {}).get(ref.name)
        return None if base is None else float(cur) - float(base)


@dataclass(frozen=True)
class Expectation:
    text: str
    line: int
    kind: str  # compare | pair | verify
    lhs: Term | None = None
    op: str = ""
    rhs: Term | None = None
    names: tuple[str, ...] = ()
    tolerance: float = 0.0

    def evaluate(self, ctx: Context) -> Verdict:
        if self.kind == "verify":
            return _eval_verify(ctx)
        if self.kind == "pair":
            return self._eval_pair(ctx)
        return self._eval_compare(ctx)

    def _eval_pair(self, ctx: Context) -> Verdict:
        bad, shown = [], []
        for name in self.names:
            k = ctx.get(Ref("kernel", name))
            m = ctx.get(Ref("model", name))
            if k is None or m is None:
                return Verdict(
                    "skipped", f"{name}: no {'kernel' if k is None else 'model'} value in this run"
                )
            ok = within(k, m, self.tolerance)  # the comparison engine of harness.record
            shown.append(f"{name} {_fmt(k, name)}/{_fmt(m, name)}")
            if not ok:
                bad.append(name)
        detail = "kernel/model: " + ", ".join(shown)
        return Verdict(
            "failed" if bad else "passed", detail + (f"; differ: {', '.join(bad)}" if bad else "")
        )

    def _eval_compare(self, ctx: Context) -> Verdict:
        assert self.lhs is not None and self.rhs is not None
        left = _term_value(self.lhs, ctx)
        right = _term_value(self.rhs, ctx)
        for term, value in ((self.lhs, left), (self.rhs, right)):
            if value is None:
                ref = term.ref
                assert ref is not None
                return Verdict("skipped", f"no value for {ref.label(ctx.primary)} in this run")
        assert left is not None and right is not None
        ok = OPS[self.op](left, right)
        name = self.lhs.ref.name if self.lhs.ref is not None else ""
        detail = f"{_fmt(left, name)} {self.op} {_fmt(right, name)}"
        return Verdict("passed" if ok else "failed", detail)


def _eval_verify(ctx: Context) -> Verdict:
    if not ctx.verify:
        return Verdict("failed", "no verify step ran before this expectation in the phase")
    bad = {g: r for g, r in ctx.verify.items() if r != 0}
    if bad:
        return Verdict("failed", "; ".join(f"{g}: {r}" for g, r in sorted(bad.items())))
    return Verdict("passed", f"{plural(len(ctx.verify), 'guest')}, 0 mismatched bytes")


def _term_value(term: Term, ctx: Context) -> float | None:
    if term.ref is None:
        return term.factor
    value = ctx.get(term.ref)
    return None if value is None else term.factor * value


def _fmt(x: float, name: str = "") -> str:
    """A value for a verdict: byte quantities as sizes (240 MiB), others as numbers."""
    if name in BYTE_NAMES:
        return format_size(x)
    return str(int(x)) if float(x).is_integer() else f"{x:.2f}".rstrip("0").rstrip(".")


def _parse_ref(text: str, default_name: str | None) -> Ref:
    parts = text.split(".")
    if "" in parts:
        raise ExpectationSyntax(f"cannot read {text!r} as a value")
    source = None
    if parts[0] in SOURCES:
        source = parts.pop(0)
    delta = bool(parts) and parts[0] == "delta"
    if delta:
        parts.pop(0)
    if not parts:
        # A bare source ("model") means the same quantity as the left-hand side.
        if default_name is None:
            raise ExpectationSyntax(f"{text!r} needs a counter name, e.g. model.pages_sharing")
        return Ref(source, default_name, delta)
    if len(parts) != 1:
        raise ExpectationSyntax(f"cannot read {text!r} as [source.][delta.]name")
    name = parts[0]
    allowed = HOST_NAMES if source == "host" else NAMES
    if name in HOST_NAMES and source is None:
        source = "host"
        allowed = HOST_NAMES
    if name not in allowed:
        raise ExpectationSyntax(
            f"unknown quantity {name!r}", hint="known: " + ", ".join((*NAMES, *HOST_NAMES))
        )
    return Ref(source, name, delta)


def _unit(unit: str) -> float:
    """% is /100; sizes follow harness.units (binary; a bare number is as is, e.g. bytes)."""
    if unit == "%":
        return 0.01
    try:
        return float(unit_factor(unit))
    except SizeError as exc:
        raise ExpectationSyntax(exc.message, hint=exc.hint) from None


def _parse_term(text: str, default_name: str | None) -> Term:
    text = text.strip()
    m = _TERM.match(text)
    if m and (m.group("num") or m.group("ref")):
        factor = 1.0
        if m.group("num"):
            factor = float(m.group("num")) * _unit(m.group("unit") or "")
        if m.group("ref"):
            return Term(factor, _parse_ref(m.group("ref"), default_name))
        if m.group("star"):
            raise ExpectationSyntax(f"cannot read {text!r}")
        return Term(factor)
    if re.match(r"^[A-Za-z_.]+$", text):
        return Term(1.0, _parse_ref(text, default_name))
    raise ExpectationSyntax(
        f"cannot read {text!r} as a value", hint="use NUMBER[unit], NAME, or FACTOR * NAME"
    )


def parse_expectation(text: str, line: int = 0) -> Expectation:
    """Parse one expectation; raise ExpectationSyntax saying what is wrong."""
    t = text.strip()
    if len(t) > MAX_TEXT:
        raise ExpectationSyntax(
            f"an expectation of {len(t)} characters is too long (at most {MAX_TEXT})",
            hint="split it into several expectations",
        )
    if re.match(r"^verify\s*:", t):
        if t.split(":", 1)[1].strip() != "clean":
            raise ExpectationSyntax("verify accepts only 'clean'", hint="write: verify: clean")
        return Expectation(text=t, line=line, kind="verify")
    m = _PAIR.match(t)
    if m:
        names = tuple(n.strip() for n in m.group("names").split(",") if n.strip())
        for n in names:
            if n not in NAMES:
                raise ExpectationSyntax(f"unknown counter {n!r}", hint="known: " + ", ".join(NAMES))
        if not names:
            raise ExpectationSyntax("name at least one counter after ':'")
        tol = float(m.group("tol") or 0) / 100
        if m.group("op") == "~=" and m.group("tol") is None:
            raise ExpectationSyntax(
                "~= needs a tolerance", hint="kernel ~= model within 2%: pages_sharing"
            )
        return Expectation(text=t, line=line, kind="pair", names=names, tolerance=tol)
    m = _CMP.match(t)
    if not m:
        raise ExpectationSyntax(
            f"cannot read expectation {t!r}",
            hint="e.g. 'pages_sharing >= 0.95 * model', 'kernel == model: pages_shared', "
            "'verify: clean'",
        )
    lhs = _parse_term(m.group("lhs"), None)
    if lhs.ref is None:
        raise ExpectationSyntax(f"the left side of {t!r} must name a quantity, not a constant")
    rhs = _parse_term(m.group("rhs"), lhs.ref.name)
    return Expectation(text=t, line=line, kind="compare", lhs=lhs, op=m.group("op"), rhs=rhs)
