"""The pytest plugin, driven through pytester: options, skips, REQUIRE, teardown, dumps, xdist."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from harness.ksm.lock import ksm_lock
from harness.ksm.sysfs import KSM_ROOT

pytestmark = pytest.mark.ksm_kernel


def test_markers_and_options_are_registered(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("--markers")
    for marker in ("ksm_kernel", "kvm", "qemu", "libvirt", "fleet", "ssh", "prometheus"):
        assert any(line.startswith(f"@pytest.mark.{marker}:") for line in result.outlines)
    help_text = pytester.runpytest("--help").stdout.str()
    for option in ("--ksm-backend", "--ksm-accel", "--ksm-results"):
        assert option in help_text


MISSING_QEMU = """
import pytest

@pytest.mark.qemu
def test_needs_qemu():
    pass
"""


def test_missing_prerequisite_skips_with_the_exact_reason(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # a real absence: no qemu on this PATH
    monkeypatch.delenv("KSM_HARNESS_REQUIRE", raising=False)
    pytester.makepyfile(MISSING_QEMU)
    result = pytester.runpytest("-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(
        ["*qemu: qemu-system-x86_64 not found (apt-get install qemu-system-x86)*"]
    )


@pytest.mark.parametrize("value", ["all", "qemu", "ssh,qemu"])
def test_require_turns_the_skip_into_a_failure(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, value: str
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("KSM_HARNESS_REQUIRE", value)
    pytester.makepyfile(MISSING_QEMU)
    result = pytester.runpytest()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*KSM_HARNESS_REQUIRE includes qemu but: qemu-system-x86_64*"])


FAILING = """
def test_changes_knobs_then_fails(ksm):
    ksm.write_tunables(pages_to_scan=3333, sleep_millisecs=77)
    assert ksm.read_tunables().pages_to_scan == 4444
"""


def test_failing_test_restores_knobs_and_dumps_sysfs(pytester: pytest.Pytester) -> None:
    names = ("pages_to_scan", "sleep_millisecs", "run")
    # Hold the (re-entrant) lock around the inner run so no other KSM user moves the knobs.
    with ksm_lock():
        before = {n: (KSM_ROOT / n).read_text() for n in names}
        pytester.makepyfile(FAILING)
        results = pytester.path / "out"
        result = pytester.runpytest("--ksm-backend=kernel", f"--ksm-results={results}")
        after = {n: (KSM_ROOT / n).read_text() for n in names}
    result.assert_outcomes(failed=1)
    assert after == before
    dump = (
        results
        / "test_failing_test_restores_knobs_and_dumps_sysfs.py_test_changes_knobs_then_fails"
    )
    result.stdout.fnmatch_lines([f"*failure artefacts in {dump}*"])
    text = (dump / "ksm-sysfs.txt").read_text()
    assert "pages_to_scan                       3333" in text


PASSING = """
def test_passes(ksm):
    ksm.write_tunables(pages_to_scan=3333)
"""


def test_passing_test_leaves_no_artefacts(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(PASSING)
    results = pytester.path / "out"
    result = pytester.runpytest("--ksm-backend=kernel", f"--ksm-results={results}")
    result.assert_outcomes(passed=1)
    assert not results.exists()


XDIST = """
import json, os, time
import pytest

@pytest.mark.parametrize("i", range(4))
def test_hold(ksm, i):
    start = time.monotonic()
    ksm.write_tunables(pages_to_scan=1000 + i)
    time.sleep(0.3)
    assert ksm.read_tunables().pages_to_scan == 1000 + i  # nobody else wrote meanwhile
    with open(os.environ["SPANS"], "a") as f:
        f.write(json.dumps([os.environ["PYTEST_XDIST_WORKER"], start, time.monotonic()]) + "\\n")
"""


def test_xdist_workers_never_drive_ksm_at_once(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    spans_file = pytester.path / "spans.jsonl"
    monkeypatch.setenv("SPANS", str(spans_file))
    pytester.makepyfile(XDIST)
    result = pytester.runpytest_subprocess("-n", "2", "-p", "xdist", "--ksm-backend=kernel")
    result.assert_outcomes(passed=4)
    spans = sorted(json.loads(line) for line in spans_file.read_text().splitlines())
    assert {w for w, _, _ in spans} == {"gw0", "gw1"}
    ordered = sorted(spans, key=lambda s: s[1])
    for a, b in itertools.pairwise(ordered):
        assert a[2] <= b[1], f"{a} overlaps {b}"


MODEL_BACKEND = """
def test_model(ksm, ksm_model):
    assert ksm.source == "model"
    assert ksm.read_counters().pages_sharing == 0
    ksm.write_tunables(pages_to_scan=5)
    assert ksm_model.sysfs.read("pages_to_scan") == "100\\n"  # a separate, fresh kernel
"""


def test_model_backend_option(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(MODEL_BACKEND)
    result = pytester.runpytest("--ksm-backend=model")
    result.assert_outcomes(passed=1)


FLEET_FAILS = """
import pytest

@pytest.mark.fleet
def test_fleet_then_fail(guest_fleet):
    fleet = guest_fleet(count=1, memory_mib=128, mem_merge=False)
    (pid,) = fleet.pids().values()
    with open("qemu.pid", "w") as f:
        f.write(str(pid))
    assert fleet.run("ping").ok
    assert False, "the test fails on purpose"
"""


@pytest.mark.fleet
def test_failing_fleet_test_is_torn_down_and_dumped(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(FLEET_FAILS)
    results = pytester.path / "out"
    result = pytester.runpytest("--ksm-accel=tcg", f"--ksm-results={results}")
    result.assert_outcomes(failed=1)
    pid = int((pytester.path / "qemu.pid").read_text())
    assert not Path(f"/proc/{pid}").exists(), "the guest outlived its test"
    dump = results / "test_failing_fleet_test_is_torn_down_and_dumped.py_test_fleet_then_fail"
    result.stdout.fnmatch_lines([f"*failure artefacts in {dump}*"])
    (guest_dir,) = [p for p in dump.iterdir() if p.is_dir()]
    argv = (guest_dir / "qemu-argv.txt").read_text()
    assert argv.startswith("qemu-system-x86_64 ") and "mem-merge=off" in argv
    assert (guest_dir / "console.log").stat().st_size > 0
    assert (dump / "ksm-sysfs.txt").exists()
