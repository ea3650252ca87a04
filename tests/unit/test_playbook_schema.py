"""Playbook validation: shipped playbooks load; each broken one gives its exact one-line error."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.cli import main
from harness.errors import PlaybookError
from harness.playbook.schema import (
    AgentStep,
    ExpectStep,
    ForecastStep,
    KsmStep,
    SweepStep,
    WaitStep,
    load_playbook,
    loads_playbook,
    valid_pattern,
)

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted(p for p in (ROOT / "playbooks").glob("*.yaml") if "inventory" not in p.name)
BROKEN = sorted((ROOT / "tests" / "fixtures" / "playbooks").glob("*.yaml"))


def test_the_four_playbooks_are_shipped() -> None:
    names = {p.stem for p in SHIPPED}
    assert {"quickstart", "ltp-phases", "overcommit", "nightly"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_playbook_validates(path: Path) -> None:
    pb = load_playbook(path)
    assert pb.name == path.stem
    assert pb.phases and all(p.steps for p in pb.phases)
    assert pb.expectations() or any(isinstance(s, SweepStep) for p in pb.phases for s in p.steps)


def test_quickstart_contents() -> None:
    pb = load_playbook(ROOT / "playbooks" / "quickstart.yaml")
    assert (pb.fleet.count, pb.fleet.memory_mib, pb.fleet.thp) == (4, 256, True)  # the default
    fill = pb.phases[0].steps[0]
    assert isinstance(fill, AgentStep)
    assert fill.agent_args() == ("a", str(64 * 2**20), "byte:0x5a")
    assert fill.guests == (0, 1, 2, 3)
    kinds = [type(s).__name__ for s in pb.phases[0].steps]
    assert kinds == ["AgentStep", "KsmStep", "WaitStep", "WaitStep", "AgentStep", "ExpectStep"]
    wait = pb.phases[0].steps[3]
    assert isinstance(wait, WaitStep)
    assert (wait.converged_tolerance, wait.timeout) == (0.01, 120.0)


@pytest.mark.parametrize("path", BROKEN, ids=lambda p: p.stem)
def test_broken_playbook_error(path: Path) -> None:
    expected = path.read_text().splitlines()[0].removeprefix("# error: ").format(file=path)
    with pytest.raises(PlaybookError) as info:
        load_playbook(path)
    assert info.value.message == expected
    assert "\n" not in info.value.message


def test_cli_check_prints_one_line_and_hint(capsys: pytest.CaptureFixture[str]) -> None:
    path = ROOT / "tests" / "fixtures" / "playbooks" / "bad-pattern.yaml"
    assert main(["run", "--check", str(path)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert (
        err[0]
        == f"ksmh: error: {path}:7: phases[0].steps[0].fill.pattern: unknown pattern 'bytes:5'"
    )
    assert err[1].startswith("  hint: patterns: byte:V, zero, random:SEED")
    assert len(err) == 2


def test_cli_check_valid(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--check", str(ROOT / "playbooks" / "ltp-phases.yaml")]) == 0
    assert capsys.readouterr().out.endswith("valid (4 phases, 19 steps)\n")


def test_missing_file() -> None:
    with pytest.raises(PlaybookError, match=r"^nope\.yaml: cannot read playbook: No such file"):
        load_playbook(Path("nope.yaml"))


@pytest.mark.parametrize(
    ("pattern", "problem"),
    [
        ("byte:0x5a", None),
        ("byte:255", None),
        ("byte:256", "byte value 256 is over 255"),
        ("zero", None),
        ("random:42", None),
        ("tail96:7", None),
        ("mix:7:common=60,zero=10", None),
        ("mix:7:common=60,zero=50", "common + zero must be at most 100 (percent)"),
        ("random", "unknown pattern 'random'"),
    ],
)
def test_patterns(pattern: str, problem: str | None) -> None:
    assert valid_pattern(pattern) == problem


BASE = "name: t\nfleet: {count: 4}\nphases:\n  - name: p\n    steps:\n"


@pytest.mark.parametrize(
    ("guests", "indices"),
    [("all", (0, 1, 2, 3)), ("2", (2,)), ('"1-3"', (1, 2, 3)), ("[3, 0, 3]", (0, 3))],
)
def test_guest_selection(guests: str, indices: tuple[int, ...]) -> None:
    pb = loads_playbook(BASE + f"      - verify: {{region: a, guests: {guests}}}\n")
    step = pb.phases[0].steps[0]
    assert isinstance(step, AgentStep) and step.guests == indices


def test_steps_of_every_kind() -> None:
    pb = loads_playbook(
        BASE
        + '      - wait: {full_scans: "+2", timeout: 30}\n'
        + "      - wait: {converged: {tolerance: 50}}\n"
        + "      - ksm: {run: 1, pages_to_scan: 100}\n"
        + "      - rewrite: {region: b, fraction: 0.25, seed: 9, guests: [1]}\n"
        + "      - sweep: {sleep_millisecs: [0, 20], tolerance: 2%}\n"
        + "      - expect: [verify: clean]\n"
    )
    w1, w2, k, r, s, e = pb.phases[0].steps
    assert isinstance(w1, WaitStep) and (w1.full_scans, w1.timeout) == (2, 30.0)
    assert isinstance(w2, WaitStep) and w2.converged_tolerance == 50.0
    assert isinstance(k, KsmStep) and k.values == {"pages_to_scan": 100, "run": 1}
    assert isinstance(r, AgentStep) and r.agent_args() == ("b", "0.25", "9")
    assert isinstance(s, SweepStep) and (s.tunable, s.values, s.tolerance) == (
        "sleep_millisecs",
        (0, 20),
        0.02,
    )
    assert isinstance(e, ExpectStep) and e.expectations[0].kind == "verify"


@pytest.mark.parametrize(("tolerance", "shown"), [('"-5%"', "'-5%'"), ('"nan%"', "'nan%'")])
def test_negative_tolerance_is_refused(tolerance: str, shown: str) -> None:
    # A tolerance below zero (or NaN) could never be met: every convergence wait would time out.
    with pytest.raises(PlaybookError) as info:
        loads_playbook(BASE + f"      - wait: {{converged: {{tolerance: {tolerance}}}}}\n")
    assert info.value.message == (
        "<string>:6: phases[0].steps[0].wait.converged.tolerance: expected a tolerance like "
        f"1% or 0.01 or 100 (pages), got {shown}"
    )


def test_forecast_step() -> None:
    pb = loads_playbook(
        BASE
        + "      - forecast:\n"
        + '          knobs: ["pages_to_scan=1000,sleep_millisecs=20", {pages_to_scan: 100}]\n'
        + "          target: 90%\n"
        + "          within: 10m\n"
        + "          cpu: 0.1\n"
        + "          apply: true\n"
        + "          check: {saved_bytes: 1%, seconds_to_target: 20%}\n"
        + "      - forecast: {}\n"
    )
    f, g = pb.phases[0].steps
    assert isinstance(f, ForecastStep) and isinstance(g, ForecastStep)
    assert f.knob_sets == ({"pages_to_scan": 1000, "sleep_millisecs": 20}, {"pages_to_scan": 100})
    assert (f.target, f.within, f.cpu, f.apply, f.timeout) == (0.9, 600.0, 0.1, True, 1800.0)
    assert f.checks == {"saved_bytes": 0.01, "seconds_to_target": 0.2}
    assert (g.knob_sets, g.target, g.within, g.cpu, g.apply, g.checks) == (
        (),
        0.95,
        None,
        None,
        False,
        {},
    )
    assert load_playbook(ROOT / "playbooks" / "forecast.yaml").phases[1].steps[0] == ForecastStep(
        line=20,
        knob_sets=tuple(
            {"pages_to_scan": n, "sleep_millisecs": 20} for n in (100, 400, 1000, 4000)
        ),
        target=0.95,
        within=60.0,
        cpu=0.2,
        apply=True,
        timeout=900.0,
        checks={"saved_bytes": 0.01, "seconds_to_target": 0.2, "cpu_seconds_to_target": 0.25},
    )


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("{knobs: [run=1]}", "phases[0].steps[0].forecast.knobs[0]: 'run=1': run is not a "
         "knob to compare"),
        ("{knobs: []}", "phases[0].steps[0].forecast.knobs: expected a non-empty list of "
         "knob sets, got a list"),
        ("{knobs: [{max_page_sharing: 1}]}", "phases[0].steps[0].forecast.knobs[0]."
         "max_page_sharing: max_page_sharing: 1 is out of range 2..2147483647"),
        ("{target: 120%}", "phases[0].steps[0].forecast.target: share '120%': expected a share "
         "like 95% or 0.95 (above 0, at most 100%)"),
        ("{within: soon}", "phases[0].steps[0].forecast.within: duration 'soon': expected a "
         "duration like 90s, 10m or 1h30m"),
        ("{check: {speed: 1%}}", "phases[0].steps[0].forecast.check.speed: unknown figure "
         "'speed'"),
        ("{apply: maybe}", "phases[0].steps[0].forecast.apply: expected true or false, got "
         "str 'maybe'"),
    ],
)  # fmt: skip
def test_forecast_step_errors(body: str, message: str) -> None:
    with pytest.raises(PlaybookError) as info:
        loads_playbook(BASE + f"      - forecast: {body}\n")
    assert info.value.message == "<string>:6: " + message
