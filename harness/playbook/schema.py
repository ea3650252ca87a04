"""The playbook format: pydantic models of the file, and the load that builds what the runner runs.

    name: quickstart
    fleet: {count: 4, memory_mib: 256, image: busybox, backend: qemu, accel: auto}
    ksm: {pages_to_scan: 2000, sleep_millisecs: 10}       # tunables for the run (restored after)
    sample_interval: 1.0                                   # seconds between time-series samples
    shadow: {enabled: true, max_scans_per_capture: 0}     # the model's replay of guest memory
    foreign: refuse                      # other KSM users on the host: refuse, or capture them
    scan_samples: false                  # true: the kernel frozen at each full scan of waits
    push: http://pushgateway:9091        # push the run's summary there when it ends (optional)
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

Sizes follow harness.units (64MiB, 64M; a bare number is bytes). Every error names file, line
and field and carries a hint (harness.validation); the values built are in harness.playbook.plan.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Annotated, Any, Union

from pydantic import Discriminator, Tag, model_validator

from harness.errors import HarnessError, KsmWriteRefused, PlaybookError
from harness.kinds import ForeignPolicy
from harness.ksm.tunables import U32_MAX
from harness.ksm.tunables import validate as validate_tunables
from harness.playbook.expect import ExpectationSyntax, parse_expectation
from harness.playbook.plan import (
    AGENT_COMMANDS,
    GUEST_OVERHEAD,
    PAGE,
    STEP_KINDS,
    SWEEPABLE,
    AgentStep,
    ExpectStep,
    FleetDoc,
    FleetSpec,
    ForecastStep,
    KsmStep,
    MiB,
    Phase,
    Playbook,
    ShadowSpec,
    Step,
    SweepStep,
    WaitStep,
)
from harness.units import parse_size
from harness.validation import (
    Check,
    Invalid,
    Model,
    between,
    boolean,
    fail,
    kind,
    matching,
    one_of,
    validate,
)
from harness.yamlfile import PathKey, Source, load_text, read_text

__all__ = [
    "AGENT_COMMANDS",
    "PATTERN_HELP",
    "STEP_KINDS",
    "AgentStep",
    "ExpectStep",
    "FleetSpec",
    "ForecastStep",
    "KsmStep",
    "Phase",
    "Playbook",
    "ShadowSpec",
    "Step",
    "SweepStep",
    "WaitStep",
    "load_playbook",
    "loads_playbook",
    "parse_playbook",
    "valid_pattern",
]

HINT = "see playbooks/quickstart.yaml and the README's playbook format"
MAX_GUEST = 255  # a fleet has at most 256 guests (FleetSpec.count)
_PATTERNS = (
    re.compile(r"^byte:(0x[0-9a-fA-F]{1,2}|[0-9]{1,3})$"),
    re.compile(r"^zero$"),
    re.compile(r"^random:[0-9]{1,19}$"),
    re.compile(r"^tail96:[0-9]{1,19}$"),
    re.compile(r"^mix:[0-9]{1,19}:common=([0-9]{1,3}),zero=([0-9]{1,3})$"),
)
PATTERN_HELP = "byte:V, zero, random:SEED, tail96:SEED or mix:SEED:common=P,zero=Q"


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
    return f"unknown pattern {text[:40]!r}"


# -- field checks -----------------------------------------------------------------------------


def _pattern(value: Any) -> str:
    hint = "patterns: " + PATTERN_HELP
    if not isinstance(value, str):
        raise Invalid(f"expected a pattern, got {kind(value)}", hint=hint)
    problem = valid_pattern(value)
    if problem:
        raise Invalid(problem, hint=hint)
    return value


def _fill_size(value: Any) -> int:
    size = parse_size(value, bare="bytes")
    if size <= 0 or size % PAGE:
        raise Invalid(
            f"{size} bytes is not a positive whole number of 4 KiB pages",
            hint="e.g. size: 64MiB (a bare number is bytes)",
        )
    return size


def _tolerance(value: Any) -> float:
    """1% or 0.01 -> 0.01 (relative); 100 -> 100.0 pages (absolute)."""
    number: float | None = None
    if isinstance(value, str) and value.strip().endswith("%") and len(value) < 40:
        try:
            number = float(value.strip()[:-1]) / 100
        except ValueError:
            number = None
    elif isinstance(value, int | float) and not isinstance(value, bool):
        number = float(value)
    # A negative, NaN or infinite tolerance would make every convergence wait meaningless.
    if number is not None and number >= 0 and math.isfinite(number):
        return number
    raise Invalid(
        f"expected a tolerance like 1% or 0.01 or 100 (pages), got {value!r}",
        hint="below 1: a fraction of pages_sharing; from 1 up: a number of pages",
    )


def _guests(value: Any) -> tuple[int, ...]:
    """all | N | "LO-HI" | [N, ...] -> sorted indices; () means all. Bounded before expanding."""
    help_ = "guests: all, an index, a range like 0-2 or a list of indices"
    items: list[int] | range
    if value == "all" or value is None:
        return ()
    if isinstance(value, int) and not isinstance(value, bool):
        items = [value]
    elif isinstance(value, str) and re.fullmatch(r"[0-9]{1,9}-[0-9]{1,9}", value):
        lo, hi = (int(x) for x in value.split("-"))
        if hi > MAX_GUEST:
            raise Invalid(f"guest index {hi} is outside any fleet (0..{MAX_GUEST})", hint=help_)
        items = range(lo, hi + 1)
    elif isinstance(value, list) and all(
        isinstance(x, int) and not isinstance(x, bool) for x in value
    ):
        items = value
    else:
        raise Invalid(
            f"expected all, an index, a range like 0-2 or a list of indices, got {kind(value)}",
            hint=help_,
        )
    for i in items:
        if not 0 <= i <= MAX_GUEST:
            raise Invalid(f"guest index {i} is outside any fleet (0..{MAX_GUEST})", hint=help_)
    if not items:
        raise Invalid("selects no guest", hint=help_)
    return tuple(sorted(set(items)))


def _tunables(value: Any) -> dict[str, int | str]:
    if not isinstance(value, dict):
        raise Invalid(f"expected KSM tunables (a mapping), got {kind(value)}")
    for key, v in value.items():
        try:
            validate_tunables({key: v})
        except KsmWriteRefused as exc:
            raise Invalid(exc.message, exc.hint, at=(key,)) from None
    return validate_tunables(dict(value))


def _ksm_step(value: Any) -> dict[str, int | str]:
    values = _tunables(value)
    if not values:
        raise Invalid("expected at least one tunable", hint="e.g. ksm: {run: 1}")
    return values


def _full_scans(value: Any) -> Any:
    # YAML reads +2 as the integer 2; a quoted "+2" is accepted too.
    if isinstance(value, str) and re.fullmatch(r"\+[0-9]{1,9}", value.strip()):
        return int(value.strip()[1:])
    return value


def _nonempty(what: str) -> Check:
    def check(value: Any) -> Any:
        if not isinstance(value, list) or not value:
            raise Invalid(f"expected a non-empty list of {what}, got {kind(value)}")
        return value

    return Check(check)


def _expectations(value: Any) -> tuple[str, ...]:
    single = not isinstance(value, list)
    items = [value] if single else value
    if not items:
        raise Invalid("expected at least one expectation", hint="e.g. expect: ['verify: clean']")
    out: list[str] = []
    for i, item in enumerate(items):
        at: PathKey = () if single else (i,)
        if isinstance(item, dict) and len(item) == 1:
            # `- verify: clean` parses as a mapping; turn it back into its text.
            ((k, val),) = item.items()
            item = f"{k}: {', '.join(map(str, val)) if isinstance(val, list) else val}"
        if not isinstance(item, str):
            raise Invalid(f"expected an expectation string, got {kind(item)}", at=at)
        try:
            parse_expectation(item)
        except ExpectationSyntax as exc:
            raise Invalid(str(exc), exc.hint, at=at) from None
        out.append(item)
    return tuple(out)


Name = Annotated[str, matching(r"[A-Za-z0-9_.-]{1,32}", "use 1-32 letters, digits, '_', '.', '-'")]
Guests = Annotated[tuple[int, ...], Check(_guests)]
Tolerance = Annotated[float, Check(_tolerance)]
Seconds = Annotated[float, between(1, 86400, integer=False)]
Tunables = Annotated[dict[str, int | str], Check(_tunables)]


# -- the document -----------------------------------------------------------------------------


class RegionArgs(Model):
    what = "the step's arguments"
    region: Name = "a"
    guests: Guests = ()


class FillArgs(RegionArgs):
    what = "the fill arguments"
    example = "e.g. fill: {size: 64MiB, pattern: byte:0x5a}"
    size: Annotated[int, Check(_fill_size)]
    pattern: Annotated[str, Check(_pattern)]


class RewriteArgs(RegionArgs):
    what = "the rewrite arguments"
    example = "e.g. rewrite: {fraction: 0.5}"
    fraction: Annotated[float, between(0, 1, integer=False)]
    seed: Annotated[int, between(0, 2**63 - 1)] = 1


class ConvergedArgs(Model):
    what = "convergence settings {tolerance, timeout}"
    tolerance: Tolerance = 0.01
    timeout: Seconds | None = None


class WaitArgs(Model):
    what = "a wait: full_scans, converged or seconds"
    example = "e.g. wait: {full_scans: +2}"
    full_scans: Annotated[int | None, between(1, 10_000), Check(_full_scans)] = None
    converged: ConvergedArgs | None = None
    seconds: Annotated[float | None, between(0, 86400, integer=False)] = None
    timeout: Seconds = 300.0

    @model_validator(mode="after")
    def _one_kind(self) -> WaitArgs:
        given = [k for k in ("full_scans", "converged", "seconds") if getattr(self, k) is not None]
        if len(given) != 1:
            raise fail("expected exactly one of full_scans, converged, seconds", self.example)
        return self


class SweepArgs(Model):
    what = "a sweep"
    example = "e.g. sweep: {pages_to_scan: [100, 1000], tolerance: 1%}"
    pages_to_scan: Annotated[
        list[Annotated[int, between(1, U32_MAX)]] | None, _nonempty("values")
    ] = None
    sleep_millisecs: Annotated[
        list[Annotated[int, between(0, U32_MAX)]] | None, _nonempty("values")
    ] = None
    tolerance: Tolerance = 0.01
    timeout: Seconds = 300.0

    @model_validator(mode="after")
    def _one_knob(self) -> SweepArgs:
        if sum(getattr(self, k) is not None for k in SWEEPABLE) != 1:
            raise fail(f"a sweep varies exactly one of {', '.join(SWEEPABLE)}", self.example)
        return self


def _knob_sets(value: Any) -> tuple[dict[str, int | str], ...]:
    """A list of knob sets, each 'K=V,K=V' or a mapping of tunables (run excluded)."""
    from harness.twin.knobs import knob_set

    if not isinstance(value, list) or not value:
        raise Invalid(
            f"expected a non-empty list of knob sets, got {kind(value)}",
            hint='e.g. knobs: ["pages_to_scan=1000", {pages_to_scan: 100}]',
        )
    out = []
    for i, item in enumerate(value):
        if isinstance(item, dict):
            if "run" in item:
                raise Invalid("run is not a knob to compare", hint="leave run out", at=(i,))
            try:
                out.append(_tunables(item))
            except Invalid as exc:
                raise Invalid(exc.message, exc.hint, at=(i, *exc.at)) from None
        elif isinstance(item, str):
            try:
                out.append(knob_set(item))
            except HarnessError as exc:
                raise Invalid(exc.message, exc.hint, at=(i,)) from None
        else:
            raise Invalid(f"expected K=V,... or a mapping, got {kind(item)}", at=(i,))
    return tuple(out)


def _share(value: Any) -> float:
    from harness.units import share

    if isinstance(value, int | float) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise Invalid(f"expected a share like 95% or 0.95, got {kind(value)}")
    try:
        return share(value, "share")
    except HarnessError as exc:
        raise Invalid(exc.message) from None


def _duration(value: Any) -> float:
    from harness.units import duration

    if isinstance(value, int | float) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise Invalid(f"expected a duration like 90s or 10m, got {kind(value)}")
    try:
        return duration(value, "duration")
    except HarnessError as exc:
        raise Invalid(exc.message) from None


FORECAST_FIGURES = ("saved_bytes", "seconds_to_target", "cpu_seconds_to_target")


def _checks(value: Any) -> dict[str, float]:
    if not isinstance(value, dict):
        raise Invalid(f"expected figure: tolerance pairs, got {kind(value)}")
    out = {}
    for key, tol in value.items():
        if key not in FORECAST_FIGURES:
            raise Invalid(
                f"unknown figure {key!r}", hint="figures: " + ", ".join(FORECAST_FIGURES), at=(key,)
            )
        try:
            out[key] = _share(tol)
        except Invalid as exc:
            raise Invalid(exc.message, hint="a tolerance like 20% (relative)", at=(key,)) from None
    return out


Share = Annotated[float, Check(_share)]
Duration = Annotated[float, Check(_duration)]


class ForecastArgs(Model):
    what = "the forecast arguments"
    example = 'e.g. forecast: {knobs: ["pages_to_scan=1000"], target: 95%, apply: true}'
    knobs: Annotated[tuple[dict[str, int | str], ...], Check(_knob_sets)] = ()
    target: Share = 0.95
    within: Duration | None = None
    cpu: Share | None = None
    apply: Annotated[bool, Check(boolean)] = False
    timeout: Annotated[float, between(1, 86400, integer=False)] = 1800.0
    check: Annotated[dict[str, float], Check(_checks)] = {}  # noqa: RUF012 (pydantic copies)


class FillStep(Model):
    fill: FillArgs


class RewriteStep(Model):
    rewrite: RewriteArgs


class VerifyStep(Model):
    verify: RegionArgs


class FreeStep(Model):
    free: RegionArgs


class KsmStepDoc(Model):
    ksm: Annotated[dict[str, int | str], Check(_ksm_step)]


class WaitStepDoc(Model):
    wait: WaitArgs


class SweepStepDoc(Model):
    sweep: SweepArgs


class ForecastStepDoc(Model):
    forecast: ForecastArgs


class ExpectStepDoc(Model):
    expect: Annotated[tuple[str, ...], Check(_expectations)]


def _step_kind(value: Any) -> str | None:
    return f"<{next(iter(value))}>" if isinstance(value, dict) and len(value) == 1 else None


def _step_shape(value: Any) -> Any:
    steps = ", ".join(STEP_KINDS)
    if not isinstance(value, dict):
        raise Invalid(f"expected a step (one of {steps}), got {kind(value)}")
    if len(value) != 1:
        raise Invalid(f"a step has exactly one key ({steps}), got {len(value)}")
    (key,) = value
    if key not in STEP_KINDS:
        raise Invalid(f"unknown step {key!r}", hint="steps: " + steps, at=(key,))
    return value


StepDoc = Annotated[
    Union[  # noqa: UP007 (a union of tagged members reads better spelled out)
        Annotated[FillStep, Tag("<fill>")],
        Annotated[RewriteStep, Tag("<rewrite>")],
        Annotated[VerifyStep, Tag("<verify>")],
        Annotated[FreeStep, Tag("<free>")],
        Annotated[KsmStepDoc, Tag("<ksm>")],
        Annotated[WaitStepDoc, Tag("<wait>")],
        Annotated[SweepStepDoc, Tag("<sweep>")],
        Annotated[ExpectStepDoc, Tag("<expect>")],
        Annotated[ForecastStepDoc, Tag("<forecast>")],
    ],
    Discriminator(_step_kind),
    Check(_step_shape),
]


class PhaseDoc(Model):
    what = "a phase"
    example = "e.g. - name: fill\n    steps: [...]"
    name: Name
    steps: Annotated[list[StepDoc], _nonempty("steps")]


def _push_url(value: Any) -> Any:
    """`push:` is a Pushgateway URL (harness.monitoring.push.check_url says what is one)."""
    from harness.monitoring.push import check_url

    if not isinstance(value, str):
        raise Invalid(f"expected a string, got {kind(value)}")
    try:
        return check_url(value)
    except HarnessError as exc:
        raise Invalid(exc.message, hint=exc.hint) from None


class PlaybookDoc(Model):
    what = "a playbook"
    example = HINT
    name: Name
    description: str = ""
    fleet: FleetDoc
    ksm: Tunables = {}  # noqa: RUF012 (pydantic copies defaults)
    sample_interval: Annotated[float, between(0.1, 3600, integer=False)] = 1.0
    shadow: ShadowSpec = ShadowSpec()
    foreign: Annotated[ForeignPolicy, one_of(ForeignPolicy)] = ForeignPolicy.REFUSE
    scan_samples: Annotated[bool, Check(boolean)] = False
    push: Annotated[str | None, Check(_push_url)] = None
    phases: Annotated[list[PhaseDoc], _nonempty("phases")]

    @classmethod
    def unknown_field(cls, key: str, data: dict[str, Any]) -> Invalid:
        if {"hosts", "known_hosts", "defaults"} & set(data):
            return Invalid(
                f"unknown field {key!r}: this looks like an inventory, not a playbook",
                hint="run a playbook on an inventory's hosts with "
                "`ksmh run --inventory FILE PLAYBOOK`",
            )
        return super().unknown_field(key, data)

    @model_validator(mode="after")
    def _fits_the_fleet(self) -> PlaybookDoc:
        """Phase names are unique; steps select guests of this fleet and fit in their RAM."""
        seen: set[str] = set()
        limit = self.fleet.memory_mib * MiB - GUEST_OVERHEAD
        for i, phase in enumerate(self.phases):
            if phase.name in seen:
                raise fail(f"phase name {phase.name!r} is used twice", at=("phases", i, "name"))
            seen.add(phase.name)
            for j, step in enumerate(phase.steps):
                (key,) = step.model_fields_set
                args = getattr(step, key)
                at = ("phases", i, "steps", j, key)
                if isinstance(args, RegionArgs) and args.guests:
                    top = args.guests[-1]
                    if top >= self.fleet.count:
                        raise fail(
                            f"guest index {top} is outside the fleet (0..{self.fleet.count - 1})",
                            hint="guests count from 0; raise fleet.count or pick others",
                            at=(*at, "guests"),
                        )
                if isinstance(args, FillArgs) and args.size > limit:
                    raise fail(
                        f"{args.size // MiB} MiB does not fit a {self.fleet.memory_mib} MiB "
                        f"guest (at most {limit // MiB} MiB)",
                        hint="raise fleet.memory_mib or fill less",
                        at=(*at, "size"),
                    )
        return self


# -- from the document to what the runner runs ------------------------------------------------


def _step(doc: Any, path: PathKey, src: Source, count: int) -> Step:
    line = src.line(path)
    (key,) = doc.model_fields_set
    args = getattr(doc, key)
    if isinstance(args, RegionArgs):
        guests = args.guests or tuple(range(count))
        base = {"line": line, "command": key, "region": args.region, "guests": guests}
        if isinstance(args, FillArgs):
            return AgentStep(**base, size=args.size, pattern=args.pattern)
        if isinstance(args, RewriteArgs):
            return AgentStep(**base, fraction=args.fraction, seed=args.seed)
        return AgentStep(**base)
    if isinstance(args, WaitArgs):
        c = args.converged
        if c is None:
            return WaitStep(line, args.full_scans, None, args.seconds, args.timeout)
        timeout = args.timeout if c.timeout is None else c.timeout
        return WaitStep(line, converged_tolerance=c.tolerance, timeout=timeout)
    if isinstance(args, SweepArgs):
        knob = next(k for k in SWEEPABLE if getattr(args, k) is not None)
        values = tuple(getattr(args, knob))
        return SweepStep(line, knob, values, args.tolerance, args.timeout)
    if isinstance(args, ForecastArgs):
        return ForecastStep(
            line,
            knob_sets=tuple(args.knobs),
            target=args.target,
            within=args.within,
            cpu=args.cpu,
            apply=args.apply,
            timeout=args.timeout,
            checks=dict(args.check),
        )
    if key == "expect":
        # A list of expectations: each its own line; a single string: the key's line.
        lines = [src.lines.get((*path, key, i), src.line((*path, key))) for i in range(len(args))]
        exps = tuple(parse_expectation(t, n) for t, n in zip(args, lines, strict=True))
        return ExpectStep(line, exps)
    return KsmStep(line, dict(args))


def parse_playbook(data: object, src: Source) -> Playbook:
    """Validate plain data (from harness.yamlfile) into a Playbook; PlaybookError if invalid."""
    doc = validate(PlaybookDoc, data, src)
    assert isinstance(data, dict)
    phases = tuple(
        Phase(
            name=p.name,
            steps=tuple(
                _step(s, ("phases", i, "steps", j), src, doc.fleet.count)
                for j, s in enumerate(p.steps)
            ),
            line=src.line(("phases", i)),
        )
        for i, p in enumerate(doc.phases)
    )
    return Playbook(
        name=doc.name,
        file=src.file,
        description=doc.description,
        fleet=doc.fleet.spec(),
        ksm=dict(doc.ksm),
        phases=phases,
        sample_interval=doc.sample_interval,
        shadow=doc.shadow,
        foreign=doc.foreign,
        scan_samples=doc.scan_samples,
        push=doc.push,
        raw=data,
    )


def _source(file: str) -> Source:
    return Source(file=file, error_type=PlaybookError, hint=HINT)


def load_playbook(path: Path) -> Playbook:
    """Read, parse and validate a playbook file."""
    src = _source(str(path))
    return parse_playbook(load_text(read_text(Path(path), src, "playbook"), src, "playbook"), src)


def loads_playbook(text: str, file: str = "<string>") -> Playbook:
    """Parse and validate playbook text (`file` names it in errors)."""
    src = _source(file)
    return parse_playbook(load_text(text, src, "playbook"), src)
