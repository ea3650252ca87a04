"""Forecasts from a capture (harness.twin.timeline, forecast, measure): the model's visits
priced on a calibration, exactly; the recommendation under budgets; forecast against measured.

No host needed: captures are built by hand (two processes of 512 identical pages), the model
is ksm_model at profile 6.11, and the calibration's costs are round numbers.
"""

from __future__ import annotations

import numpy as np
import pytest

from harness.shadow import KEY_SIZE, ProcessCapture, Vma, VmaCapture
from harness.twin.calibration import Calibration
from harness.twin.forecast import default_knob_sets, forecast, run_knobs
from harness.twin.measure import Measured, compare, measure

KEY = b"k" * KEY_SIZE
COSTS = {"first": 1000.0, "unique": 500.0, "unique_depth2": 0.0, "merged": 100.0,
         "joined": 2000.0, "chained": 3000.0, "dup": 0.0, "batch": 10000.0}  # fmt: skip
CAL = Calibration(release="t", hz=250, costs=COSTS, sleep_extra=0.7, sleep0_ns=0.0)
BASE: dict[str, int | str] = {"smart_scan": 0, "max_page_sharing": 256}
SLEEP = (5 + 0.7) * 4e-3  # sleep_millisecs 20 at HZ 250: 5 jiffies and the measured extra


def cap(pid: int, pages: int = 512, key: bytes | None = KEY) -> ProcessCapture:
    """A process of `pages` pages of one content (`key`), or all distinct (key None)."""
    vma = Vma(0x10000000, 0x10000000 + pages * 4096, ("rd", "wr", "mg"))
    contents = [key or b"%d-%d" % (pid, i) for i in range(pages)]
    keys = np.array(contents, dtype=f"S{KEY_SIZE}")
    return ProcessCapture(pid, f"p{pid}", pid, [VmaCapture(vma, keys)])


def test_a_run_priced_on_the_calibration_scan_by_scan() -> None:
    r = run_knobs([cap(1), cap(2)], BASE, {"pages_to_scan": 2048, "sleep_millisecs": 20}, CAL,
                  profile="6.11")  # fmt: skip
    # Scan 1: 1024 first visits. Scan 2: 4 unique (one per 256 mappings), 258 joined (a pair,
    # then a plain stable node up to 256, and the pairs that start each new dup), 762
    # chained, 777 dups examined. Then merged visits only. One batch per scan.
    assert r.terms_by_scan[:3] == [
        [1024, 0, 0, 0, 0, 0, 0, 1],
        [0, 4, 4, 0, 258, 762, 777, 1],
        [0, 0, 0, 1024, 0, 0, 0, 1],
    ]
    cpu1 = 1024 * 1000 + 10000
    cpu2 = 4 * 500 + 258 * 2000 + 762 * 3000 + 10000
    assert r.by_scan() == [
        (0, 0.0, 0.0, 0),
        (1, round(cpu1 / 1e9 + SLEEP, 4), round(cpu1 / 1e9, 5), 0),
        (2, round((cpu1 + cpu2) / 1e9 + 2 * SLEEP, 4), round((cpu1 + cpu2) / 1e9, 5), 1020 * 4096),
        (3, pytest.approx(0.0724), pytest.approx(0.00396), 1020 * 4096),
    ]
    assert r.converged and r.counters["stable_node_dups"] == 4
    reach = r.reach(0.95)
    assert reach is not None and reach.scans == 2 and reach.saved == 1020 * 4096
    steady = 3 * (1024 * 100 + 10000)
    assert r.steady_cpu_seconds == pytest.approx(steady / 1e9)
    assert r.steady_cpu_share == pytest.approx(steady / (steady + 3 * SLEEP * 1e9))


def test_recommendation_is_the_cheapest_within_the_budgets() -> None:
    caps = [cap(1, 2048), cap(2, 2048)]
    sets = [{"pages_to_scan": n, "sleep_millisecs": 20} for n in (64, 512, 4096)]
    f = forecast(caps, sets, CAL, calibrated=True, base=BASE, target=0.95)
    t = {r.name: r.run.reach(0.95).t for r in f.results}  # type: ignore[union-attr]
    assert list(t) == [
        "pages_to_scan=64,sleep_millisecs=20",
        "pages_to_scan=512,sleep_millisecs=20",
        "pages_to_scan=4096,sleep_millisecs=20",
    ]
    assert t["pages_to_scan=64,sleep_millisecs=20"] > t["pages_to_scan=512,sleep_millisecs=20"]
    # Without budgets the slowest knob set is the cheapest: it scans least per second.
    assert f.recommended is not None and f.recommended.name.startswith("pages_to_scan=64,")
    # A time budget rules it out; a CPU budget then rules out the fastest.
    within = (
        t["pages_to_scan=64,sleep_millisecs=20"] + t["pages_to_scan=512,sleep_millisecs=20"]
    ) / 2
    f = forecast(caps, sets, CAL, calibrated=True, base=BASE, within=within, cpu=0.05)
    assert f.recommended is not None and f.recommended.name.startswith("pages_to_scan=512,")
    d = f.as_dict()
    assert d["recommended_knobs"] == {"pages_to_scan": 512, "sleep_millisecs": 20}
    assert d["captured_pages"] == 4096 and d["results"][1]["saved_bytes"] == (4096 - 16) * 4096
    # Nothing meets both: no recommendation, and why for each knob set.
    f = forecast(caps, sets, CAL, calibrated=True, base=BASE, within=0.001)
    assert f.recommended is None
    assert f.why_none.startswith("no knob set meets the budgets (pages_to_scan=64,")


def test_nothing_to_merge_recommends_nothing() -> None:
    caps = [cap(1, 64, None), cap(2, 64, None)]
    f = forecast(caps, [{"pages_to_scan": 100}], CAL, calibrated=False, base=BASE)
    assert f.results[0].run.final.saved == 0 and f.results[0].run.reach(0.95) is None
    assert f.recommended is None and "no savings reached" in f.why_none
    assert f.as_dict()["calibration"] is None


def test_default_knob_sets_keep_the_hosts_sleep() -> None:
    sets = default_knob_sets({"pages_to_scan": 100, "sleep_millisecs": 10})
    assert sets[0] == {}
    assert sets[1:] == [{"pages_to_scan": n, "sleep_millisecs": 10}
                        for n in (250, 500, 1000, 2000, 4000)]  # fmt: skip


def test_measure_until_converged_and_interpolate_the_target() -> None:
    # full_scans, pages_sharing by poll: merges during scan 2, unchanged over scan 3: done.
    script = [(0, 0), (1, 0), (1, 500), (2, 1000), (2, 1000), (3, 1000), (4, 1000)]
    clock = iter(range(100))

    def read() -> tuple[float, float | None, dict[str, int]]:
        scans, sharing = script.pop(0)
        t = float(next(clock))
        return t, t / 10, {"full_scans": scans, "pages_sharing": sharing, "pages_shared": 1}

    m = measure(read, timeout=60, poll=0, sleep=lambda s: None)
    assert m.converged and m.saved == 1000 * 4096 and script == [(4, 1000)]
    # 95% of 1000 pages is reached between the polls at t=2 (500) and t=3 (1000): at 2.9 s.
    t, cpu, scans = m.reach(0.95)  # type: ignore[misc]
    assert (round(t, 6), round(cpu or 0, 6), scans) == (2.9, 0.29, 2)
    assert m.by_scan() == [(0, 0.0, 0.0, 0), (1, 1.0, 0.1, 0), (2, 3.0, 0.3, 4096000),
                           (3, 5.0, 0.5, 4096000)]  # fmt: skip
    c = compare({"saved_bytes": 4096000, "seconds_to_target": 3.19,
                 "cpu_seconds_to_target": 0.2}, m, 0.95)  # fmt: skip
    assert c["error"] == {
        "saved_bytes": 0.0,
        "seconds_to_target": 0.1,
        "cpu_seconds_to_target": -0.3103,
    }


def test_measure_gives_up_at_the_timeout() -> None:
    clock = iter(range(100))

    def read() -> tuple[float, float | None, dict[str, int]]:
        t = float(next(clock))
        return t, None, {"full_scans": int(t), "pages_sharing": int(t) * 10}

    m = measure(read, timeout=5, poll=0, sleep=lambda s: None)
    assert not m.converged and m.samples[-1][0] == 6.0
    assert Measured().reach(0.95) is None
