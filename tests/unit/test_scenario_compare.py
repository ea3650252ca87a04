"""compare(): first difference, every difference, and a readable report. No kernel, no model."""

from __future__ import annotations

from typing import Any

from harness.ksm.types import COUNTER_NAMES
from harness.record import STAT_FIELDS, Snapshot
from harness.scenario.compare import Difference, compare
from harness.scenario.series import ScanSample, Series, relative
from harness.scenario.spec import Scenario

SCEN = Scenario.from_mapping(
    {
        "name": "cmp",
        "seed": 99,
        "scans": 3,
        "processes": [
            {"name": "p1", "pages": 2, "fill": "a"},
            {"name": "p2", "pages": 2, "fill": "a"},
        ],
        "actions": [{"after": 2, "do": "write", "process": "p2", "page": 0, "content": "b"}],
    }
)


def snap(sharing: int = 0, merging: int = 0, procs: tuple[str, ...] = ("p1", "p2")) -> Snapshot:
    counters: dict[str, int | None] = dict.fromkeys(COUNTER_NAMES, 0)
    counters["pages_sharing"] = sharing
    stats: dict[str, dict[str, Any]] = {}
    for p in procs:
        stats[p] = dict.fromkeys(STAT_FIELDS, 0)
        stats[p].update(ksm_merging_pages=merging, ksm_merge_any=False, ksm_mergeable=True)
    return Snapshot(counters=counters, processes=stats)


def series(source: str, samples: list[ScanSample]) -> Series:
    return Series(source, SCEN, snap(), tuple(samples))


def good() -> list[ScanSample]:
    return [
        ScanSample(1, snap()),
        ScanSample(2, snap(3, 2), snap(3, 2), ("ok",)),
        ScanSample(3, snap(2, 2)),
    ]


def test_identical_series_agree() -> None:
    result = compare(series("kernel", good()), series("model", good()))
    assert result.ok and result.first is None
    assert result.report() == "scenario 'cmp': kernel and model agree at all 3 sampled full scans"


def test_first_difference_and_report() -> None:
    model = good()
    model[1] = ScanSample(2, snap(4, 2), snap(4, 3), ("ok",))
    model[2] = ScanSample(3, snap(1, 2))
    result = compare(series("kernel", good()), series("model", model))
    assert not result.ok
    assert result.first == Difference(2, "end", "pages_sharing", 3, 4)
    assert [str(d) for d in result.differences] == [
        "F=2 end: pages_sharing kernel=3 model=4",
        "F=2 after actions: pages_sharing kernel=3 model=4",
        "F=2 after actions: p1.ksm_merging_pages kernel=2 model=3",
        "F=2 after actions: p2.ksm_merging_pages kernel=2 model=3",
        "F=3 end: pages_sharing kernel=2 model=1",
    ]
    text = result.report()
    assert text.startswith("scenario 'cmp' (seed 99): kernel and model differ; first at F=2 end:")
    assert "seed=99" in text  # the scenario description follows
    assert "after F=2: write p2 pages [0] <- b" in text
    # The end-of-scan table shows kernel/model per F and the actions applied after it.
    assert "  1   0/0" in text
    assert "  2   3/4" in text and "then write p2 pages [0] <- b" in text
    assert "  3   2/1" in text


def test_process_set_outcomes_and_missing_snapshots() -> None:
    model = good()
    model[0] = ScanSample(1, snap(procs=("p1",)))
    model[1] = ScanSample(2, snap(3, 2), None, ("refused EBUSY",))
    result = compare(series("kernel", good()), series("model", model))
    assert [(d.scan, d.phase, d.field) for d in result.differences] == [
        (1, "end", "processes"),
        (2, "outcome", "actions"),
        (2, "after actions", "snapshot"),
    ]
    assert result.differences[0].kernel == ["p1", "p2"]
    assert result.differences[0].model == ["p1"]


def test_missing_samples_are_a_difference() -> None:
    result = compare(series("kernel", good()), series("model", good()[:2]))
    assert result.differences == (Difference(3, "end", "samples", 3, 2),)


def test_none_counter_differs_from_a_value() -> None:
    model = good()
    model[0] = ScanSample(
        1, Snapshot({**snap().counters, "ksm_zero_pages": None}, snap().processes)
    )
    result = compare(series("kernel", good()), series("model", model))
    assert result.first == Difference(1, "end", "ksm_zero_pages", 0, None)


def test_relative_makes_cumulative_counters_deltas() -> None:
    base = {"pages_scanned": 1000, "pages_skipped": 7, "full_scans": 5}
    now = {"pages_scanned": 1300, "pages_skipped": 9, "full_scans": 1, "pages_shared": 2}
    out = relative(now, base)
    assert list(out) == list(COUNTER_NAMES)
    assert out["pages_scanned"] == 300 and out["pages_skipped"] == 2
    # full_scans is never made relative: run=2 resets it and both sides must show that.
    assert out["full_scans"] == 1 and out["pages_shared"] == 2
    assert out["general_profit"] is None
