"""Bad input to `ksmh forecast`, `ksmh calibrate` and `ksmh export --twin`: one line and a hint,
exit status 2, before anything is read, captured or measured."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.cli import main


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    status = main(argv)
    return status, capsys.readouterr().err.splitlines()


@pytest.mark.parametrize(
    ("argv", "first", "hint"),
    [
        (["forecast", "--target", "120%"],
         "ksmh: error: --target '120%': expected a share like 95% or 0.95 (above 0, at most "
         "100%)", None),
        (["forecast", "--within", "soon"],
         "ksmh: error: --within 'soon': expected a duration like 90s, 10m or 1h30m", None),
        (["forecast", "--cpu", "0"],
         "ksmh: error: --cpu '0': expected a share like 95% or 0.95 (above 0, at most 100%)",
         None),
        (["forecast", "--knobs", "run=1"],
         "ksmh: error: 'run=1': run is not a knob to compare", "  hint: leave run out"),
        (["forecast", "--pid", "999999999", "--sysfs-root", "/nonexistent"],
         "ksmh: error: --pid 999999999: no such process", None),
        (["export", "--what-if", "max_page_sharing=16"],
         "ksmh: error: --what-if 'max_page_sharing=16': expected "
         "NAME:KNOB=VALUE[,KNOB=VALUE...]", "  hint: NAME is 1-32 letters, digits, '_', '.', "
         "'-'; e.g. mps16:max_page_sharing=16"),
        (["export", "--what-if", "a:max_page_sharing=16", "--what-if", "a:smart_scan=0"],
         "ksmh: error: --what-if: each NAME once", "  hint: names given: a, a"),
        (["export", "--twin", "--twin-cpu", "200%"],
         "ksmh: error: --twin-cpu '200%': expected a share like 95% or 0.95 (above 0, at most "
         "100%)", None),
        (["export", "--twin", "--listen", "nowhere"],
         "ksmh: error: bad listen address 'nowhere'", "  hint: use HOST:PORT, e.g. "
         "127.0.0.1:9712"),
        (["export", "--twin", "--label", "1:a=b"],  # --sharing's checks hold with --twin
         "ksmh: error: --label and --group-by need --sharing", "  hint: add --sharing"),
        (["calibrate", "--pages", "10"],
         "ksmh: error: --pages 10: too few to measure", "  hint: use 4096 or more"),
    ],
)  # fmt: skip
def test_bad_input(
    argv: list[str], first: str, hint: str | None, capsys: pytest.CaptureFixture[str]
) -> None:
    status, err = run(argv, capsys)
    assert status == 2
    assert err[0] == first
    assert err[1:] == ([hint] if hint else []), err


def test_calibrate_show_without_a_calibration(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("KSM_HARNESS_CALIBRATION_DIR", str(tmp_path))
    status, err = run(["calibrate", "--show"], capsys)
    assert status == 2
    assert err[0].startswith("ksmh: error: no calibration of ksmd for kernel ")
    assert err[0].endswith(f" in {tmp_path}")
    assert err[1] == (
        "  hint: measure one with `ksmh calibrate` (as root, about a minute; KSM must be present)"
    )


def test_calibrate_show_prints_the_stored_costs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from harness.twin import calibration

    monkeypatch.setenv("KSM_HARNESS_CALIBRATION_DIR", str(tmp_path))
    cal = calibration.DEFAULT.__class__(
        **{**calibration.DEFAULT.__dict__, "release": calibration.release(), "measured": "now"}
    )
    calibration.save(cal)
    assert main(["calibrate", "--show"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"ksmd calibration, kernel {calibration.release()} on ")
    assert "first visit (checksum only)" in out[1] and out[1].endswith("2.000 us")
    assert out[-2].startswith("  sleep") and "HZ 250" in out[-2]
