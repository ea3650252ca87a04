"""The kernel matrix: the same scenarios on several kernels and on the model of each.

    matrix = run_matrix(["host", "6.1.0-57-amd64"], seeds=30, out=Path("results/kernels"))

Per kernel: the spec's worked examples (harness.scenario.examples) plus `seeds` random
scenarios (harness.scenario.generate, the host differential tests' generator), run on the
kernel (the host under the KSM lock, or a guest of that installed kernel) and on ksm_model
with the profile the kernel's release, files and behaviour probe select (harness.kernels.
detect); a scenario is exact when compare() finds no difference at all. DIR/matrix.json and
DIR/matrix.md are written (harness.kernels.report) as each kernel finishes.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ksm_model.profiles import Profile

from harness.errors import HarnessError
from harness.kernels.detect import KernelFacts, detect, stat_line_names
from harness.scenario.compare import compare
from harness.scenario.errors import ForeignKsmActivity
from harness.scenario.examples import worked_examples
from harness.scenario.generate import generate
from harness.scenario.kernel_runner import KernelRunner
from harness.scenario.model_runner import ModelRunner
from harness.scenario.series import Series
from harness.scenario.spec import Scenario

HOST = "host"
Say = Callable[[str], None]
# How long a scenario waits for another process registered with KSM (another test on a shared
# host that does not hold the lock) to go away before the kernel's row stops with an error.
FOREIGN_WAIT = 120.0


@dataclass
class Mismatch:
    """A scenario that was not exact: its first difference, or the error that stopped it."""

    scenario: str
    seed: int | None
    full_scans: int | None = None
    phase: str | None = None
    counter: str | None = None
    kernel: object = None
    model: object = None
    error: str | None = None

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"scenario": self.scenario, "seed": self.seed}
        if self.error is not None:
            out["error"] = self.error
        else:
            out.update(
                full_scans=self.full_scans, phase=self.phase, counter=self.counter,
                kernel=_plain(self.kernel), model=_plain(self.model),
            )  # fmt: skip
        return out


def _plain(v: object) -> object:
    return v if v is None or isinstance(v, bool | int | float | str) else repr(v)


@dataclass
class KernelRow:
    """One kernel of the matrix."""

    release: str
    where: str  # "host" or "guest"
    profile: str = "-"
    scenarios: int = 0
    exact: int = 0
    mismatches: list[Mismatch] = field(default_factory=list)
    seconds: float = 0.0
    boot_seconds: float | None = None
    features: dict[str, bool | int] = field(default_factory=dict)
    probed: dict[str, bool] = field(default_factory=dict)
    error: str | None = None  # the kernel could not be checked at all

    @property
    def ok(self) -> bool:
        return self.error is None and self.exact == self.scenarios and self.scenarios > 0

    def as_json(self) -> dict[str, Any]:
        return {
            "release": self.release,
            "where": self.where,
            "profile": self.profile,
            "scenarios": self.scenarios,
            "exact": self.exact,
            "mismatches": [m.as_json() for m in self.mismatches],
            "seconds": round(self.seconds, 1),
            "boot_seconds": None if self.boot_seconds is None else round(self.boot_seconds, 1),
            "probed": self.probed,
            "features": self.features,
            "error": self.error,
        }


@dataclass
class Target:
    """A kernel ready to run scenarios: its runner, facts and the model settings for it."""

    release: str
    where: str
    runner: KernelRunner
    facts: KernelFacts
    boot_seconds: float | None = None
    model_options: dict[str, Any] = field(default_factory=dict)  # hz, thp, ... (ksm_model.Kernel)

    def profile(self) -> Profile:
        return self.facts.profile()


def scenario_set(seeds: int, seed_start: int = 0) -> list[Scenario]:
    """The worked examples, then random scenarios seed_start .. seed_start+seeds-1 (THP
    processes included, as in the host's differential tests)."""
    return [*worked_examples(), *(generate(s) for s in range(seed_start, seed_start + seeds))]


def guest_model_options(release: str, thp: str, thp_use_zero_page: bool) -> dict[str, Any]:
    """The model settings of a guest kernel: its THP mode as the guest shows it, and CONFIG_HZ
    / CONFIG_PT_RECLAIM from the host's /boot/config-RELEASE (the guest boots that package)."""
    from ksm_model.hostprobe import DEFAULT_HZ, boot_config, config_hz, config_pt_reclaim

    text, _where = boot_config(Path("/boot"), release)
    return {
        "hz": config_hz(text) or DEFAULT_HZ,
        "pt_reclaim": config_pt_reclaim(text),
        "thp": thp,
        "thp_use_zero_page": thp_use_zero_page,
    }


def check(target: Target, scenarios: Sequence[Scenario], say: Say) -> KernelRow:
    """Every scenario on the target's kernel and on its model; the row of the matrix."""
    profile = target.profile()
    row = KernelRow(
        target.release, target.where, profile.name, boot_seconds=target.boot_seconds,
        features=profile.features(), probed=dict(target.facts.probed),
    )  # fmt: skip
    model = ModelRunner(profile=profile, **target.model_options)
    say(f"{target.release}: profile {profile.name}, {len(scenarios)} scenarios")
    t0 = time.monotonic()
    for i, sc in enumerate(scenarios, 1):
        row.scenarios += 1
        try:
            kernel = run_waiting(target.runner, sc, say)
        except ForeignKsmActivity as exc:
            row.mismatches.append(Mismatch(sc.name, sc.seed, error=exc.message))
            row.error = f"stopped at {sc.name}: {exc.message}"
            say(f"{target.release}: {row.error}")
            break
        except HarnessError as exc:
            row.mismatches.append(Mismatch(sc.name, sc.seed, error=exc.message))
            say(f"{target.release}: {sc.name}: ERROR {exc.message}")
            continue
        result = compare(kernel, model.run(sc))
        if result.ok:
            row.exact += 1
        else:
            d = result.differences[0]
            row.mismatches.append(
                Mismatch(sc.name, sc.seed, d.scan, d.phase, d.field, d.kernel, d.model)
            )
            say(f"{target.release}: {sc.name}: first difference at {d}")
        if i % 25 == 0:
            say(f"{target.release}: {i}/{len(scenarios)} scenarios, {row.exact} exact")
    row.seconds = time.monotonic() - t0
    return row


def run_waiting(runner: KernelRunner, scenario: Scenario, say: Say) -> Series:
    """runner.run(scenario); while a foreign process is registered with KSM, wait for it to
    go (up to FOREIGN_WAIT seconds) and try again; then ForeignKsmActivity."""
    deadline = time.monotonic() + FOREIGN_WAIT
    while True:
        try:
            return runner.run(scenario)
        except ForeignKsmActivity as exc:
            if time.monotonic() > deadline:
                raise
            say(f"waiting for another KSM user to go: {exc.message[:160]}")
            time.sleep(5)


@contextmanager
def host_target(say: Say) -> Iterator[Target]:
    """The host's own kernel, under the KSM lock with every knob saved and restored."""
    from ksm_model.hostprobe import probe

    from harness.ksm.lock import DEFAULT_LOCK
    from harness.ksm.sysfs import SysfsBackend
    from harness.recovery import run_session

    backend = SysfsBackend()
    with run_session(
        backend, f"kernels-check-{os.getpid()}", "kernels", echo=say,
        on_wait=lambda: say(f"host: waiting for the host KSM lock {DEFAULT_LOCK}"),
    ):  # fmt: skip
        runner = KernelRunner(backend)
        release = os.uname().release
        stat = Path("/proc/self/ksm_stat")
        fields = stat_line_names(stat.read_text()) if stat.exists() else None
        files = [p.name for p in backend.root.iterdir()]
        facts = detect(runner, release, files, fields)
        yield Target(release, HOST, runner, facts, model_options=probe().kernel_args())


@contextmanager
def guest_target(release: str, say: Say) -> Iterator[Target]:
    """A guest of the installed kernel `release`, running its own KSM."""
    from harness.kernels.machine import THP_ROOT, matrix_guest

    say(f"{release}: booting a guest")
    with matrix_guest(release, say=say) as g:
        say(f"{release}: guest up in {g.boot_seconds:.1f} s")
        runner = g.runner()
        text = g.read("/proc/1/ksm_stat")
        fields = stat_line_names(text) if text is not None else None
        facts = detect(runner, release, g.files, fields)
        zero = (g.read(f"{THP_ROOT}/use_zero_page") or "").strip() == "1"
        options = guest_model_options(release, g.thp, zero)
        say(f"{release}: model settings {options}")
        yield Target(release, "guest", runner, facts, g.boot_seconds, options)


def resolve_kernels(wanted: Sequence[str] | None) -> list[str]:
    """The kernels to check: `wanted` (release names, a prefix such as 6.12, or host), or by
    default every installed Debian guest kernel and then the host (last: it waits for the host
    KSM lock, which guests with mem_merge off do not need)."""
    from harness.guests.image import installed_kernels

    installed = list(installed_kernels())
    if not wanted:
        return [*installed, HOST]
    out: list[str] = []
    for name in wanted:
        if name == HOST or name in installed:
            match = [name]
        else:
            # A prefix ends at a dot, dash or plus: 6.1 is 6.1.0-57-amd64, never 6.12.x.
            match = [r for r in installed if r.startswith(name) and r[len(name) : len(name) + 1]
                     in (".", "-", "+")]  # fmt: skip
            if len(match) > 1:
                match = match[-1:]  # the newest of a series, e.g. 6.12 -> 6.12.117+deb12-amd64
        if not match:
            raise HarnessError(
                f"--kernel {name}: no such installed kernel (installed: "
                f"{', '.join(installed) or 'none'})",
                hint=f"apt-get install linux-image-{name}, or use one of those, or host",
            )
        if match[0] not in out:
            out.append(match[0])
    return out


def run_matrix(
    kernels: Sequence[str],
    seeds: int,
    out: Path,
    seed_start: int = 0,
    say: Say | None = None,
) -> list[KernelRow]:
    """Check every kernel; DIR/matrix.json and DIR/matrix.md are rewritten after each."""
    from harness.kernels.report import write_matrix

    echo = say or (lambda s: print(s, file=sys.stderr, flush=True))
    scenarios = scenario_set(seeds, seed_start)
    rows: list[KernelRow] = []
    meta = {"seeds": seeds, "seed_start": seed_start, "examples": len(worked_examples())}
    for name in kernels:
        where = HOST if name == HOST else "guest"
        release = os.uname().release if name == HOST else name
        t0 = time.monotonic()
        try:
            with host_target(echo) if name == HOST else guest_target(name, echo) as target:
                row = check(target, scenarios, echo)
        except HarnessError as exc:
            row = KernelRow(release, where, error=exc.message)
            echo(f"{release}: ERROR {exc.message}")
        row.seconds = time.monotonic() - t0
        rows.append(row)
        echo(
            f"{row.release}: {row.exact}/{row.scenarios} exact, profile {row.profile}, "
            f"{row.seconds:.0f} s"
        )
        write_matrix(out, rows, meta)
    return rows
