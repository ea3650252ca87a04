"""What the runner runs: a validated playbook as frozen values (built by harness.playbook.schema).

FleetDoc and ShadowSpec are the playbook's `fleet:` and `shadow:` sections as they are written
(pydantic models that validate the file); the runner reads ShadowSpec as is, and the fleet as
the harness.guests.spec.FleetSpec that FleetDoc.spec() builds (the same type `ksmh fleet up` and
the guest_fleet fixture build). Steps carry the line they start on, for progress and errors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any

from harness.guests.spec import FleetSpec as FleetSpec  # what the fleet section builds
from harness.kinds import AccelKind, ForeignPolicy, GuestBackendKind, ImageKind
from harness.playbook.expect import Expectation
from harness.units import parse_size
from harness.validation import Check, Invalid, Model, between, boolean, one_of

MiB = 2**20
PAGE = 4096
AGENT_COMMANDS = ("fill", "rewrite", "verify", "free")
STEP_KINDS = (*AGENT_COMMANDS, "ksm", "wait", "expect", "sweep", "forecast")
# Tunables a sweep may vary (each value is set with ksmd unmerged first, then timed to converge).
SWEEPABLE = ("pages_to_scan", "sleep_millisecs")
# The guest kernel and agent need about this much of a guest's RAM; a fill gets the rest.
GUEST_OVERHEAD = 48 * MiB


def _memory_mib(value: Any) -> Any:
    """memory_mib: an integer (MiB) or a size such as 1GiB, in whole MiB."""
    if isinstance(value, str):
        size = parse_size(value, bare="MiB", what="memory size")
        if size % MiB:
            raise Invalid(f"{value!r} is not a whole number of MiB")
        return size // MiB
    return value


class FleetDoc(Model):
    """The playbook's `fleet:` section as written; `spec()` is the FleetSpec Fleet boots."""

    what = "the fleet"
    example = "e.g. fleet: {count: 4, memory_mib: 256}"

    count: Annotated[int, between(1, 256)]
    memory_mib: Annotated[int, between(64, 1 << 20), Check(_memory_mib)] = 256
    image: Annotated[ImageKind, one_of(ImageKind)] = ImageKind.BUSYBOX
    backend: Annotated[GuestBackendKind, one_of(GuestBackendKind)] = GuestBackendKind.QEMU
    accel: Annotated[AccelKind, one_of(AccelKind)] = AccelKind.AUTO
    vcpus: Annotated[int, between(1, 64)] = 1
    mem_merge: Annotated[bool, Check(boolean)] = True
    # Transparent huge pages for guest RAM, as production KVM hosts run guests (QEMU madvises
    # its RAM MADV_HUGEPAGE). The model follows them (harness.shadow passes the THP layout);
    # false boots QEMU with THP disabled (PR_SET_THP_DISABLE).
    thp: Annotated[bool, Check(boolean)] = True

    def spec(self) -> FleetSpec:
        """The one mapping from a playbook to what Fleet(spec) boots."""
        return FleetSpec(
            count=self.count,
            memory_mib=self.memory_mib,
            image=self.image,
            backend=self.backend,
            accel=self.accel,
            vcpus=self.vcpus,
            mem_merge=self.mem_merge,
            thp=self.thp,
        )


class ShadowSpec(Model):
    """The playbook's `shadow:` section: how the model replays the guests' memory."""

    what = "shadow settings"
    example = "e.g. shadow: {enabled: true, max_scans_per_capture: 0}"

    enabled: Annotated[bool, Check(boolean)] = True
    # 0: the model makes exactly as many full scans as the kernel; N > 0 caps each capture's
    # catch-up (big fleets idling at sleep_millisecs=10 make scans faster than a model can).
    max_scans_per_capture: Annotated[int, between(0, 10_000)] = 0


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
class ForecastStep(Step):
    """Forecast KSM from a capture of the guests (KSM off); with `apply`, then turn it on
    with the recommended knobs and measure (harness.playbook.forecast_step)."""

    knob_sets: tuple[dict[str, int | str], ...] = ()  # () = the host's knobs and a ladder
    target: float = 0.95
    within: float | None = None  # seconds
    cpu: float | None = None  # share of one core
    apply: bool = False
    timeout: float = 1800.0
    checks: dict[str, float] = field(default_factory=dict)  # figure -> relative tolerance


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
    # Processes outside the run that use KSM change the kernel's counters: refuse the
    # comparison (exit 2, naming them), or capture them into the model like the guests.
    foreign: ForeignPolicy = ForeignPolicy.REFUSE
    # Frozen end-of-scan samples of the kernel during waits (ksmd paused a moment per scan).
    scan_samples: bool = False
    push: str | None = None  # a Pushgateway URL: push the run's summary when it ends
    raw: dict[str, Any] = field(default_factory=dict, compare=False)

    def expectations(self) -> list[Expectation]:
        return [
            e
            for p in self.phases
            for s in p.steps
            if isinstance(s, ExpectStep)
            for e in s.expectations
        ]
