"""`ksmh trend` over synthetic run.json series, and the regression rule itself (pure)."""

from __future__ import annotations

import json
import random
import statistics
from pathlib import Path

import pytest

from harness.cli import main
from harness.report.nightly import summarize
from harness.report.regression import Floors, Rule, baseline, excursions, flag
from harness.report.trend import FAMILY, build_trend, floors_of, metrics_of
from harness.units import human_bytes
from tests.unit.synthetic_runs import night, write

MiB = 2**20
RULE = Rule(window=10, min_nights=5, k=4.0)


# -- the rule ---------------------------------------------------------------------------------


def test_baseline_is_median_and_scaled_mad_with_floors() -> None:
    b = baseline([10, 11, 9, 10, 30], RULE, Floors())
    assert b is not None
    assert (b.median, b.mad) == (10, 1)  # the wild 30 moves neither
    assert b.threshold == pytest.approx(4 * 1.4826)
    assert baseline([10] * 5, RULE, Floors(rel=0.1)).threshold == 1.0  # type: ignore[union-attr]
    assert baseline([10] * 5, RULE, Floors(rel=0.1, abs=3)).threshold == 3  # type: ignore[union-attr]
    assert baseline([10] * 4, RULE, Floors()) is None  # fewer than min_nights


def test_a_stable_series_has_no_excursion() -> None:
    assert excursions([100.0] * 15, RULE) == []
    assert flag([100.0] * 15, RULE) is None


def test_a_step_is_flagged_from_the_night_it_started() -> None:
    series: list[float | None] = [100, 101, 99, 100, 102, 98, 100, 101, 80, 81, 79]
    for last in range(8, 11):  # judged on nights 8, 9, 10: always "since night 8"
        e = flag(series[: last + 1], RULE)
        assert e is not None and (e.start, e.end, e.direction) == (8, last, -1)
        assert e.baseline.median == 100
    # Nothing before the step was ever outside.
    assert [x.kind for x in excursions(series, RULE)] == ["open"]


def test_nothing_is_judged_before_min_nights() -> None:
    assert flag([100, 100, 100, 100, 10], RULE) is None  # 4 nights before it
    assert flag([100, 100, 100, 100, 100, 10], RULE) is not None  # 5


def test_a_transient_ends_and_is_not_flagged() -> None:
    series: list[float | None] = [100] * 6 + [150] + [100] * 3
    (e,) = excursions(series, RULE)
    assert (e.start, e.end, e.kind) == (6, 6, "transient")
    assert flag(series, RULE) is None


def test_a_level_held_for_a_whole_window_becomes_the_baseline() -> None:
    series: list[float | None] = [100.0] * 6 + [150.0] * 10
    assert flag(series, RULE) is not None  # flagged for `window` nights ...
    series.append(150.0)
    assert flag(series, RULE) is None  # ... then accepted
    (e,) = excursions(series, RULE)
    assert (e.start, e.end, e.kind) == (6, 15, "level change")


def test_the_step_must_stay_on_one_side() -> None:
    series: list[float | None] = [100] * 6 + [150, 50]
    found = excursions(series, RULE)
    assert [(e.start, e.kind, e.direction) for e in found] == [(6, "transient", 1), (7, "open", -1)]


def test_nights_without_the_metric_are_skipped_and_a_missing_latest_is_not_flagged() -> None:
    series: list[float | None] = [100, None, 100, 100, None, 100, 100, 60]
    e = flag(series, RULE)
    assert e is not None and e.start == 7 and e.baseline.nights == 5
    assert flag([*series, None], RULE) is None


def test_floors_hide_changes_below_the_noise_of_the_machine() -> None:
    quiet: list[float | None] = [100.0] * 8
    assert flag([*quiet, 101.0], RULE) is not None  # MAD 0: any change is outside
    assert flag([*quiet, 101.0], RULE, Floors(rel=0.02)) is None
    assert flag([*quiet, 103.0], RULE, Floors(rel=0.02)) is not None


def test_rule_rejects_impossible_settings() -> None:
    with pytest.raises(ValueError):
        Rule(window=3, min_nights=5)
    with pytest.raises(ValueError):
        Rule(min_nights=1)


# -- trend over synthetic nights ------------------------------------------------------------

SWEEP = {500: (20.0, 3.0), 2000: (6.0, 2.5)}


def _stable(root: Path, n: int = 12) -> None:
    for i in range(n):
        write(root, night(i, host="alpha", sweep=SWEEP))


def _step(root: Path) -> tuple[list[str], list[int], list[float]]:
    """bravo: saved drops 20% from night 9 (with a new harness revision that night); the
    sweep's 500-page point takes 5x as long from night 10. Slight noise throughout."""
    rng = random.Random(7)
    ids, saved_values, slow_values = [], [], []
    for i in range(12):
        saved = int((400 if i < 9 else 320) * MiB * (1 + rng.uniform(-0.003, 0.003)))
        slow = round((100.0 if i >= 10 else 20.0) * (1 + rng.uniform(-0.1, 0.1)), 3)
        sweep = {500: (slow, 3.0), 2000: (6.0, 2.5)}
        revision = "a" * 40 if i < 9 else "b" * 40
        run = night(i, host="bravo", saved=saved, sweep=sweep, revision=revision)
        write(root, run)
        ids.append(run["run_id"])
        saved_values.append(saved)
        slow_values.append(slow)
    return ids, saved_values, slow_values


def _noisy(root: Path) -> list[float]:
    """charlie: every figure noisy (saved +-5%, sweep and boot times +-25%), but no step."""
    rng = random.Random(3)
    saved_values = []
    for i in range(20):
        saved = int(400 * MiB * (1 + rng.gauss(0, 0.05)))
        saved_values.append(saved)
        sweep = {
            500: (20 * (1 + rng.gauss(0, 0.25)), 3 * (1 + rng.gauss(0, 0.25))),
            2000: (6 * (1 + rng.gauss(0, 0.25)), 2.5),
        }
        boot = 5 * (1 + rng.gauss(0, 0.25))
        # The kernel's split of unmerged pages, as measured over four quickstart runs.
        unshared = rng.choice([3809, 3836, 6371, 6699])
        run = night(i, host="charlie", saved=saved, sweep=sweep, boot=boot,
                    shared_delta=rng.randint(-9, 9), unshared=unshared)  # fmt: skip
        write(root, run)
    return saved_values


def test_trend_flags_the_step_at_the_right_night_and_not_the_noise(tmp_path: Path) -> None:
    root = tmp_path / "results"
    _stable(root)
    ids, _, _ = _step(root)
    saved = _noisy(root)
    trend = build_trend([root], rule=RULE)
    assert [(g.host, len(g.nights)) for g in trend.groups] == [
        ("alpha", 12),
        ("bravo", 12),
        ("charlie", 20),
    ]
    flags = {g.host: {m.name: g.nights[m.flagged.start].run_id for m in g.flags if m.flagged}
             for g in trend.groups}  # fmt: skip
    assert flags == {
        "alpha": {},
        "bravo": {
            "saved_bytes[kernel]": ids[9],
            "converge_seconds[fill: pages_to_scan=500]": ids[10],
        },
        "charlie": {},
    }
    # The noise is well beyond the 2% floor: the MAD is what keeps charlie quiet.
    med = sorted(saved)[10]
    assert max(abs(s - med) / med for s in saved) > 0.08
    # Every metric family is there for every series.
    alpha = trend.groups[0]
    assert [m.name for m in alpha.metrics] == [
        "saved_bytes[kernel]",
        "converge_seconds[fill: pages_to_scan=500]",
        "converge_seconds[fill: pages_to_scan=2000]",
        "converge_seconds[fill: wait line 14]",
        "ksmd_cpu_seconds[fill: pages_to_scan=500]",
        "ksmd_cpu_seconds[fill: pages_to_scan=2000]",
        "boot_seconds[median guest]",
        "kernel_minus_model[fill: ksm_zero_pages]",
        "kernel_minus_model[fill: pages_shared]",
        "kernel_minus_model[fill: pages_sharing]",
        "kernel_minus_model[fill: pages_unshared+pages_volatile]",
        "kernel_minus_model[fill: stable_node_chains]",
        "kernel_minus_model[fill: stable_node_dups]",
        "expectation_pass_rate",
    ]


def test_cli_writes_trend_files_and_exits_1_on_a_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "results"
    _stable(root)
    ids, saved, slow = _step(root)
    out = tmp_path / "trend"
    assert main(["trend", str(root), "--out", str(out)]) == 1
    lines = capsys.readouterr().out.splitlines()
    # Baselines: the nights before the step started (9 before night 9, 10 before night 10).
    saved_base = human_bytes(int(statistics.median(saved[:9])))
    slow_base = statistics.median(slow[:10])
    assert lines == [
        f"FLAGGED nightly/bravo/6.18.44: saved_bytes[kernel] since {ids[9]} (3 nights): "
        f"{saved_base} -> {human_bytes(saved[11])} (worse)",
        f"FLAGGED nightly/bravo/6.18.44: converge_seconds[fill: pages_to_scan=500] since "
        f"{ids[10]} (2 nights): {slow_base:.2f} s -> {slow[11]:.2f} s (worse)",
        f"trend: {out}/trend.md (24 runs, 2 series, 2 flagged)",
    ]
    doc = json.loads((out / "trend.json").read_text())
    assert doc["flagged"] == 2 and doc["runs_read"] == 24
    bravo = doc["groups"][1]
    (saved_flag, sweep_flag) = bravo["flags"]
    assert saved_flag["since"] == ids[9] and saved_flag["nights"] == 3
    assert saved_flag["direction"] == "worse"
    assert saved_flag["changed_at_start"] == {"harness_revision": ["a" * 40, "b" * 40]}
    assert saved_flag["change_ratio"] == pytest.approx(-0.2, abs=0.01)
    assert sweep_flag["since"] == ids[10] and sweep_flag["changed_at_start"] == {}
    assert sweep_flag["latest"] > 50
    md = (out / "trend.md").read_text()
    assert "## Flagged: 2" in md and f"| `saved_bytes[kernel]` | {ids[9]} | 3 |" in md
    for name in ("saved_bytes", "converge_seconds", "ksmd_cpu_seconds", "boot_seconds",
                 "kernel_minus_model", "expectation_pass_rate"):  # fmt: skip
        data = (out / f"{name}.png").read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
        assert f"]({name}.png)" in md
    # Only the stable series: nothing flagged, exit 0.
    assert main(["trend", str(root / "alpha"), "--out", str(out)]) == 0
    assert "Nothing flagged" in (out / "trend.md").read_text()


def test_groups_by_kernel_and_backend_filters_by_playbook_and_skips_bad_files(
    tmp_path: Path,
) -> None:
    root = tmp_path / "r"
    for i in range(3):
        write(root, night(i, kernel="6.18.44"))
        write(root, night(10 + i, kernel="6.19.1"))
        write(root, night(20 + i, backend="model"))
        write(root, night(30 + i, playbook="quickstart"))
    (root / "bad").mkdir()
    (root / "bad" / "run.json").write_text("{not json")
    (root / "other").mkdir()
    (root / "other" / "run.json").write_text('{"something": "else"}')
    trend = build_trend([root], playbook="nightly", rule=RULE)
    assert [(g.kernel_release, g.backend, len(g.nights)) for g in trend.groups] == [
        ("6.18.44", "kernel", 3),
        ("6.18.44", "model", 3),
        ("6.19.1", "kernel", 3),
    ]
    assert sorted(Path(f).parent.name for f, _ in trend.skipped) == ["bad", "other"]
    assert dict((Path(f).parent.name, w) for f, w in trend.skipped)["other"] == (
        "not a run.json of `ksmh run`"
    )
    # A model-only night's saved bytes are the model's.
    model_group = trend.groups[1]
    assert model_group.metrics[0].name == "saved_bytes[model]"


def test_an_errored_night_is_listed_without_figures(tmp_path: Path) -> None:
    ok = summarize(night(0, sweep=SWEEP))
    bad = summarize(night(1, status="error"))
    assert metrics_of(bad) == {}
    m = metrics_of(ok)
    assert m[("expectation_pass_rate", "")] == 1.0
    # The kernel's unshared/volatile split is not judged, their sum is (kernel - model).
    assert ("kernel_minus_model", "fill: pages_unshared") not in m
    assert m[("kernel_minus_model", "fill: pages_unshared+pages_volatile")] == 9
    assert summarize(night(0, unshared=100)).kernel_minus_model[("fill", "pages_unshared")] == 100
    assert m[("kernel_minus_model", "fill: pages_shared")] == -2
    assert m[("boot_seconds", "median guest")] == 5.5
    half = summarize(night(2, expectations=("passed", "failed", "skipped")))
    assert half.pass_rate == 0.5 and half.status == "failed"


def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["trend", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err.splitlines()[0] == (
        f"ksmh: error: {tmp_path / 'nowhere'}: no such directory"
    )
    (tmp_path / "empty").mkdir()
    assert main(["trend", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"ksmh: error: no run.json under {tmp_path / 'empty'}"
    assert err[1].startswith("  hint: pass the results directories")
    assert not (tmp_path / "o").exists()
    assert main(["trend", str(tmp_path), "--window", "3", "--min-nights", "4"]) == 2
    assert "--min-nights 4 is larger than --window 3" in capsys.readouterr().err


def test_floor_option_replaces_a_family_floor(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "results"
    ids, _, _ = _step(root)
    out = tmp_path / "t"
    # A 20% drop in savings is below a 50% floor: only the sweep's step is left.
    assert main(["trend", str(root), "--out", str(out), "--floor", "saved_bytes=0.5"]) == 1
    printed = capsys.readouterr().out
    assert "saved_bytes" not in printed and f"since {ids[10]}" in printed
    doc = json.loads((out / "trend.json").read_text())
    assert doc["rule"]["floors"]["saved_bytes"] == {"rel": 0.5, "abs": 4 * MiB}
    assert "| saved_bytes | 0.5 x median | 4.0 MiB |" in (out / "trend.md").read_text()
    for bad in ("saved=0.5", "saved_bytes=x", "saved_bytes=-1", "saved_bytes=0.1:-3"):
        assert main(["trend", str(root), "--out", str(out), "--floor", bad]) == 2
        err = capsys.readouterr().err.splitlines()
        assert (
            err[0] == f"ksmh: error: --floor {bad!r}: expected FAMILY=REL[:ABS] with numbers >= 0"
        )
        assert err[1].startswith("  hint: families: saved_bytes, converge_seconds")


def test_kernel_minus_model_floors_grow_with_the_counter() -> None:
    """A kernel - model difference moving by less than 1% of the counter is noise (three
    back-to-back quickstart runs: pages_sharing +122, +122, -9 of ~90,900); more is a flag.
    Without THP the unmerged sum has its own floor (rel 0.5, at least 4096 pages)."""
    fam = FAMILY["kernel_minus_model"]
    nights = [summarize(night(i, saved=90_900 * 4096)) for i in range(3)]
    sharing = floors_of(fam, "fill: pages_sharing", nights)
    assert isinstance(sharing, Floors)
    assert (sharing.rel, sharing.abs) == (0.5, 909.0)  # 1% of the kernel's 90,900
    assert floors_of(fam, "fill: pages_sharing") == fam.floors  # no nights: the family's
    rule = Rule(window=2, min_nights=2)
    assert flag([122.0, 122.0, -9.0], rule, sharing) is None
    assert flag([122.0, 122.0, -1000.0], rule, sharing) is not None
    unmerged = floors_of(fam, "fill: pages_unshared+pages_volatile", nights)
    assert unmerged == Floors(rel=0.5, abs=4096)  # 1% of 33,236 is below 4096
    assert flag([-950.0, -972.0, 14.0], rule, unmerged) is None
    assert flag([-950.0, -972.0, 14.0], rule, fam.floors) is not None


def test_with_thp_guests_the_unmerged_sum_is_judged_with_its_floors(tmp_path: Path) -> None:
    """THP quickstart runs once guests registered in index order (issue 12): +15, -464, -460
    pages: within the unmerged floors. The bimodal runs from before that fix (-22,079, then
    +22,146) are a flag; pages_sharing moving by 5,000 is one too."""
    root = tmp_path / "r"
    for i, (un, sh) in enumerate([(15, -9), (-464, -9), (-460, -9), (-22_079, 5000)]):
        write(root, night(i, thp=True, unmerged_delta=un, sharing_delta=sh))
    rule = Rule(window=3, min_nights=2)
    three = build_trend([root], rule=rule)
    by_name = {m.name: m for m in three.groups[0].metrics}
    unmerged = by_name["kernel_minus_model[fill: pages_unshared+pages_volatile]"]
    assert unmerged.values == [15.0, -464.0, -460.0, -22_079.0]
    assert unmerged.floors == Floors(rel=0.5, abs=4096)
    assert sorted(m.name for m in three.groups[0].flags) == [
        "kernel_minus_model[fill: pages_sharing]",
        "kernel_minus_model[fill: pages_unshared+pages_volatile]",
    ]
    assert flag(unmerged.values[:3], rule, unmerged.floors) is None
