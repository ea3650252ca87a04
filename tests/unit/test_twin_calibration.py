"""Calibration files, the cost model and the fit (harness.twin.calibration, calibrate.fit)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from harness.errors import HarnessError
from harness.twin import calibration
from harness.twin.calibrate import Observation, fit, host_hz
from harness.twin.calibration import TERMS, Calibration, msecs_to_jiffies, wheel_granule

COSTS = {"first": 1800.0, "unique": 1500.0, "unique_depth2": 40.0, "merged": 500.0,
         "joined": 9000.0, "chained": 5000.0, "dup": 60.0, "batch": 20000.0}  # fmt: skip


def cal(**kw: object) -> Calibration:
    base: dict[str, object] = {"release": "6.18.0-test", "hz": 250, "costs": dict(COSTS),
                               "sleep_extra": 0.7, "sleep0_ns": 50_000.0, "host": "h",
                               "measured": "2026-01-01T00:00:00+0000"}  # fmt: skip
    return Calibration(**{**base, **kw})  # type: ignore[arg-type]


def test_cost_of_terms_and_sleep_model() -> None:
    c = cal()
    # 100 first visits + 10 unique at depth 10 (100 per visit squared) + 1 batch.
    terms = [100, 10, 10 * 100, 0, 0, 0, 0, 1]
    assert c.cost_ns(terms) == 100 * 1800 + 10 * 1500 + 1000 * 40 + 20000
    assert msecs_to_jiffies(20, 250) == 5 and msecs_to_jiffies(1, 250) == 1
    assert msecs_to_jiffies(0, 250) == 0
    assert c.sleep_ns(20) == pytest.approx((5 + 0.7) * 4e6)
    assert c.sleep_ns(0) == 50_000.0
    # 300 ms = 75 jiffies: filed at the wheel's level 1 (granule 8): 3.5 jiffies more.
    assert wheel_granule(62) == 1 and wheel_granule(63) == 8 and wheel_granule(504) == 64
    assert c.sleep_ns(300) == pytest.approx((75 + 0.7 + 3.5) * 4e6)


def test_save_and_load_round_trip_in_a_private_directory(tmp_path: Path) -> None:
    d = tmp_path / "calibration"
    assert calibration.load("6.18.0-test", d) is None
    path = calibration.save(cal(), d)
    assert path == d / "6.18.0-test.json"
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o755
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
    assert calibration.load("6.18.0-test", d) == cal()
    assert json.loads(path.read_text())["format"] == 1
    assert [p.name for p in d.iterdir()] == ["6.18.0-test.json"]  # no temp file left behind


def test_require_says_how_to_measure(tmp_path: Path) -> None:
    with pytest.raises(HarnessError) as exc:
        calibration.require("9.9.9", tmp_path)
    assert exc.value.message == f"no calibration of ksmd for kernel 9.9.9 in {tmp_path}"
    assert "`ksmh calibrate`" in str(exc.value.hint)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("not json", "is not JSON"),
        ("[1, 2]", "is not a calibration"),
        ('{"format": 99}', "is not usable: format 99, expected 1"),
        ('{"format": 1, "release": "x", "hz": 250}', "is not usable: 'costs'"),
    ],
)
def test_unusable_files_are_one_clear_error(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "6.18.0-test.json").write_text(text)
    with pytest.raises(HarnessError) as exc:
        calibration.load("6.18.0-test", tmp_path)
    assert message in exc.value.message
    assert exc.value.hint is not None and "ksmh calibrate" in exc.value.hint


def test_negative_costs_are_refused(tmp_path: Path) -> None:
    data = json.loads(cal().to_json())
    data["costs"]["merged"] = -1.0
    (tmp_path / "6.18.0-test.json").write_text(json.dumps(data))
    with pytest.raises(HarnessError, match="negative or NaN cost"):
        calibration.load("6.18.0-test", tmp_path)


def test_a_group_writable_directory_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "open"
    d.mkdir()
    d.chmod(0o775)
    with pytest.raises(HarnessError, match="is writable by other users"):
        calibration.save(cal(), d)


def test_fit_recovers_the_costs_of_synthetic_observations() -> None:
    # Experiments shaped like the calibration's: each term alone or in the same mixes.
    rows = [
        [32768, 0, 0, 0, 0, 0, 0, 66],
        [0, 32768, 32768 * 225, 0, 0, 0, 0, 66],
        [0, 2048, 2048 * 121, 0, 0, 0, 0, 5],
        [0, 8192, 8192 * 100, 0, 24576, 0, 0, 66],
        [0, 0, 0, 32768, 0, 0, 0, 66],
        [0, 8192, 8192 * 150, 24576, 0, 0, 786432, 66],
        [0, 128, 128, 0, 382, 32258, 56639, 66],
        [0, 32768, 32768 * 225, 0, 0, 0, 0, 9],
        [0, 0, 0, 32768, 0, 0, 0, 9],
    ]
    obs = [
        Observation(f"o{i}", cal().cost_ns(r), [float(x) for x in r]) for i, r in enumerate(rows)
    ]
    costs, err = fit(obs)
    assert err < 1e-9
    assert dict(zip(TERMS, costs, strict=True)) == pytest.approx(COSTS, rel=1e-6)


def test_fit_never_returns_a_negative_cost() -> None:
    # Noise that would make an unconstrained fit give the batch a negative cost.
    # (Unconstrained: 1100 per first visit and -200 per batch.)
    obs = [
        Observation("a", 900.0, [1, 0, 0, 0, 0, 0, 0, 1]),
        Observation("b", 2000.0, [2, 0, 0, 0, 0, 0, 0, 1]),
        Observation("c", 3100.0, [3, 0, 0, 0, 0, 0, 0, 1]),
    ]
    costs, _err = fit(obs)
    assert min(costs) >= 0
    assert costs[TERMS.index("batch")] == 0.0
    assert costs[0] == pytest.approx(1000.0, rel=0.05)


def test_host_hz_reads_the_kernel_config(tmp_path: Path) -> None:
    import gzip

    (tmp_path / "config.gz").write_bytes(gzip.compress(b"CONFIG_KSM=y\nCONFIG_HZ=300\n"))
    assert host_hz(tmp_path) == 300
