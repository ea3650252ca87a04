"""Scenario: one KSM workload, described once, run on the real kernel and on the model.

A scenario is a set of processes, each with one anonymous buffer whose pages are named by
content tokens (see harness.scenario.tokens), the tunables written before run=1, how many full
scans to sample, and actions applied at the end of given full scans. It is a frozen value; build
it directly or with `Scenario.from_mapping()` from a plain dict (e.g. loaded from YAML):

    name: example-6
    tunables: {smart_scan: 1}
    scans: 4
    processes:
      - {name: p1, pages: 1, fill: a}
      - {name: p2, contents: ["a*1"]}
      - {name: p3, pages: 1024, fill: a, thp: true}
    actions:
      - {after: 2, do: write, process: p2, pages: [0], content: b}

Actions (`do:`): write, unmergeable / mergeable / dontneed (optional page range start, count),
fork (child), exit, spawn (a late joiner: process, pages + fill or contents), rerun (run=2
then run=1), set (tunable, value).

A process with `thp: true` advises its buffer MADV_HUGEPAGE (else MADV_NOHUGEPAGE) and its
buffer starts on a 2 MiB boundary, so each whole 2 MiB block of it is faulted in as one
transparent huge page at its first write (if the host's THP mode allows and the kernel finds a
huge page; the kernel runner records what it got, see Snapshot). A spawned process takes
`thp` too.

Semantics shared by both runners:
- processes register with KSM one at a time in list order while ksmd is idle, then run=1;
- "after F" means right after the F-th full scan since the start completed, counted by the
  runner (a `rerun` resets the kernel's full_scans counter, not this count);
- actions at the same F run in list order while ksmd is paused; then ksmd resumes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from harness.errors import KsmWriteRefused
from harness.ksm.tunables import WRITE_ORDER
from harness.ksm.tunables import validate as validate_tunables
from harness.scenario import tokens as tk
from harness.scenario.errors import ScenarioError

# Tunables a scenario may set. run belongs to the runner; the advisor depends on wall-clock
# time, which the two sides do not share.
SCENARIO_TUNABLES = (
    "pages_to_scan",
    "sleep_millisecs",
    "max_page_sharing",
    "use_zero_pages",
    "smart_scan",
    "merge_across_nodes",
    "stable_node_chains_prune_millisecs",
)
MAX_PAGES = 262_144  # 1 GiB of 4 KiB pages per process
NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,32}$")


@dataclass(frozen=True)
class ProcessSpec:
    """One process with one buffer; pages[i] is the token of page i; thp: MADV_HUGEPAGE."""

    name: str
    pages: tuple[str, ...]
    thp: bool = False

    def __post_init__(self) -> None:
        where = f"process {self.name!r}"
        if not isinstance(self.name, str) or not NAME_RE.match(self.name):
            raise ScenarioError(
                f"processes: name {self.name!r} must be 1-32 letters, digits, '_', '.', '-'"
            )
        if not 1 <= len(self.pages) <= MAX_PAGES:
            raise ScenarioError(f"{where}: pages must hold 1..{MAX_PAGES} pages")
        if not isinstance(self.thp, bool):
            raise ScenarioError(f"{where}: thp {self.thp!r} must be true or false")
        for i, token in enumerate(self.pages):
            if not _canonical(token):
                raise ScenarioError(f"{where}: page {i} token {token!r} is not canonical")


@dataclass(frozen=True)
class Write:
    """Write new content into pages of a process (a write fault: COW on a merged page)."""

    after: int
    process: str
    pages: tuple[int, ...]
    content: str
    kind: ClassVar[str] = "write"


@dataclass(frozen=True)
class Unmergeable:
    """madvise(MADV_UNMERGEABLE) on pages [start, start+count) (count None: to the end)."""

    after: int
    process: str
    start: int = 0
    count: int | None = None
    kind: ClassVar[str] = "unmergeable"


@dataclass(frozen=True)
class Mergeable:
    """madvise(MADV_MERGEABLE) again on pages [start, start+count) (re-registers if needed)."""

    after: int
    process: str
    start: int = 0
    count: int | None = None
    kind: ClassVar[str] = "mergeable"


@dataclass(frozen=True)
class Dontneed:
    """madvise(MADV_DONTNEED) on pages [start, start+count): they become non-present."""

    after: int
    process: str
    start: int = 0
    count: int | None = None
    kind: ClassVar[str] = "dontneed"


@dataclass(frozen=True)
class Spawn:
    """A new process (a late joiner) fills its buffer and registers now, at the tail."""

    after: int
    spec: ProcessSpec
    kind: ClassVar[str] = "spawn"

    @property
    def process(self) -> str:
        return self.spec.name


@dataclass(frozen=True)
class Fork:
    """fork() the process; the child, named `child`, keeps the buffer (same pages, COW)."""

    after: int
    process: str
    child: str
    kind: ClassVar[str] = "fork"


@dataclass(frozen=True)
class Exit:
    """The process exits (its mm is torn down before the action completes)."""

    after: int
    process: str
    kind: ClassVar[str] = "exit"


@dataclass(frozen=True)
class Rerun:
    """Write run=2 (unmerge everything, full_scans back to 0); ksmd resumes with run=1."""

    after: int
    kind: ClassVar[str] = "rerun"


@dataclass(frozen=True)
class SetTunable:
    """Write one tunable; a refusal (e.g. EBUSY) is recorded as the action's outcome."""

    after: int
    name: str
    value: int
    kind: ClassVar[str] = "set"


Action = Write | Unmergeable | Mergeable | Dontneed | Fork | Exit | Spawn | Rerun | SetTunable
RangeAction = Unmergeable | Mergeable | Dontneed


@dataclass(frozen=True)
class Scenario:
    """A complete, validated workload description (see the module docstring)."""

    processes: tuple[ProcessSpec, ...]
    scans: int
    tunables: tuple[tuple[str, int], ...] = ()
    actions: tuple[Action, ...] = ()
    name: str = "scenario"
    seed: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.scans, int) or isinstance(self.scans, bool) or self.scans < 1:
            raise ScenarioError(f"scans: {self.scans!r} must be an integer >= 1")
        if not self.processes:
            raise ScenarioError("processes: at least one process is needed")
        object.__setattr__(self, "tunables", check_tunables(self.tunables, "tunables"))
        _check_actions(self)

    @property
    def tunable_values(self) -> dict[str, int]:
        """The tunables as a dict, in the harness's safe write order."""
        return dict(self.tunables)

    def actions_after(self, scan: int) -> tuple[Action, ...]:
        """The actions to apply at the end of full scan `scan`, in list order."""
        return tuple(a for a in self.actions if a.after == scan)

    def page_count(self, process: str) -> int:
        """Buffer size in pages of a process, including fork children (same as the parent)."""
        for p in self.processes:
            if p.name == process:
                return len(p.pages)
        for a in self.actions:
            if isinstance(a, Fork) and a.child == process:
                return self.page_count(a.process)
            if isinstance(a, Spawn) and a.spec.name == process:
                return len(a.spec.pages)
        raise KeyError(process)

    # -- mappings --------------------------------------------------------------------------
    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> Scenario:
        """Build from a plain mapping; every error names the offending field."""
        from harness.scenario.loader import scenario_from_mapping

        return scenario_from_mapping(data)

    def to_mapping(self) -> dict[str, Any]:
        """A plain-data form that from_mapping accepts (contents run-length encoded)."""
        out: dict[str, Any] = {"name": self.name}
        if self.seed is not None:
            out["seed"] = self.seed
        out["scans"] = self.scans
        out["tunables"] = dict(self.tunables)
        out["processes"] = [_process_mapping(p) for p in self.processes]
        out["actions"] = [_action_mapping(a) for a in self.actions]
        return out

    def describe(self) -> str:
        """One readable line per element, for failure messages."""
        lines = [
            f"scenario {self.name!r}" + (f" seed={self.seed}" if self.seed is not None else "")
        ]
        lines.append(f"  scans={self.scans} tunables={dict(self.tunables)}")
        for p in self.processes:
            thp = " (thp)" if p.thp else ""
            lines.append(f"  process {p.name}{thp}: {' '.join(tk.encode_runs(p.pages))}")
        for a in self.actions:
            lines.append(f"  after F={a.after}: {action_text(a)}")
        return "\n".join(lines)


def action_text(a: Action) -> str:
    """Short human form of an action, e.g. 'write p2 pages [0] <- b'."""
    if isinstance(a, Write):
        return f"write {a.process} pages {list(a.pages)} <- {a.content}"
    if isinstance(a, Fork):
        return f"fork {a.process} -> {a.child}"
    if isinstance(a, RangeAction):
        span = "" if (a.start, a.count) == (0, None) else f" pages [{a.start}:+{a.count}]"
        return f"{a.kind} {a.process}{span}"
    if isinstance(a, Exit):
        return f"exit {a.process}"
    if isinstance(a, Spawn):
        thp = " (thp)" if a.spec.thp else ""
        return f"spawn {a.spec.name}{thp}: {' '.join(tk.encode_runs(a.spec.pages))}"
    if isinstance(a, SetTunable):
        return f"set {a.name}={a.value}"
    return "run=2 then run=1"


def _action_mapping(a: Action) -> dict[str, Any]:
    out: dict[str, Any] = {"after": a.after, "do": a.kind}
    if isinstance(a, Write):
        out.update(process=a.process, pages=list(a.pages), content=a.content)
    elif isinstance(a, Fork):
        out.update(process=a.process, child=a.child)
    elif isinstance(a, RangeAction):
        out["process"] = a.process
        if (a.start, a.count) != (0, None):
            out.update(start=a.start, count=a.count)
    elif isinstance(a, Exit):
        out["process"] = a.process
    elif isinstance(a, Spawn):
        out.update(_process_mapping(a.spec))
        out["process"] = out.pop("name")
    elif isinstance(a, SetTunable):
        out.update(tunable=a.name, value=a.value)
    return out


def _process_mapping(p: ProcessSpec) -> dict[str, Any]:
    out: dict[str, Any] = {"name": p.name, "contents": tk.encode_runs(p.pages)}
    if p.thp:
        out["thp"] = True
    return out


# -- validation ---------------------------------------------------------------------------


def check_tunables(values: object, where: str) -> tuple[tuple[str, int], ...]:
    items = list(values.items()) if isinstance(values, Mapping) else list(values)  # type: ignore[call-overload]
    raw: dict[str, object] = {}
    for item in items:
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)):
            raise ScenarioError(f"{where}: {item!r} is not a (name, value) pair")
        name, value = item
        if name not in SCENARIO_TUNABLES:
            raise ScenarioError(
                f"{where}.{name}: not a scenario tunable",
                hint="allowed: " + ", ".join(SCENARIO_TUNABLES),
            )
        raw[name] = value
    try:
        parsed = validate_tunables(raw)
    except KsmWriteRefused as exc:
        raise ScenarioError(f"{where}.{exc.message}", hint=exc.hint) from None
    if parsed.get("pages_to_scan") == 0:
        raise ScenarioError(f"{where}.pages_to_scan: 0 would stop ksmd from ever finishing a scan")
    return tuple((n, int(parsed[n])) for n in WRITE_ORDER if n in parsed)


def _check_actions(s: Scenario) -> None:
    """Names exist and are alive when used, times are ordered, ksmd always has work."""
    names = [p.name for p in s.processes]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ScenarioError(f"processes: name {dup!r} is used twice")
    size = {p.name: len(p.pages) for p in s.processes}
    alive = set(names)
    # Pages still in a VM_MERGEABLE range, per live process: a process with any keeps its
    # mm registered, and some registered mm keeps ksmd completing full scans.
    merge = {p.name: set(range(len(p.pages))) for p in s.processes}
    last = 1
    for i, a in enumerate(s.actions):
        where = f"actions[{i}]"
        if not isinstance(a, Action):
            raise ScenarioError(f"{where}: {a!r} is not an action")
        if not isinstance(a.after, int) or isinstance(a.after, bool):
            raise ScenarioError(f"{where}.after: {a.after!r} must be an integer")
        if not 1 <= a.after < s.scans:
            raise ScenarioError(
                f"{where}.after: {a.after} must be in 1..{s.scans - 1} "
                "(an action after the last sampled scan is never observed)"
            )
        if a.after < last:
            raise ScenarioError(f"{where}.after: {a.after} is earlier than the action before it")
        if a.after != last and not any(merge[n] for n in alive):
            raise ScenarioError(_idle_message(last))
        last = a.after
        if isinstance(a, Spawn):
            if not isinstance(a.spec, ProcessSpec) or a.spec.name in size:
                raise ScenarioError(f"{where}.process: {a.process!r} must be a new name")
            size[a.spec.name] = len(a.spec.pages)
            alive.add(a.spec.name)
            merge[a.spec.name] = set(range(len(a.spec.pages)))
            continue
        process = getattr(a, "process", None)
        if process is not None and process not in alive:
            state = "has exited" if process in size else "does not exist"
            raise ScenarioError(f"{where}.process: {process!r} {state} at F={a.after}")
        if isinstance(a, Write):
            _check_write(a, size[a.process], where)
        elif isinstance(a, RangeAction):
            pages = _range(a, size[a.process], where)
            if isinstance(a, Unmergeable):
                merge[a.process] -= pages
            elif isinstance(a, Mergeable):
                merge[a.process] |= pages
        elif isinstance(a, Fork):
            if not isinstance(a.child, str) or not NAME_RE.match(a.child) or a.child in size:
                raise ScenarioError(f"{where}.child: {a.child!r} must be a new valid name")
            size[a.child] = size[a.process]
            alive.add(a.child)
            merge[a.child] = set(merge[a.process])
        elif isinstance(a, Exit):
            alive.discard(a.process)
        elif isinstance(a, SetTunable):
            check_tunables([(a.name, a.value)], f"{where}.tunable")
    if not any(merge[n] for n in alive):
        raise ScenarioError(_idle_message(last))


def _check_write(a: Write, size: int, where: str) -> None:
    if not a.pages:
        raise ScenarioError(f"{where}.pages: name at least one page")
    for page in a.pages:
        if not isinstance(page, int) or not 0 <= page < size:
            raise ScenarioError(f"{where}.pages: {page!r} is outside 0..{size - 1}")
    if not _canonical(a.content):
        raise ScenarioError(f"{where}.content: {a.content!r} is not a canonical token")


def _range(a: RangeAction, size: int, where: str) -> set[int]:
    # start is checked before range_of() does arithmetic with it (a str start: TypeError).
    if not isinstance(a.start, int) or not 0 <= a.start < size:
        raise ScenarioError(f"{where}.start: {a.start!r} is outside 0..{size - 1}")
    _, count = range_of(a, size)
    if not isinstance(count, int) or count < 1 or a.start + count > size:
        raise ScenarioError(f"{where}.count: {a.count!r} pages from {a.start} exceed {size}")
    return set(range(a.start, a.start + count))


def range_of(a: RangeAction, size: int) -> tuple[int, int]:
    """(first page, page count) of a range action on a buffer of `size` pages."""
    return a.start, size - a.start if a.count is None else a.count


def _canonical(token: object) -> bool:
    try:
        return isinstance(token, str) and tk.normalize(token) == token
    except tk.TokenError:
        return False


def _idle_message(after: int) -> str:
    return (
        f"actions: after F={after} no live MADV_MERGEABLE process is left, so ksmd would stop "
        "and no further full scan would complete"
    )
