"""Scenario.from_mapping: build a Scenario from plain data (a dict, e.g. loaded from YAML).

Every error is a ScenarioError whose message starts with the path of the offending field,
such as ``processes[1].contents[3]`` or ``actions[2].after``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from harness.scenario import tokens as tk
from harness.scenario.errors import ScenarioError
from harness.scenario.spec import (
    MAX_PAGES,
    NAME_RE,
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
    check_tunables,
)

_TOP_KEYS = {"name", "seed", "scans", "tunables", "processes", "actions"}


def scenario_from_mapping(data: Mapping[str, Any]) -> Scenario:
    """The Scenario described by `data` (see harness.scenario.spec for the format)."""
    if not isinstance(data, Mapping):
        raise ScenarioError(f"scenario: expected a mapping, got {type(data).__name__}")
    _no_extra(data, _TOP_KEYS, "scenario")
    name = data.get("name", "scenario")
    if not isinstance(name, str):
        raise ScenarioError(f"name: {name!r} must be a string")
    seed = data.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise ScenarioError(f"seed: {seed!r} must be an integer")
    if "scans" not in data:
        raise ScenarioError("scans: missing (how many full scans to sample)")
    tunables = data.get("tunables") or {}
    if not isinstance(tunables, Mapping):
        raise ScenarioError("tunables: expected a mapping of name: value")
    procs = data.get("processes")
    if not isinstance(procs, Sequence) or isinstance(procs, str) or not procs:
        raise ScenarioError("processes: expected a non-empty list")
    processes = tuple(_process(p, f"processes[{i}]") for i, p in enumerate(procs))
    acts = data.get("actions") or []
    if not isinstance(acts, Sequence) or isinstance(acts, str):
        raise ScenarioError("actions: expected a list")
    actions = tuple(_action(a, f"actions[{i}]") for i, a in enumerate(acts))
    return Scenario(
        processes=processes,
        scans=data["scans"],
        tunables=tuple(tunables.items()),
        actions=actions,
        name=name,
        seed=seed,
    )


def _no_extra(m: Mapping[str, Any], allowed: set[str], where: str) -> None:
    extra = sorted(set(m) - allowed)
    if extra:
        raise ScenarioError(
            f"{where}.{extra[0]}: unknown field", hint="known: " + ", ".join(sorted(allowed))
        )


def _process(p: object, where: str) -> ProcessSpec:
    if not isinstance(p, Mapping):
        raise ScenarioError(f"{where}: expected a mapping with name and pages/fill or contents")
    _no_extra(p, {"name", "pages", "fill", "contents", "thp"}, where)
    name = p.get("name")
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ScenarioError(f"{where}.name: {name!r} must be 1-32 letters, digits, '_', '.', '-'")
    if "contents" in p:
        if "pages" in p or "fill" in p:
            raise ScenarioError(f"{where}: give either contents or pages + fill, not both")
        contents = p["contents"]
        if not isinstance(contents, Sequence) or isinstance(contents, str):
            raise ScenarioError(f"{where}.contents: expected a list of tokens ('a', 'a*10', ...)")
        pages: list[str] = []
        for j, item in enumerate(contents):
            try:
                pages.extend(
                    tk.decode_runs([item]) if isinstance(item, str) else [tk.normalize(item)]
                )
            except tk.TokenError as exc:
                raise ScenarioError(f"{where}.contents[{j}]: {exc}") from None
    else:
        count = p.get("pages")
        if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= MAX_PAGES:
            raise ScenarioError(f"{where}.pages: {count!r} must be an integer in 1..{MAX_PAGES}")
        if "fill" not in p:
            raise ScenarioError(f"{where}.fill: missing (the token every page is filled with)")
        try:
            pages = [tk.normalize(p["fill"])] * count
        except tk.TokenError as exc:
            raise ScenarioError(f"{where}.fill: {exc}") from None
    if not 1 <= len(pages) <= MAX_PAGES:
        raise ScenarioError(f"{where}.contents: {len(pages)} pages, must be 1..{MAX_PAGES}")
    thp = p.get("thp", False)
    if not isinstance(thp, bool):
        raise ScenarioError(f"{where}.thp: {thp!r} must be true or false")
    return ProcessSpec(name=name, pages=tuple(pages), thp=thp)


_RANGE = {"process", "start", "count"}
_ACTION_FIELDS: dict[str, set[str]] = {
    "write": {"process", "pages", "page", "content"},
    "unmergeable": _RANGE,
    "mergeable": _RANGE,
    "dontneed": _RANGE,
    "spawn": {"process", "pages", "fill", "contents", "thp"},
    "fork": {"process", "child"},
    "exit": {"process"},
    "rerun": set(),
    "set": {"tunable", "value"},
}


def _action(a: object, where: str) -> Action:
    if not isinstance(a, Mapping):
        raise ScenarioError(f"{where}: expected a mapping with after and do")
    kind = a.get("do")
    if kind not in _ACTION_FIELDS:
        raise ScenarioError(
            f"{where}.do: {kind!r} is not an action", hint="one of: " + ", ".join(_ACTION_FIELDS)
        )
    _no_extra(a, {"after", "do"} | _ACTION_FIELDS[kind], where)
    after = a.get("after")
    if not isinstance(after, int) or isinstance(after, bool):
        raise ScenarioError(f"{where}.after: {after!r} must be an integer (a full-scan count)")
    optional = {"pages", "page", "start", "count", "fill", "contents", "thp"}
    for key in _ACTION_FIELDS[kind] - optional:
        if key not in a:
            raise ScenarioError(f"{where}.{key}: missing for do: {kind}")
    if kind == "write":
        return Write(after, a["process"], _pages(a, where), _token(a["content"], where))
    if kind in ("unmergeable", "mergeable", "dontneed"):
        start, count = a.get("start", 0), a.get("count")
        for key, v in (("start", start), ("count", count)):
            if v is not None and (not isinstance(v, int) or isinstance(v, bool)):
                raise ScenarioError(f"{where}.{key}: {v!r} must be an integer")
        if kind == "unmergeable":
            return Unmergeable(after, a["process"], start, count)
        if kind == "mergeable":
            return Mergeable(after, a["process"], start, count)
        return Dontneed(after, a["process"], start, count)
    if kind == "spawn":
        spec = {k: v for k, v in a.items() if k not in ("after", "do")}
        spec["name"] = spec.pop("process")
        return Spawn(after, _process(spec, where))
    if kind == "fork":
        return Fork(after, a["process"], a["child"])
    if kind == "exit":
        return Exit(after, a["process"])
    if kind == "rerun":
        return Rerun(after)
    name, value = a["tunable"], a["value"]
    parsed = check_tunables([(str(name), value)], f"{where}.tunable")
    return SetTunable(after, parsed[0][0], parsed[0][1])


def _pages(a: Mapping[str, Any], where: str) -> tuple[int, ...]:
    if ("pages" in a) == ("page" in a):
        raise ScenarioError(f"{where}.pages: give exactly one of page or pages")
    raw = a["pages"] if "pages" in a else [a["page"]]
    if not isinstance(raw, Sequence) or isinstance(raw, str):
        raise ScenarioError(f"{where}.pages: expected a list of page indexes")
    for page in raw:
        if not isinstance(page, int) or isinstance(page, bool):
            raise ScenarioError(f"{where}.pages: {page!r} is not a page index")
    return tuple(raw)


def _token(value: object, where: str) -> str:
    try:
        return tk.normalize(value)
    except tk.TokenError as exc:
        raise ScenarioError(f"{where}.content: {exc}") from None
