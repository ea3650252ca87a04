"""Scenario.from_mapping and scenario files: pydantic models of the format (harness.validation).

The models mirror the frozen values of harness.scenario.spec field for field: a model's fields
that a value's dataclass also has are passed through by name, so a new scenario field or action
field is one line here (its type and check) next to the one line in spec.py. A new action is a
dataclass there and a model with `target` here, listed in ACTIONS.

Every error is a ScenarioError naming the offending field (``processes[1].contents[3]: ...``);
from a file (`load_scenario`), also the file and line. Semantic checks (names alive when used,
times ordered, ksmd kept busy) stay with the values (spec.Scenario.__post_init__).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Union

from pydantic import Discriminator, Tag, model_validator

from harness.errors import KsmWriteRefused
from harness.ksm.tunables import validate as validate_tunables
from harness.scenario import tokens as tk
from harness.scenario.errors import ScenarioError
from harness.scenario.spec import (
    MAX_PAGES,
    SCENARIO_TUNABLES,
    Action,
    Dontneed,
    Exit,
    Fork,
    Mergeable,
    ProcessSpec,
    Rerun,
    Scenario,
    SetTunable,
    Spawn,
    Unmergeable,
    Write,
)
from harness.validation import Check, Invalid, Model, between, fail, kind, matching, validate
from harness.yamlfile import Source, load_text, read_text

MAX_SCANS = 100_000
Name = Annotated[
    str, matching(r"[A-Za-z0-9_.-]{1,32}", "must be 1-32 letters, digits, '_', '.', '-'")
]
Int = Annotated[int, between(-(2**63), 2**63 - 1)]
TOKEN_HINT = "page tokens: one letter or digit, 0xNN or a byte value, zero, u:<k>; tok*n repeats"


def _token(value: Any) -> str:
    try:
        return tk.normalize(value)
    except tk.TokenError as exc:
        raise Invalid(str(exc), hint=TOKEN_HINT) from None


def _contents(value: Any) -> tuple[str, ...]:
    """Tokens and runs ('a*50') -> one token per page, refusing more than MAX_PAGES first."""
    if not isinstance(value, list | tuple):
        raise Invalid(f"expected a list of tokens ('a', 'a*10', ...), got {kind(value)}")
    pages: list[str] = []
    for j, item in enumerate(value):
        token, count = item, 1
        if isinstance(item, str) and "*" in item:
            token, _, n = item.rpartition("*")
            if not (n.isascii() and n.isdigit() and len(n) <= 7 and int(n) >= 1):
                raise Invalid(f"{item!r}: the repeat count must be a positive integer", at=(j,))
            count = int(n)
        if len(pages) + count > MAX_PAGES:
            raise Invalid(f"more than {MAX_PAGES} pages", at=(j,))
        try:
            pages.extend([tk.normalize(token)] * count)
        except tk.TokenError as exc:
            raise Invalid(str(exc), hint=TOKEN_HINT, at=(j,)) from None
    return tuple(pages)


Token = Annotated[str, Check(_token)]


class Buffer(Model):
    """One process's pages: `pages` + `fill`, or `contents`."""

    pages: Annotated[int | None, between(1, MAX_PAGES)] = None
    fill: Token | None = None
    contents: Annotated[tuple[str, ...] | None, Check(_contents)] = None
    thp: bool = False  # MADV_HUGEPAGE on a 2 MiB-aligned buffer (else MADV_NOHUGEPAGE)

    @model_validator(mode="after")
    def _one_way(self) -> Buffer:
        if self.contents is not None:
            if self.pages is not None or self.fill is not None:
                raise fail("give either contents or pages + fill, not both")
            if not self.contents:
                raise fail("no pages", at=("contents",))
        elif self.pages is None:
            raise fail("missing: how many pages (or contents)", at=("pages",))
        elif self.fill is None:
            raise fail("missing: the token every page is filled with", at=("fill",))
        return self

    def tokens(self) -> tuple[str, ...]:
        if self.contents is not None:
            return self.contents
        assert self.fill is not None and self.pages is not None
        return (self.fill,) * self.pages


class ProcessDoc(Buffer):
    what = "a process"
    example = "e.g. {name: p1, pages: 100, fill: a} or {name: p2, contents: ['a*50', 'u:1']}"
    name: Name

    def spec(self) -> ProcessSpec:
        return ProcessSpec(name=self.name, pages=self.tokens(), thp=self.thp)


class ActionDoc(Model):
    """Fields every action has; `target` is the spec dataclass it builds."""

    what = "an action (a mapping with after and do)"
    target: ClassVar[type[Any]]
    after: Int
    do: str

    def action(self) -> Action:
        names = {f.name for f in dataclasses.fields(self.target)}
        action: Action = self.target(
            **{n: getattr(self, n) for n in type(self).model_fields if n in names}
        )
        return action


def _page_list(value: Any) -> Any:
    if not isinstance(value, list | tuple):
        raise Invalid(f"expected a list of page indexes, got {kind(value)}")
    return tuple(value)


class WriteDoc(ActionDoc):
    target = Write
    process: str
    pages: Annotated[tuple[Int, ...] | None, Check(_page_list)] = None
    page: Int | None = None
    content: Token

    @model_validator(mode="after")
    def _one_of(self) -> WriteDoc:
        if (self.pages is None) == (self.page is None):
            raise fail("give exactly one of page or pages", at=("pages",))
        return self

    def action(self) -> Action:
        pages = self.pages if self.pages is not None else (self.page,)
        return Write(
            self.after, self.process, tuple(p for p in pages if p is not None), self.content
        )


class RangeDoc(ActionDoc):
    process: str
    start: Int = 0
    count: Int | None = None


class UnmergeableDoc(RangeDoc):
    target = Unmergeable


class MergeableDoc(RangeDoc):
    target = Mergeable


class DontneedDoc(RangeDoc):
    target = Dontneed


class SpawnDoc(ActionDoc, Buffer):
    target = Spawn
    process: Name

    def action(self) -> Action:
        return Spawn(self.after, ProcessSpec(name=self.process, pages=self.tokens(), thp=self.thp))


class ForkDoc(ActionDoc):
    target = Fork
    process: str
    child: str


class ExitDoc(ActionDoc):
    target = Exit
    process: str


class RerunDoc(ActionDoc):
    target = Rerun


class SetDoc(ActionDoc):
    target = SetTunable
    tunable: str
    value: Int | str

    @model_validator(mode="after")
    def _known(self) -> SetDoc:
        try:
            _tunables({self.tunable: self.value})
        except Invalid as exc:
            field = "tunable" if self.tunable not in SCENARIO_TUNABLES else "value"
            raise fail(exc.message, exc.hint, at=(field,)) from None
        return self

    def action(self) -> Action:
        value = validate_tunables({self.tunable: self.value})[self.tunable]
        return SetTunable(self.after, self.tunable, int(value))


ACTIONS: dict[str, type[ActionDoc]] = {
    "write": WriteDoc,
    "unmergeable": UnmergeableDoc,
    "mergeable": MergeableDoc,
    "dontneed": DontneedDoc,
    "spawn": SpawnDoc,
    "fork": ForkDoc,
    "exit": ExitDoc,
    "rerun": RerunDoc,
    "set": SetDoc,
}


def _action_shape(value: Any) -> Any:
    if not isinstance(value, dict):
        raise Invalid(f"expected a mapping with after and do, got {kind(value)}")
    if value.get("do") not in ACTIONS:
        raise Invalid(
            f"{value.get('do')!r} is not an action",
            hint="one of: " + ", ".join(ACTIONS),
            at=("do",) if "do" in value else (),
        )
    return value


ActionUnion = Annotated[
    Union[  # noqa: UP007 (tagged members read better spelled out)
        Annotated[WriteDoc, Tag("<write>")],
        Annotated[UnmergeableDoc, Tag("<unmergeable>")],
        Annotated[MergeableDoc, Tag("<mergeable>")],
        Annotated[DontneedDoc, Tag("<dontneed>")],
        Annotated[SpawnDoc, Tag("<spawn>")],
        Annotated[ForkDoc, Tag("<fork>")],
        Annotated[ExitDoc, Tag("<exit>")],
        Annotated[RerunDoc, Tag("<rerun>")],
        Annotated[SetDoc, Tag("<set>")],
    ],
    Discriminator(lambda v: f"<{v.get('do')}>" if isinstance(v, dict) else None),
    Check(_action_shape),
]


def _tunables(value: Any) -> dict[str, int | str]:
    """Scenario tunables by name, each parsed as the kernel would (harness.ksm.tunables)."""
    if not isinstance(value, dict):
        raise Invalid(f"expected a mapping of tunable: value, got {kind(value)}")
    for key, v in value.items():
        where = (key,)
        if key not in SCENARIO_TUNABLES:
            raise Invalid(
                f"{key!r} is not a scenario tunable",
                hint="allowed: " + ", ".join(SCENARIO_TUNABLES),
                at=where,
            )
        try:
            validate_tunables({key: v})
        except KsmWriteRefused as exc:
            raise Invalid(exc.message.removeprefix(f"{key}: "), exc.hint, at=where) from None
    return validate_tunables(dict(value))


def _list(value: Any) -> Any:
    if not isinstance(value, list | tuple):
        raise Invalid(f"expected a list, got {kind(value)}")
    return list(value)


def _nonempty_list(value: Any) -> Any:
    if not _list(value):
        raise Invalid("expected a non-empty list")
    return list(value)


class ScenarioDoc(Model):
    """The scenario format; fields named like spec.Scenario's are passed through."""

    what = "a scenario"
    example = "see the README's scenario format"
    name: str = "scenario"
    seed: Int | None = None
    scans: Annotated[int, between(1, MAX_SCANS)]
    tunables: Annotated[dict[str, Int | str], Check(_tunables)] = {}  # noqa: RUF012
    processes: Annotated[list[ProcessDoc], Check(_nonempty_list)]
    actions: Annotated[list[ActionUnion], Check(_list)] = []  # noqa: RUF012

    def scenario(self) -> Scenario:
        names = {f.name for f in dataclasses.fields(Scenario)}
        fields = {n: getattr(self, n) for n in type(self).model_fields if n in names}
        fields.update(
            processes=tuple(p.spec() for p in self.processes),
            tunables=tuple(self.tunables.items()),
            actions=tuple(a.action() for a in self.actions),
        )
        return Scenario(**fields)


HINT = "see the scenario format in README.md (Scenarios) and harness/scenario/spec.py"


def _source(file: str = "") -> Source:
    return Source(file=file, error_type=ScenarioError, hint=HINT)


def scenario_from_mapping(data: Mapping[str, Any], src: Source | None = None) -> Scenario:
    """The Scenario described by `data` (see harness.scenario.spec for the format)."""
    if isinstance(data, Mapping) and not isinstance(data, dict):
        data = dict(data)
    doc = validate(ScenarioDoc, data, src or _source())
    try:
        return doc.scenario()
    except ScenarioError as exc:  # the values' own (semantic) checks
        raise ScenarioError(exc.message, hint=exc.hint or HINT) from None


def load_scenario(path: Path) -> Scenario:
    """Read a scenario YAML file; errors name file, line and field."""
    src = _source(str(path))
    return scenario_from_mapping(
        load_text(read_text(Path(path), src, "scenario"), src, "scenario"), src
    )
