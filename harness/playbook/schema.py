"""The playbook format: frozen dataclasses and the validator that builds them.

    name: quickstart
    fleet: {count: 4, memory_mib: 256, image: busybox, backend: qemu, accel: auto}
    ksm: {pages_to_scan: 2000, sleep_millisecs: 10}       # tunables for the run (restored after)
    sample_interval: 1.0                                   # seconds between time-series samples
    shadow: {enabled: true, max_scans_per_capture: 0}     # the model's replay of guest memory
    phases:
      - name: fill
        steps:
          - fill: {region: a, size: 64MiB, pattern: "byte:0x5a"}     # all guests
          - rewrite: {region: a, fraction: 0.5, seed: 7, guests: [0]}
          - verify: {region: a}
          - free: {region: a}
          - ksm: {run: 1}
          - wait: {full_scans: +2}          # or {converged: {tolerance: 1%, timeout: 120}}
          - wait: {seconds: 5}
          - sweep: {pages_to_scan: [100, 1000], tolerance: 1%, timeout: 300}
          - expect: ["pages_sharing >= 0.95 * model", "verify: clean"]

Every error names file, line and field (see load.Source.error).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.errors import KsmWriteRefused
from harness.guests.spec import FleetSpec as FleetSpec  # the fleet section (re-exported)
from harness.kinds import AccelKind, GuestBackendKind, ImageKind, choices
from harness.ksm.tunables import validate as validate_tunables
from harness.playbook.expect import Expectation, ExpectationSyntax, parse_expectation
from harness.playbook.load import PathKey, Source, load_file, load_text
from harness.playbook.validate import V as _V
from harness.playbook.validate import kind as _kind

MiB = 2**20
PAGE = 4096
AGENT_COMMANDS = ("fill", "rewrite", "verify", "free")
STEP_KINDS = (*AGENT_COMMANDS, "ksm", "wait", "expect", "sweep")
# Tunables a sweep may vary (each value is set with ksmd unmerged first, then timed to converge).
SWEEPABLE = ("pages_to_scan", "sleep_millisecs")
_SIZE = re.compile(r"^\s*(\d+)\s*(B|K|KB|KiB|M|MB|MiB|G|GB|GiB)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30}
_PATTERNS = (
    re.compile(r"^byte:(0x[0-9a-fA-F]{1,2}|\d{1,3})$"),
    re.compile(r"^zero$"),
    re.compile(r"^random:\d{1,19}$"),
    re.compile(r"^tail96:\d{1,19}$"),
    re.compile(r"^mix:\d{1,19}:common=(\d{1,3}),zero=(\d{1,3})$"),
)
PATTERN_HELP = "byte:V, zero, random:SEED, tail96:SEED or mix:SEED:common=P,zero=Q"


@dataclass(frozen=True)
class ShadowSpec:
    enabled: bool = True
    # 0: the model makes exactly as many full scans as the kernel; N > 0 caps each capture's
    # catch-up (big fleets idling at sleep_millisecs=10 make scans faster than a model can).
    max_scans_per_capture: int = 0


@dataclass(frozen=True)
class Step:
    """Base: `line` is where the step starts in the file (for progress and errors)."""

    line: int


@dataclass(frozen=True)
class AgentStep(Step):
    command: str  # fill | rewrite | verify | free
    region: str
    guests: tuple[int, ...]  # indices into the fleet
    size: int = 0  # bytes (fill)
    pattern: str = ""  # fill
    fraction: float = 0.0  # rewrite
    seed: int = 0  # rewrite

    def agent_args(self) -> tuple[str, ...]:
        """The agent protocol's arguments after the command word."""
        if self.command == "fill":
            return (self.region, str(self.size), self.pattern)
        if self.command == "rewrite":
            return (self.region, f"{self.fraction:g}", str(self.seed))
        return (self.region,)


@dataclass(frozen=True)
class KsmStep(Step):
    values: dict[str, int | str]


@dataclass(frozen=True)
class WaitStep(Step):
    full_scans: int | None = None
    converged_tolerance: float | None = None  # fraction of pages_sharing (<1) or pages (>=1)
    seconds: float | None = None
    timeout: float = 300.0


@dataclass(frozen=True)
class SweepStep(Step):
    tunable: str
    values: tuple[int, ...]
    tolerance: float
    timeout: float


@dataclass(frozen=True)
class ExpectStep(Step):
    expectations: tuple[Expectation, ...]


@dataclass(frozen=True)
class Phase:
    name: str
    steps: tuple[Step, ...]
    line: int


@dataclass(frozen=True)
class Playbook:
    name: str
    file: str
    description: str
    fleet: FleetSpec
    ksm: dict[str, int | str]
    phases: tuple[Phase, ...]
    sample_interval: float = 1.0
    shadow: ShadowSpec = field(default_factory=ShadowSpec)
    raw: dict[str, Any] = field(default_factory=dict, compare=False)

    def expectations(self) -> list[Expectation]:
        return [
            e
            for p in self.phases
            for s in p.steps
            if isinstance(s, ExpectStep)
            for e in s.expectations
        ]


def parse_size(value: object) -> int | None:
    """64MiB, 64M, "1 GiB", 4096 -> bytes; None if not a size."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if not isinstance(value, str):
        return None
    m = _SIZE.match(value)
    if not m:
        return None
    unit = (m.group(2) or "").lower()[:1]
    return int(m.group(1)) * _UNITS[unit]


def valid_pattern(text: str) -> str | None:
    """None when `text` is a pattern the agent knows, else what is wrong with it."""
    for i, rx in enumerate(_PATTERNS):
        m = rx.match(text)
        if not m:
            continue
        if i == 0:
            v = m.group(1)
            if int(v, 16 if v.startswith("0x") else 10) > 255:
                return f"byte value {v} is over 255"
        if i == 4 and int(m.group(1)) + int(m.group(2)) > 100:
            return "common + zero must be at most 100 (percent)"
        return None
    return f"unknown pattern {text!r}"


TOP_KEYS = ("name", "description", "fleet", "ksm", "sample_interval", "shadow", "phases")


def parse_playbook(data: object, src: Source) -> Playbook:
    """Validate plain data (from load.py) into a Playbook; PlaybookError on the first error."""
    v = _V(src)
    top = v.mapping(data, (), "a playbook")
    v.keys(top, (), TOP_KEYS)
    for required in ("name", "fleet", "phases"):
        if required not in top:
            raise src.error(
                (), f"missing required field {required!r}", hint="see playbooks/quickstart.yaml"
            )
    name = v.name(top["name"], ("name",))
    description = v.str_(top.get("description", ""), ("description",))
    fleet = _fleet(v, top["fleet"])
    ksm = _tunables(v, top.get("ksm", {}), ("ksm",))
    interval = v.num(top.get("sample_interval", 1.0), ("sample_interval",), 0.1, 3600)
    shadow = _shadow(v, top.get("shadow", {}))
    phases_raw = top["phases"]
    if not isinstance(phases_raw, list) or not phases_raw:
        raise src.error(("phases",), "expected a non-empty list of phases")
    phases: list[Phase] = []
    seen: set[str] = set()
    for i, raw in enumerate(phases_raw):
        phase = _phase(v, raw, ("phases", i), fleet)
        if phase.name in seen:
            raise src.error(("phases", i, "name"), f"phase name {phase.name!r} is used twice")
        seen.add(phase.name)
        phases.append(phase)
    return Playbook(
        name=name,
        file=src.file,
        description=description,
        fleet=fleet,
        ksm=ksm,
        phases=tuple(phases),
        sample_interval=interval,
        shadow=shadow,
        raw=top,
    )


def _fleet(v: _V, raw: object) -> FleetSpec:
    """The fleet section is harness.guests.spec.FleetSpec, the one description Fleet boots.

    Transparent huge pages are off unless `thp: true`: QEMU madvises its RAM MADV_HUGEPAGE,
    and zero-filled subpages of a THP never merge (see harness.shadow).
    """
    p: PathKey = ("fleet",)
    d = v.mapping(raw, p, "the fleet")
    v.keys(d, p, ("count", "memory_mib", "image", "backend", "accel", "vcpus", "mem_merge", "thp"))
    if "count" not in d:
        raise v.src.error(
            p, "missing required field 'count'", hint="e.g. fleet: {count: 4, memory_mib: 256}"
        )
    flags = {}
    for key, default in (("mem_merge", True), ("thp", False)):
        flags[key] = d.get(key, default)
        if not isinstance(flags[key], bool):
            raise v.src.error((*p, key), f"expected true or false, got {_kind(flags[key])}")
    return FleetSpec(
        count=v.int_(d["count"], (*p, "count"), 1, 256),
        memory_mib=v.int_(d.get("memory_mib", 256), (*p, "memory_mib"), 64, 1 << 20),
        image=ImageKind(v.str_(d.get("image", "busybox"), (*p, "image"), choices(ImageKind))),
        backend=GuestBackendKind(
            v.str_(d.get("backend", "qemu"), (*p, "backend"), choices(GuestBackendKind))
        ),
        accel=AccelKind(v.str_(d.get("accel", "auto"), (*p, "accel"), choices(AccelKind))),
        vcpus=v.int_(d.get("vcpus", 1), (*p, "vcpus"), 1, 64),
        mem_merge=flags["mem_merge"],
        thp=flags["thp"],
    )


def _shadow(v: _V, raw: object) -> ShadowSpec:
    p: PathKey = ("shadow",)
    d = v.mapping(raw, p, "shadow settings")
    v.keys(d, p, ("enabled", "max_scans_per_capture"))
    enabled = d.get("enabled", True)
    if not isinstance(enabled, bool):
        raise v.src.error((*p, "enabled"), f"expected true or false, got {_kind(enabled)}")
    cap = v.int_(d.get("max_scans_per_capture", 0), (*p, "max_scans_per_capture"), 0, 10_000)
    return ShadowSpec(enabled=enabled, max_scans_per_capture=cap)


def _tunables(v: _V, raw: object, path: PathKey) -> dict[str, int | str]:
    d = v.mapping(raw, path, "KSM tunables")
    try:
        return validate_tunables(dict(d))
    except KsmWriteRefused as exc:
        # Find the offending key for the line number: the message starts with it.
        bad = next((k for k in d if exc.message.startswith(k) or repr(k) in exc.message), None)
        raise v.src.error(
            path if bad is None else (*path, bad), exc.message, hint=exc.hint
        ) from None


def _phase(v: _V, raw: object, path: PathKey, fleet: FleetSpec) -> Phase:
    d = v.mapping(raw, path, "a phase")
    v.keys(d, path, ("name", "steps"))
    if "name" not in d:
        raise v.src.error(path, "missing required field 'name'")
    name = v.name(d["name"], (*path, "name"))
    steps_raw = d.get("steps")
    if not isinstance(steps_raw, list) or not steps_raw:
        raise v.src.error((*path, "steps"), "expected a non-empty list of steps")
    steps = tuple(_step(v, s, (*path, "steps", i), fleet) for i, s in enumerate(steps_raw))
    return Phase(name=name, steps=steps, line=v.src.line(path))


def _step(v: _V, raw: object, path: PathKey, fleet: FleetSpec) -> Step:
    d = v.mapping(raw, path, "a step (one of " + ", ".join(STEP_KINDS) + ")")
    if len(d) != 1:
        raise v.src.error(
            path, f"a step has exactly one key ({', '.join(STEP_KINDS)}), got {len(d)}"
        )
    kind, body = next(iter(d.items()))
    p = (*path, kind)
    line = v.src.line(path)
    if kind in AGENT_COMMANDS:
        return _agent_step(v, kind, body, p, fleet, line)
    if kind == "ksm":
        values = _tunables(v, body, p)
        if not values:
            raise v.src.error(p, "expected at least one tunable, e.g. ksm: {run: 1}")
        return KsmStep(line=line, values=values)
    if kind == "wait":
        return _wait_step(v, body, p, line)
    if kind == "sweep":
        return _sweep_step(v, body, p, line)
    if kind == "expect":
        return _expect_step(v, body, p, line)
    raise v.src.error(p, f"unknown step {kind!r}", hint="steps: " + ", ".join(STEP_KINDS))


def _guests(v: _V, raw: object, path: PathKey, count: int) -> tuple[int, ...]:
    if raw == "all" or raw is None:
        return tuple(range(count))
    items: list[int] = []
    if isinstance(raw, int) and not isinstance(raw, bool):
        items = [raw]
    elif isinstance(raw, str) and re.match(r"^\d+-\d+$", raw):
        lo, hi = (int(x) for x in raw.split("-"))
        items = list(range(lo, hi + 1))
    elif isinstance(raw, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in raw):
        items = list(raw)
    else:
        raise v.src.error(
            path, f"expected all, an index, a range like 0-2 or a list of indices, got {_kind(raw)}"
        )
    for i in items:
        if not 0 <= i < count:
            raise v.src.error(path, f"guest index {i} is outside the fleet (0..{count - 1})")
    if not items:
        raise v.src.error(path, "selects no guest")
    return tuple(sorted(set(items)))


def _agent_step(
    v: _V, kind: str, body: object, p: PathKey, fleet: FleetSpec, line: int
) -> AgentStep:
    allowed = {
        "fill": ("region", "size", "pattern", "guests"),
        "rewrite": ("region", "fraction", "seed", "guests"),
        "verify": ("region", "guests"),
        "free": ("region", "guests"),
    }[kind]
    d = v.mapping(body, p, f"the {kind} arguments")
    v.keys(d, p, allowed)
    region = v.name(d.get("region", "a"), (*p, "region"))
    guests = _guests(v, d.get("guests", "all"), (*p, "guests"), fleet.count)
    if kind == "fill":
        for req in ("size", "pattern"):
            if req not in d:
                raise v.src.error(
                    p,
                    f"missing required field {req!r}",
                    hint="e.g. fill: {size: 64MiB, pattern: byte:0x5a}",
                )
        size = parse_size(d["size"])
        if size is None or size <= 0 or size % PAGE:
            raise v.src.error(
                (*p, "size"), f"expected a size in whole pages like 64MiB, got {d['size']!r}"
            )
        limit = fleet.memory_mib * MiB - 48 * MiB  # the guest kernel and agent need ~48 MiB
        if size > limit:
            raise v.src.error(
                (*p, "size"),
                f"{size // MiB} MiB does not fit a {fleet.memory_mib} MiB guest "
                f"(at most {limit // MiB} MiB)",
                hint="raise fleet.memory_mib or fill less",
            )
        pattern = v.str_(d["pattern"], (*p, "pattern"))
        problem = valid_pattern(pattern)
        if problem:
            raise v.src.error((*p, "pattern"), problem, hint="patterns: " + PATTERN_HELP)
        return AgentStep(
            line=line, command=kind, region=region, guests=guests, size=size, pattern=pattern
        )
    if kind == "rewrite":
        if "fraction" not in d:
            raise v.src.error(
                p, "missing required field 'fraction'", hint="e.g. rewrite: {fraction: 0.5}"
            )
        fraction = v.num(d["fraction"], (*p, "fraction"), 0.0, 1.0)
        seed = v.int_(d.get("seed", 1), (*p, "seed"), 0, 2**63 - 1)
        return AgentStep(
            line=line, command=kind, region=region, guests=guests, fraction=fraction, seed=seed
        )
    return AgentStep(line=line, command=kind, region=region, guests=guests)


def _wait_step(v: _V, body: object, p: PathKey, line: int) -> WaitStep:
    d = v.mapping(body, p, "a wait: full_scans, converged or seconds")
    v.keys(d, p, ("full_scans", "converged", "seconds", "timeout"))
    given = [k for k in ("full_scans", "converged", "seconds") if k in d]
    if len(given) != 1:
        raise v.src.error(p, "expected exactly one of full_scans, converged, seconds")
    timeout = v.num(d.get("timeout", 300), (*p, "timeout"), 1, 86400)
    if "full_scans" in d:
        raw = d["full_scans"]
        # YAML reads "+2" as the integer 2; a quoted "+2" is accepted too.
        if isinstance(raw, str) and re.match(r"^\+\d+$", raw.strip()):
            raw = int(raw.strip()[1:])
        n = v.int_(raw, (*p, "full_scans"), 1, 10_000)
        return WaitStep(line=line, full_scans=n, timeout=timeout)
    if "seconds" in d:
        return WaitStep(line=line, seconds=v.num(d["seconds"], (*p, "seconds"), 0, 86400))
    c = v.mapping(d["converged"], (*p, "converged"), "convergence settings {tolerance, timeout}")
    v.keys(c, (*p, "converged"), ("tolerance", "timeout"))
    tol = v.tolerance(c.get("tolerance", "1%"), (*p, "converged", "tolerance"))
    timeout = v.num(c.get("timeout", timeout), (*p, "converged", "timeout"), 1, 86400)
    return WaitStep(line=line, converged_tolerance=tol, timeout=timeout)


def _sweep_step(v: _V, body: object, p: PathKey, line: int) -> SweepStep:
    d = v.mapping(body, p, "a sweep")
    v.keys(d, p, (*SWEEPABLE, "tolerance", "timeout"))
    knobs = [k for k in SWEEPABLE if k in d]
    if len(knobs) != 1:
        raise v.src.error(p, f"a sweep varies exactly one of {', '.join(SWEEPABLE)}")
    knob = knobs[0]
    values = d[knob]
    if not isinstance(values, list) or not values:
        raise v.src.error((*p, knob), "expected a non-empty list of values")
    ints = tuple(
        v.int_(x, (*p, knob, i), 1 if knob == "pages_to_scan" else 0, 2**32 - 1)
        for i, x in enumerate(values)
    )
    return SweepStep(
        line=line,
        tunable=knob,
        values=ints,
        tolerance=v.tolerance(d.get("tolerance", "1%"), (*p, "tolerance")),
        timeout=v.num(d.get("timeout", 300), (*p, "timeout"), 1, 86400),
    )


def _expect_step(v: _V, body: object, p: PathKey, line: int) -> ExpectStep:
    items = body if isinstance(body, list) else [body]
    if not items:
        raise v.src.error(p, "expected at least one expectation")
    out: list[Expectation] = []
    for i, item in enumerate(items):
        ip = (*p, i) if isinstance(body, list) else p
        if isinstance(item, dict) and len(item) == 1:
            # `- verify: clean` parses as a mapping; turn it back into its text.
            ((k, val),) = item.items()
            item = f"{k}: {', '.join(map(str, val)) if isinstance(val, list) else val}"
        if not isinstance(item, str):
            raise v.src.error(ip, f"expected an expectation string, got {_kind(item)}")
        try:
            out.append(parse_expectation(item, v.src.line(ip)))
        except ExpectationSyntax as exc:
            raise v.src.error(ip, str(exc), hint=exc.hint) from None
    return ExpectStep(line=line, expectations=tuple(out))


def load_playbook(path: Path) -> Playbook:
    """Read, parse and validate a playbook file."""
    data, src = load_file(path)
    return parse_playbook(data, src)


def loads_playbook(text: str, file: str = "<string>") -> Playbook:
    data, src = load_text(text, file)
    return parse_playbook(data, src)
