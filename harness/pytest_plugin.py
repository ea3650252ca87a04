"""pytest plugin for KSM integration suites (registered through the pytest11 entry point).

Markers say what a test needs from the host; a test whose prerequisite is missing is skipped
with the exact reason, or fails when KSM_HARNESS_REQUIRE names it. Fixtures give a KSM backend
with the host-wide lock held and every knob restored, a fresh model kernel, and helpers.
Importing this module stays cheap: anything heavy is imported inside the fixtures.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Generator, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from harness import prereqs
from harness.kinds import AccelKind, choices

if TYPE_CHECKING:
    from harness.guests.fleet import Fleet
    from harness.ksm.backend import BackendBase
    from harness.ksm.types import Counters, Sample
    from harness.scenario.compare import Comparison
    from harness.scenario.series import Series

MARKERS = {
    "ksm_kernel": "needs the real /sys/kernel/mm/ksm, writable (root)",
    "kvm": "needs a KVM that runs guests (an accelerator probe boots one)",
    "qemu": "boots real QEMU guests",
    "libvirt": "needs libvirtd and the libvirt Python binding",
    "fleet": "boots a fleet of guests (QEMU, the guest image)",
    "ssh": "starts real sshd instances on loopback",
    "prometheus": "starts a real Prometheus server",
}

ARTEFACTS = pytest.StashKey[list[Callable[[Path], None]]]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("ksm-harness")
    group.addoption(
        "--ksm-backend",
        choices=("auto", "kernel", "model"),
        default="auto",
        help="KSM backend of the `ksm` fixture (auto: the kernel when writable, else the model)",
    )
    group.addoption(
        "--ksm-accel",
        choices=choices(AccelKind),
        default=AccelKind.AUTO.value,
        help="accelerator for guest_fleet guests (auto: probe KVM, fall back to TCG)",
    )
    group.addoption(
        "--ksm-results",
        default="results/pytest",
        help="where failing tests leave console logs, guest definitions and KSM snapshots",
    )


def pytest_configure(config: pytest.Config) -> None:
    for name, text in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {text}")


def _missing(name: str) -> str | None:
    probe = prereqs.PROBES.get(name)
    return probe() if probe is not None else None


def require(name: str, reason: str | None) -> None:
    """Skip for a missing prerequisite, or fail when KSM_HARNESS_REQUIRE makes it mandatory."""
    if reason is None:
        return
    if name in prereqs.required():
        pytest.fail(f"KSM_HARNESS_REQUIRE includes {name} but: {reason}", pytrace=False)
    pytest.skip(f"{name}: {reason}")


def pytest_runtest_setup(item: pytest.Item) -> None:
    for name in MARKERS:
        if item.get_closest_marker(name) is not None:
            require(name, _missing(name))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """On failure, let each fixture that registered a dumper write into the results dir."""
    report = yield
    dumpers = item.stash.get(ARTEFACTS, [])
    if report.failed and dumpers and call.when in ("setup", "call"):
        where = _results_dir(item)
        errors = []
        for dump in dumpers:
            try:
                dump(where)
            except Exception as exc:  # a broken dump must not hide the test's own failure
                errors.append(f"{type(exc).__name__}: {exc}")
        text = f"failure artefacts in {where}"
        if errors:
            text += " (some could not be written: " + "; ".join(errors) + ")"
        report.sections.append(("ksm-harness", text))
    return report


def _results_dir(item: pytest.Item) -> Path:
    base = Path(str(item.config.getoption("--ksm-results")))
    if not base.is_absolute():
        base = Path(str(item.config.rootpath)) / base
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", item.nodeid).strip("_")
    path = base / safe
    path.mkdir(parents=True, exist_ok=True)
    return path


def add_failure_artefact(request: pytest.FixtureRequest, dump: Callable[[Path], None]) -> None:
    """Register dump(dir), called only if the test fails, to save evidence into dir."""
    request.node.stash.setdefault(ARTEFACTS, []).append(dump)


def xdist_worker() -> str:
    """'gw0', 'gw1', ... under pytest-xdist, '' otherwise (used to keep guest names unique)."""
    return os.environ.get("PYTEST_XDIST_WORKER", "")


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def ksm_session_backend(request: pytest.FixtureRequest) -> BackendBase:
    """The session's KSM backend, chosen once from --ksm-backend (harness.ksm.select: auto is
    the kernel when it has KSM and we may write it, else the model)."""
    from harness.errors import KsmUnavailable
    from harness.ksm.select import choose_backend

    kind = str(request.config.getoption("--ksm-backend"))
    if kind != "model":
        # Under KSM_HARNESS_REQUIRE a missing kernel KSM fails instead of falling back.
        reason = prereqs.missing_ksm_kernel()
        if reason is not None and (kind == "kernel" or "ksm_kernel" in prereqs.required()):
            require("ksm_kernel", reason)
    try:
        return choose_backend(kind, need_write=True).backend
    except KsmUnavailable as exc:
        pytest.skip(f"ksm: {exc}")


@pytest.fixture
def ksm(request: pytest.FixtureRequest, ksm_session_backend: BackendBase) -> Iterator[BackendBase]:
    """The session's KsmBackend with the host-wide lock held and every tunable restored after.

    The lock serialises real KSM across tests and pytest-xdist workers; what crashed test runs
    left behind is recovered first, and the test's knobs are journaled, so even a SIGKILLed
    pytest leaves nothing that `ksmh recover` (or the next run) cannot undo. After the test,
    merged pages left by its (now dead) processes are dropped with run=2 so the next test
    starts clean; then every knob, run included, goes back to what it was.
    """
    from harness.ksm.sysfs import SysfsBackend
    from harness.recovery import run_session

    backend = ksm_session_backend
    if not isinstance(backend, SysfsBackend):
        from harness.ksm.model import ModelBackend

        yield ModelBackend()  # a fresh model per test: no state leaks between tests
        return
    add_failure_artefact(request, lambda d: _dump_sysfs(backend, d))
    name = "pytest-" + re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.nodeid)[-80:]
    with run_session(backend, name, "pytest", echo=lambda s: print(f"ksm-harness: {s}")):
        yield backend


def _dump_sysfs(backend: BackendBase, where: Path) -> None:
    from harness.ksm.cli import format_status, status_dict

    (where / "ksm-sysfs.txt").write_text(format_status(status_dict(backend)) + "\n")


@pytest.fixture
def ksm_model() -> Any:
    """A fresh ksm_model.Kernel (default profile) for model-only tests."""
    from ksm_model import Kernel

    return Kernel()


@pytest.fixture
def wait_full_scans(ksm: BackendBase) -> Callable[..., int]:
    """wait_full_scans(delta=2, timeout=60) on the `ksm` backend; returns the new full_scans."""

    def wait(delta: int = 2, timeout: float = 60.0) -> int:
        return ksm.wait_full_scans(delta, timeout)

    return wait


def check_counters(actual: Counters | Sample | Mapping[str, Any], **expected: int) -> None:
    """Assert the named counters equal the expected values, listing every mismatch at once.

    `actual` is a Counters, a Sample, or a mapping of counter name to value (a scenario
    snapshot's `counters`).
    """
    source: Any = getattr(actual, "counters", actual)
    got = {
        name: source.get(name) if isinstance(source, Mapping) else getattr(source, name)
        for name in expected
    }
    wrong = {n: (got[n], want) for n, want in expected.items() if got[n] != want}
    if wrong:
        lines = [f"  {n}: got {g}, expected {w}" for n, (g, w) in sorted(wrong.items())]
        raise AssertionError("KSM counters differ:\n" + "\n".join(lines))


@pytest.fixture
def assert_counters() -> Callable[..., None]:
    """assert_counters(sample_or_counters, pages_sharing=298, pages_shared=2, ...)."""
    return check_counters


IMAGES = {"tiny": "busybox", "busybox": "busybox", "debian": "debian"}


@pytest.fixture
def guest_fleet(request: pytest.FixtureRequest, ksm: BackendBase) -> Iterator[Callable[..., Fleet]]:
    """guest_fleet(count=3, memory_mib=256, image="tiny", backend="qemu", thp=False, **spec).

    Or guest_fleet(FleetSpec(...)). The arguments are those of harness.guests.spec.FleetSpec
    (accel defaults to --ksm-accel, THP to off). Boots the fleet (every guest ready, or the test
    errors with the per-guest reasons) and tears it down after the test. It holds the `ksm`
    fixture, so the host-wide lock covers the guests' whole life: their RAM is mergeable and
    would disturb any other test reading KSM counters. Guest names carry a fresh run id plus
    the xdist worker, so parallel workers never collide. thp=False boots QEMU with transparent
    huge pages off (PR_SET_THP_DISABLE, inherited): on 6.18 zero-filled THP subpages never
    merge, which no model of 4 KiB pages predicts.
    On failure each guest's console log and QEMU argv or libvirt XML land in --ksm-results.
    """
    from harness.guests.fleet import Fleet, new_run_id
    from harness.guests.spec import FleetSpec, parse_kind
    from harness.kinds import GuestBackendKind, ImageKind

    fleets: list[Fleet] = []
    accel = str(request.config.getoption("--ksm-accel"))

    def make(
        count: int | FleetSpec = 3,
        memory_mib: int = 256,
        image: str = "tiny",
        backend: str = "qemu",
        thp: bool = False,
        **kw: Any,
    ) -> Fleet:
        if isinstance(count, FleetSpec):
            spec = count
        else:
            if image not in IMAGES:
                raise ValueError(f"image {image!r}: choose one of {', '.join(IMAGES)}")
            kw.setdefault("accel", parse_kind(AccelKind, accel))
            spec = FleetSpec(count, memory_mib, image=parse_kind(ImageKind, IMAGES[image]),
                             backend=parse_kind(GuestBackendKind, backend), thp=thp,
                             **kw)  # fmt: skip
        require("fleet", prereqs.missing_fleet())
        if spec.backend == "libvirt":
            require("libvirt", prereqs.missing_libvirt())
        worker = xdist_worker()
        run_id = new_run_id() + (f"{worker}" if worker else "")
        fleet = Fleet(spec, run_id=run_id, progress=False)
        fleets.append(fleet)
        add_failure_artefact(request, lambda d: _dump_fleet(fleet, d))
        fleet.up().raise_if_failed()
        return fleet

    try:
        yield make
    finally:
        for fleet in reversed(fleets):
            fleet.down()


def _dump_fleet(fleet: Fleet, where: Path) -> None:
    """Console logs plus the exact guest definition (QEMU argv or libvirt XML) of each guest."""
    import shlex

    from harness.guests.libvirt_xml import libvirt_xml
    from harness.guests.qemu_argv import qemu_argv

    for guest in fleet.guests:
        spec = guest.spec
        target = where / spec.name
        target.mkdir(parents=True, exist_ok=True)
        if spec.console_log.exists():
            target.joinpath("console.log").write_bytes(spec.console_log.read_bytes())
        if fleet.spec.backend == "libvirt":
            target.joinpath("domain.xml").write_text(libvirt_xml(spec))
        else:
            target.joinpath("qemu-argv.txt").write_text(shlex.join(qemu_argv(spec)) + "\n")


@pytest.fixture
def ksm_scenario(
    request: pytest.FixtureRequest, ksm: BackendBase
) -> Callable[..., tuple[Series, Series, Comparison]]:
    """ksm_scenario(scenario_or_mapping) -> (kernel_series, model_series, comparison).

    Runs one scenario (harness.scenario.spec.Scenario, or the mapping form) in real child
    processes on the kernel and through ksm_model, sampling after every full scan.
    """
    from harness.scenario.compare import run_both
    from harness.scenario.spec import Scenario

    if ksm.source != "kernel":
        require("ksm_kernel", prereqs.missing_ksm_kernel() or "the --ksm-backend is the model")

    def run(scenario: Scenario | dict[str, Any]) -> tuple[Series, Series, Comparison]:
        s = scenario if isinstance(scenario, Scenario) else Scenario.from_mapping(scenario)
        return run_both(s, ksm)  # type: ignore[arg-type]

    return run
