"""Differential tests: the same scenario in real processes and in ksm_model, counter for counter.

Every test runs a scenario on the real kernel (worker processes, LTP-style frozen reads after
each full scan), checks a few absolute values from shared/ksm-model-spec.md on the kernel
series, so the kernel side is itself verified, and then requires the model's series to be
identical at every sample: every sysfs counter (pages_scanned and pages_skipped as deltas from
the start) and every live process's ksm_stat, plus the state right after each scan's actions.

KSM_DIFF_SEEDS (default 500) sets how many random scenarios there are; KSM_DIFF_SEED_START
(default 0) the first seed. The first CI_SEEDS (200) run in `make test`; the rest are marked
`long` (`make test-long`, nightly). A failure prints the seed, the scenario and the first
differing counter.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from harness.ksm.sysfs import SysfsBackend
from harness.pytest_plugin import add_failure_artefact
from harness.record import Snapshot
from harness.scenario.compare import compare
from harness.scenario.errors import ForeignKsmActivity, SamplingError
from harness.scenario.generate import generate
from harness.scenario.kernel_runner import KernelRunner
from harness.scenario.model_runner import ModelRunner
from harness.scenario.series import Series
from harness.scenario.spec import Scenario
from harness.scenario.workers import WorkerPool, process_alive

pytestmark = pytest.mark.ksm_kernel

SEEDS = int(os.environ.get("KSM_DIFF_SEEDS", "500"))
SEED_START = int(os.environ.get("KSM_DIFF_SEED_START", "0"))
CI_SEEDS = 200  # ~0.3 s each here; the long tail runs nightly
PAGE = 4096
RMAP = 64  # sizeof(struct ksm_rmap_item) on 64-bit


@pytest.fixture
def kernel(ksm: Any) -> SysfsBackend:
    """The real kernel's KSM (the `ksm` fixture holds the host lock and restores the knobs)."""
    if not isinstance(ksm, SysfsBackend):
        pytest.skip("differential tests need the real kernel backend, not --ksm-backend model")
    return ksm


class Differential:
    """run(scenario) -> kernel series; check(series) -> the model must give the same series.

    Tests assert the kernel's absolute values between the two calls, so a wrong spec value
    and a model mismatch fail differently. Both series are saved as failure artefacts.
    """

    def __init__(self, kernel: SysfsBackend) -> None:
        self.kernel = kernel
        self.series: list[Series] = []

    def __call__(self, scenario: Scenario) -> Series:
        series = KernelRunner(self.kernel).run(scenario)
        self.series.append(series)
        return series

    def check(self, kernel_series: Series) -> None:
        # The model of this host's kernel: its profile (6.12+ here), CONFIG_HZ and THP mode.
        model_series = ModelRunner.for_host().run(kernel_series.scenario)
        self.series.append(model_series)
        result = compare(kernel_series, model_series)
        if not result.ok:
            pytest.fail(result.report(), pytrace=False)

    def dump(self, where: Path) -> None:
        for i, series in enumerate(self.series):
            path = where / f"series-{i}-{series.scenario.name}-{series.source}.json"
            path.write_text(json.dumps(series.as_dict(), indent=1))


@pytest.fixture
def differential(kernel: SysfsBackend, request: pytest.FixtureRequest) -> Differential:
    diff = Differential(kernel)
    add_failure_artefact(request, diff.dump)
    return diff


def counters(snap: Snapshot, **expected: int) -> None:
    wrong = {k: (snap.counters[k], v) for k, v in expected.items() if snap.counters[k] != v}
    assert not wrong, f"kernel counters differ from the spec (got, expected): {wrong}"


def stat(snap: Snapshot, process: str, **expected: object) -> None:
    got = snap.processes[process]
    field = {k: k if k == "anon_huge_kb" else f"ksm_{k}" for k in expected}
    wrong = {k: (got[field[k]], v) for k, v in expected.items() if got[field[k]] != v}
    assert not wrong, f"{process} ksm_stat differs from the spec (got, expected): {wrong}"


def procs(n: int, pages: int, fill: str) -> list[dict[str, Any]]:
    return [{"name": f"p{i + 1}", "pages": pages, "fill": fill} for i in range(n)]


def scenario(name: str, scans: int, processes: list[dict[str, Any]], **more: Any) -> Scenario:
    return Scenario.from_mapping({"name": name, "scans": scans, "processes": processes, **more})


# -- spec section 15, worked examples ------------------------------------------------------


def test_example_1_three_processes_of_identical_pages(differential: Differential) -> None:
    ks = differential(scenario("example-1", 3, procs(3, 100, "a")))
    counters(
        ks.at(1).end, pages_shared=0, pages_sharing=0, pages_unshared=0, pages_volatile=300,
        pages_scanned=300, general_profit=-19200,
    )  # fmt: skip
    f2 = ks.at(2).end
    counters(
        f2, pages_shared=2, pages_sharing=298, pages_unshared=0, pages_volatile=0,
        stable_node_chains=1, stable_node_dups=2, pages_scanned=600, pages_skipped=0,
        general_profit=1201408,
    )  # fmt: skip
    for p in ("p1", "p2", "p3"):
        stat(f2, p, rmap_items=100, zero_pages=0, merging_pages=100, process_profit=403200)
    counters(ks.at(3).end, pages_shared=2, pages_sharing=298, pages_scanned=900)
    differential.check(ks)


def test_example_1_variant_n50(differential: Differential) -> None:
    ks = differential(scenario("example-1-n50", 3, procs(3, 50, "a")))
    f2 = ks.at(2).end
    counters(
        f2, pages_shared=1, pages_sharing=149, stable_node_chains=0, stable_node_dups=0,
        general_profit=600704,
    )  # fmt: skip
    for p in ("p1", "p2", "p3"):
        stat(f2, p, merging_pages=50, process_profit=201600)
    differential.check(ks)


def test_example_2_groups_of_three(differential: Differential) -> None:
    n = 40
    each = [{"name": f"p{i}", "contents": [f"u:{j}" for j in range(n)]} for i in (1, 2, 3)]
    ks = differential(scenario("example-2", 3, each))
    counters(
        ks.at(2).end, pages_shared=n, pages_sharing=2 * n, pages_unshared=0, pages_volatile=0,
        stable_node_chains=0, stable_node_dups=0, general_profit=2 * n * PAGE - 3 * n * RMAP,
    )  # fmt: skip
    stat(ks.at(2).end, "p2", merging_pages=n, rmap_items=n)
    differential.check(ks)


def test_example_3_max_page_sharing_2(differential: Differential) -> None:
    tun = {"max_page_sharing": 2}
    ks = differential(scenario("example-3", 3, procs(3, 4, "a"), tunables=tun))
    counters(
        ks.at(2).end, pages_shared=6, pages_sharing=6, pages_unshared=0, pages_volatile=0,
        stable_node_chains=1, stable_node_dups=6,
    )  # fmt: skip
    differential.check(ks)


def test_example_3_leftover_cycles_through_smart_scan(differential: Differential) -> None:
    tun = {"max_page_sharing": 2}
    ks = differential(scenario("example-3-k9", 25, procs(3, 3, "a"), tunables=tun))
    counters(
        ks.at(2).end, pages_shared=4, pages_sharing=4, stable_node_chains=1, stable_node_dups=4
    )
    unshared_at = {2, 3, 4, 6, 9, 14, 23}
    for f in range(2, 26):
        want = 1 if f in unshared_at else 0
        counters(ks.at(f).end, pages_unshared=want, pages_volatile=1 - want, pages_shared=4)
    differential.check(ks)


def visits(n: int) -> list[bool]:
    """Smart scan for a never-merging page, spec section 4: True = scanned, False = skipped."""
    age, remaining, out = 0, 0, []
    for _ in range(n):
        seen, age = age, min(age + 1, 255)
        if seen < 3:
            out.append(True)
        elif remaining == 0:
            remaining = 1 if seen <= 3 else 2 if seen <= 5 else 4 if seen <= 8 else 8
            out.append(True)
        else:
            remaining -= 1
            out.append(False)
    return out


def test_visit_pattern_matches_the_spec_table() -> None:
    assert [v for v, scanned in enumerate(visits(41)) if scanned] == [
        0, 1, 2, 3, 5, 8, 13, 22, 31, 40,
    ]  # fmt: skip


@pytest.mark.parametrize("smart", [1, 0])
def test_example_4_unique_pages_over_25_scans(differential: Differential, smart: int) -> None:
    n = 64
    one = [{"name": "p1", "contents": [f"u:{j}" for j in range(n)]}]
    ks = differential(scenario(f"example-4-smart{smart}", 25, one, tunables={"smart_scan": smart}))
    pattern = visits(25) if smart else [True] * 25
    for f in range(1, 26):
        scanned = sum(pattern[:f])
        inserted = f >= 2 and pattern[f - 1]
        counters(
            ks.at(f).end, pages_unshared=n if inserted else 0, pages_volatile=0 if inserted else n,
            pages_scanned=scanned * n, pages_skipped=(f - scanned) * n, general_profit=-n * RMAP,
        )  # fmt: skip
    if smart:  # a few rows copied from the spec's table as written
        counters(ks.at(5).end, pages_unshared=0, pages_scanned=4 * n, pages_skipped=n)
        counters(ks.at(14).end, pages_unshared=n, pages_scanned=7 * n, pages_skipped=7 * n)
        counters(ks.at(23).end, pages_unshared=n, pages_scanned=8 * n, pages_skipped=15 * n)
    differential.check(ks)


def test_example_5_use_zero_pages(differential: Differential) -> None:
    n, k = 32, 5
    write = {"after": 3, "do": "write", "process": "p1", "pages": list(range(k)), "content": "b"}
    ks = differential(
        scenario(
            "example-5-zero1", 5, procs(1, n, "zero"), tunables={"use_zero_pages": 1},
            actions=[write],
        )
    )  # fmt: skip
    counters(ks.at(1).end, pages_volatile=n, ksm_zero_pages=0)
    f2 = ks.at(2).end
    counters(
        f2, ksm_zero_pages=n, pages_shared=0, pages_sharing=0, pages_volatile=n,
        general_profit=n * PAGE - n * RMAP,
    )  # fmt: skip
    stat(f2, "p1", rmap_items=n, zero_pages=n, merging_pages=0, process_profit=n * PAGE - n * RMAP)
    f3 = ks.at(3).end
    counters(f3, pages_volatile=0, general_profit=n * PAGE, pages_scanned=2 * n)
    stat(f3, "p1", rmap_items=0, process_profit=n * PAGE)
    after = ks.at(3).after_actions
    assert after is not None
    counters(after, ksm_zero_pages=n - k)  # a write to a zero-page PTE counts down at once
    differential.check(ks)


def test_example_5_without_zero_pages(differential: Differential) -> None:
    n = 32
    ks = differential(scenario("example-5-zero0", 3, procs(1, n, "zero")))
    counters(ks.at(2).end, pages_shared=1, pages_sharing=n - 1, ksm_zero_pages=0)
    differential.check(ks)


def test_example_6_cow_after_merge(differential: Differential) -> None:
    acts = [
        {"after": 2, "do": "write", "process": "p2", "page": 0, "content": "b"},
        {"after": 5, "do": "write", "process": "p1", "page": 0, "content": "c"},
    ]
    ks = differential(scenario("example-6", 7, procs(2, 1, "a"), actions=acts))
    counters(ks.at(2).end, pages_shared=1, pages_sharing=1)
    after = ks.at(2).after_actions
    assert after is not None
    counters(after, pages_shared=1, pages_sharing=1)  # COW does not touch the counters
    counters(ks.at(3).end, pages_shared=1, pages_sharing=0, pages_unshared=0, pages_volatile=1)
    counters(ks.at(4).end, pages_shared=1, pages_sharing=0, pages_unshared=1)
    counters(ks.at(6).end, pages_shared=0, pages_sharing=0)  # P1 wrote too: node went stale
    differential.check(ks)


def test_example_7_run2_then_run1(differential: Differential) -> None:
    ks = differential(
        scenario("example-7", 4, procs(3, 100, "a"), actions=[{"after": 2, "do": "rerun"}])
    )
    after = ks.at(2).after_actions
    assert after is not None
    counters(
        after, pages_shared=0, pages_sharing=0, pages_unshared=0, pages_volatile=0,
        stable_node_chains=0, stable_node_dups=0, full_scans=0, ksm_zero_pages=0,
        general_profit=0, pages_scanned=600,
    )  # fmt: skip
    stat(after, "p2", rmap_items=0, merging_pages=0, process_profit=0, mergeable=True)
    counters(ks.at(3).end, full_scans=1, pages_volatile=300)
    counters(
        ks.at(4).end, full_scans=2, pages_shared=2, pages_sharing=298, stable_node_chains=1,
        stable_node_dups=2, general_profit=1201408,
    )  # fmt: skip
    differential.check(ks)


def test_example_8_madv_unmergeable(differential: Differential) -> None:
    n = 20
    each = [{"name": f"p{i}", "contents": [f"u:{j}" for j in range(n)]} for i in (1, 2, 3)]
    act = [{"after": 2, "do": "unmergeable", "process": "p2"}]
    ks = differential(scenario("example-8", 3, each, actions=act))
    after = ks.at(2).after_actions
    assert after is not None
    counters(after, pages_shared=n, pages_sharing=2 * n)  # counters wait for ksmd
    stat(after, "p2", mergeable=False)
    counters(ks.at(3).end, pages_shared=n, pages_sharing=n, pages_unshared=0)
    stat(ks.at(3).end, "p2", rmap_items=0, merging_pages=0, process_profit=0, mergeable=False)
    differential.check(ks)


@pytest.mark.parametrize("n", [100, 200])
def test_example_9_fork_after_merge(differential: Differential, n: int) -> None:
    act = [{"after": 2, "do": "fork", "process": "p1", "child": "c1"}]
    ks = differential(scenario(f"example-9-n{n}", 4, procs(1, n, "a"), actions=act))
    counters(ks.at(2).end, pages_shared=1, pages_sharing=n - 1)
    after = ks.at(2).after_actions
    assert after is not None
    stat(after, "c1", rmap_items=0, merging_pages=0, mergeable=True)
    # The child's pages are appended with the bypass, past max_page_sharing for n=200.
    counters(ks.at(3).end, pages_shared=1, pages_sharing=2 * n - 1)
    stat(ks.at(3).end, "c1", rmap_items=n, merging_pages=n)
    differential.check(ks)


def test_example_10_process_exit(differential: Differential) -> None:
    act = [{"after": 2, "do": "exit", "process": "p3"}]
    ks = differential(scenario("example-10", 4, procs(3, 100, "a"), actions=act))
    after = ks.at(2).after_actions
    assert after is not None
    assert list(after.processes) == ["p1", "p2"]
    counters(after, pages_shared=2, pages_sharing=298)  # freed only when ksmd gets there
    f3 = ks.at(3).end
    counters(f3, pages_shared=1, pages_sharing=199, pages_unshared=0, pages_volatile=0)
    # Lazy chain bookkeeping: N2 went stale and was removed, the chain did not collapse.
    counters(f3, stable_node_chains=1, stable_node_dups=1)
    differential.check(ks)


def test_fork_copies_ksm_zero_pages(differential: Differential) -> None:
    # Spec section 18 left this open; measured on 6.18: the child's copies of KSM zero-page
    # PTEs are counted at fork (global and child), and counted down again when it exits.
    n = 8
    acts = [
        {"after": 2, "do": "fork", "process": "p1", "child": "c1"},
        {"after": 3, "do": "write", "process": "c1", "pages": [0, 1], "content": "b"},
        {"after": 4, "do": "exit", "process": "c1"},
    ]
    one = [{"name": "p1", "contents": [f"zero*{n}", "a*4"]}]
    ks = differential(scenario("zero-fork", 5, one, tunables={"use_zero_pages": 1}, actions=acts))
    counters(ks.at(2).end, ksm_zero_pages=n)
    forked = ks.at(2).after_actions
    assert forked is not None
    counters(forked, ksm_zero_pages=2 * n)
    stat(forked, "c1", zero_pages=n, rmap_items=0)
    written = ks.at(3).after_actions
    assert written is not None
    counters(written, ksm_zero_pages=2 * n - 2)  # c1's COW of two zero PTEs
    exited = ks.at(4).after_actions
    assert exited is not None
    counters(exited, ksm_zero_pages=n)  # c1's remaining zero PTEs zapped at exit
    differential.check(ks)


def test_example_11_late_joiner_needs_two_visits(differential: Differential) -> None:
    acts = [{"after": 2, "do": "spawn", "process": "p3", "pages": 1, "fill": "a"}]
    ks = differential(scenario("example-11", 4, procs(2, 1, "a"), actions=acts))
    counters(ks.at(2).end, pages_shared=1, pages_sharing=1)
    # 6.11+: the checksum comes before the stable search, so P3 waits one scan.
    counters(ks.at(3).end, pages_shared=1, pages_sharing=1, pages_volatile=1)
    counters(ks.at(4).end, pages_shared=1, pages_sharing=2, pages_volatile=0)
    differential.check(ks)


def test_partial_unmergeable_then_mergeable_again(differential: Differential) -> None:
    acts = [
        {"after": 2, "do": "unmergeable", "process": "p2", "start": 0, "count": 5},
        {"after": 3, "do": "mergeable", "process": "p2", "start": 0, "count": 5},
    ]
    ks = differential(scenario("partial-unmerge", 6, procs(2, 10, "a"), actions=acts))
    counters(ks.at(2).end, pages_shared=1, pages_sharing=19)
    # The 5 unmerged pages' rmap_items go when ksmd passes them (section 3), not at madvise.
    counters(ks.at(3).end, pages_shared=1, pages_sharing=14, pages_volatile=0)
    stat(ks.at(3).end, "p2", rmap_items=5, merging_pages=5, mergeable=True)
    counters(ks.at(4).end, pages_sharing=14, pages_volatile=5)  # fresh items: first visit
    counters(ks.at(5).end, pages_sharing=19, pages_volatile=0)
    differential.check(ks)


def test_unmergeable_and_mergeable_in_one_pause(differential: Differential) -> None:
    acts = [
        {"after": 2, "do": "unmergeable", "process": "p2"},
        {"after": 2, "do": "mergeable", "process": "p2"},
        {"after": 3, "do": "unmergeable", "process": "p1"},
        {"after": 4, "do": "mergeable", "process": "p1"},
    ]
    ks = differential(scenario("unmerge-remerge", 6, procs(2, 4, "a"), actions=acts))
    # p2's private copies keep the old checksum, so they re-merge on the same visit (12.3).
    counters(ks.at(3).end, pages_shared=1, pages_sharing=7, pages_volatile=0)
    counters(ks.at(4).end, pages_shared=1, pages_sharing=3)
    stat(ks.at(4).end, "p1", rmap_items=0, mergeable=False)  # its slot was dropped
    counters(ks.at(5).end, pages_volatile=4)  # re-registered at the tail, first visit
    counters(ks.at(6).end, pages_shared=1, pages_sharing=7)
    differential.check(ks)


def test_madv_dontneed_pages_vanish(differential: Differential) -> None:
    acts = [
        {"after": 2, "do": "dontneed", "process": "p2", "start": 4, "count": 4},
        {"after": 3, "do": "write", "process": "p2", "pages": [4, 5, 6, 7], "content": "a"},
    ]
    ks = differential(scenario("dontneed", 5, procs(2, 8, "a"), actions=acts))
    counters(ks.at(2).end, pages_shared=1, pages_sharing=15)
    counters(ks.at(3).end, pages_shared=1, pages_sharing=11)  # non-present: items freed
    stat(ks.at(3).end, "p2", rmap_items=4, merging_pages=4)
    counters(ks.at(4).end, pages_sharing=11, pages_volatile=4)
    counters(ks.at(5).end, pages_sharing=15, pages_volatile=0)
    differential.check(ks)


def test_small_batches_give_the_same_end_of_scan_state(differential: Differential) -> None:
    # 300 pages in batches of 64: five batches per scan, the sample still at each scan's end.
    tun = {"pages_to_scan": 64, "sleep_millisecs": 100}
    ks = differential(scenario("example-1-batches", 3, procs(3, 100, "a"), tunables=tun))
    counters(ks.at(1).end, pages_volatile=300, pages_scanned=300)
    counters(ks.at(2).end, pages_shared=2, pages_sharing=298, stable_node_dups=2)
    differential.check(ks)


def test_merge_across_nodes_0_on_one_node(differential: Differential) -> None:
    if differential.kernel.read_tunables().merge_across_nodes is None:
        pytest.skip("this kernel has no merge_across_nodes (not a NUMA build)")
    tun = {"merge_across_nodes": 0}
    ks = differential(scenario("mano0", 3, procs(3, 100, "a"), tunables=tun))
    counters(ks.at(2).end, pages_shared=2, pages_sharing=298)  # one node: as Example 1
    differential.check(ks)


# -- max_page_sharing sweep (spec section 8, closed form) ------------------------------------


def split(k: int) -> list[dict[str, Any]]:
    """K identical pages over up to 3 processes, registered in order."""
    n = min(3, k)
    sizes = [k // n + (1 if i < k % n else 0) for i in range(n)]
    return [{"name": f"p{i + 1}", "pages": s, "fill": "a"} for i, s in enumerate(sizes)]


@pytest.mark.parametrize("k", [1, 2, 5, 256, 257, 600])
@pytest.mark.parametrize("m", [2, 3, 256])
def test_max_page_sharing_sweep(differential: Differential, m: int, k: int) -> None:
    tun = {"max_page_sharing": m}
    ks = differential(scenario(f"mps-{m}-k{k}", 3, split(k), tunables=tun))
    q, r = divmod(k, m)
    shared = q + (1 if r >= 2 else 0)
    counters(
        ks.at(2).end, pages_shared=shared,
        pages_sharing=k - shared - (1 if r == 1 else 0),
        pages_unshared=1 if r == 1 else 0,
        stable_node_chains=1 if shared >= 2 else 0,
        stable_node_dups=shared if shared >= 2 else 0,
    )  # fmt: skip
    differential.check(ks)


# -- transparent huge pages (THP) ------------------------------------------------------------

HUGE_KB = 2048  # one PMD-mapped THP


def thp(name: str, contents: list[str], **more: Any) -> dict[str, Any]:
    return {"name": name, "contents": contents, "thp": True, **more}


def huge_pages_given(series: Series, **expected_kb: int) -> None:
    """The kernel really faulted the THP processes in as huge pages (AnonHugePages)."""
    got = {p: series.initial.processes[p]["anon_huge_kb"] for p in expected_kb}
    if got != expected_kb:
        pytest.skip(
            f"the kernel did not give huge pages (AnonHugePages kB {got}, wanted "
            f"{expected_kb}): THP disabled or memory too fragmented"
        )


def test_thp_one_huge_page_of_identical_pages(differential: Differential) -> None:
    # The figures of issue 12 / spec section 19 item 1 (they need max_page_sharing > 511:
    # with 256 the same run gives shared 2, sharing 509 at scan 2).
    tun = {"max_page_sharing": 1024}
    ks = differential(scenario("thp-512", 3, [thp("p1", ["a*512"])], tunables=tun))
    huge_pages_given(ks, p1=HUGE_KB)
    counters(ks.at(2).end, pages_shared=1, pages_sharing=510, pages_volatile=1)
    counters(ks.at(3).end, pages_shared=1, pages_sharing=511, pages_volatile=0)
    differential.check(ks)


def test_thp_identical_pages(differential: Differential) -> None:
    # Spec section 19 item 1: in scan 2 the first pair of the huge page fails (both pages in
    # one folio) and splits it, the rest merge; that page merges in scan 3. Two processes.
    procs = [thp("p1", ["a*1024"]), thp("p2", ["a*512"])]
    ks = differential(scenario("thp-identical", 4, procs))
    huge_pages_given(ks, p1=2 * HUGE_KB, p2=HUGE_KB)
    counters(ks.at(1).end, pages_volatile=1536)
    counters(ks.at(2).end, pages_volatile=1, pages_shared=6, pages_sharing=1529)
    counters(ks.at(3).end, pages_volatile=0, pages_shared=6, pages_sharing=1530)
    stat(ks.at(2).end, "p1", anon_huge_kb=0)  # every huge page was split
    differential.check(ks)


def test_thp_half_identical_half_unique(differential: Differential) -> None:
    # Two huge pages, each 256 pages of 'a' and then 256 unique ones.
    half = ["a*256", *[f"u:{i}" for i in range(256)], "a*256", *[f"u:{i}" for i in range(256, 512)]]
    ks = differential(scenario("thp-half", 4, [thp("p1", half)]))
    huge_pages_given(ks, p1=2 * HUGE_KB)
    counters(ks.at(2).end, pages_unshared=512, pages_volatile=1)
    differential.check(ks)


@pytest.mark.parametrize("zero", [0, 1])
def test_thp_zero_filled_tails_and_heads(differential: Differential, zero: int) -> None:
    # 6.12+: the split maps zero-filled subpages to the shared zero page: they never merge
    # (not even with the zero page), and one inserted in the unstable tree before the split
    # stops every later walk of that scan. p3 (no THP) has small zero pages that do merge.
    procs = [
        thp("p1", ["a*300", "zero*212"]),
        thp("p2", ["zero*200", "b*312"]),
        {"name": "p3", "contents": ["zero*16", "b*16"]},
    ]
    tun = {"use_zero_pages": zero}
    ks = differential(scenario(f"thp-zero-{zero}", 4, procs, tunables=tun))
    huge_pages_given(ks, p1=HUGE_KB, p2=HUGE_KB)
    stat(ks.at(3).end, "p1", rmap_items=300, zero_pages=0)
    stat(ks.at(3).end, "p2", rmap_items=312, zero_pages=0)
    stat(ks.at(3).end, "p3", zero_pages=16 * zero)
    differential.check(ks)


def zero_bearing(huge: int, first: int) -> list[str]:
    """`huge` huge pages of 256 unique pages then 256 zero-filled ones, then 8 small zero
    pages (a partial block: no huge page there), as the guests' RAM then ROM blocks."""
    out: list[str] = []
    for j in range(huge):
        out += [f"u:{first + 256 * j + i}" for i in range(256)] + ["zero*256"]
    return [*out, "zero*8"]


def test_thp_zero_bearing_huge_pages_split_one_per_scan_until_a_zero_ksm_page(
    differential: Differential,
) -> None:
    # Issue 12 (the bimodal unmerged pages of THP guests), with processes. In each scan that
    # visits them (2, 3, 4, 6, 9, ... with smart_scan), the first two zero-filled subpages of
    # one huge page meet in the unstable tree: the split fails, then splits it afterwards and
    # maps its zero-filled subpages to the zero page, the one in the tree too, which stops
    # every later zero-filled search of that scan. So p1 (walked first) loses one huge page
    # per such scan and p2 none, until p1 has none left: then p1's small zero pages merge
    # into a zero-filled KSM page, and every later zero-filled subpage finds it in the stable
    # tree and has its huge page split. Which mode a run ends in depends on the number of
    # scans it made and on the huge pages of the process walked first.
    procs = [thp("p1", zero_bearing(3, 0)), thp("p2", zero_bearing(1, 10_000))]
    ks = differential(scenario("thp-zero-bearing", 7, procs))
    huge_pages_given(ks, p1=3 * HUGE_KB, p2=HUGE_KB)
    for f, p1_huge in ((2, 2), (3, 1), (4, 0), (5, 0)):
        stat(ks.at(f).end, "p1", anon_huge_kb=p1_huge * HUGE_KB)
        stat(ks.at(f).end, "p2", rmap_items=520, anon_huge_kb=HUGE_KB)
    counters(ks.at(6).end, pages_shared=1, pages_sharing=15)
    stat(ks.at(6).end, "p1", rmap_items=776)
    stat(ks.at(6).end, "p2", anon_huge_kb=0)
    stat(ks.at(7).end, "p2", rmap_items=264)
    differential.check(ks)


def test_thp_writes_into_split_and_unsplit_huge_pages(differential: Differential) -> None:
    # p1's unique pages never merge, so its huge page stays: a write changes it in place.
    # p2's pages merged (split): writes copy KSM pages, one of them back to the same bytes.
    acts = [
        {"after": 2, "do": "write", "process": "p1", "pages": [5, 300], "content": "b"},
        {"after": 2, "do": "write", "process": "p2", "pages": [3, 4], "content": "c"},
        {"after": 2, "do": "write", "process": "p2", "pages": [7], "content": "a"},
        {"after": 4, "do": "write", "process": "p1", "pages": [6], "content": "u:6"},
    ]
    procs = [thp("p1", [f"u:{i}" for i in range(512)]), thp("p2", ["a*512"])]
    ks = differential(scenario("thp-writes", 6, procs, actions=acts))
    huge_pages_given(ks, p1=HUGE_KB, p2=HUGE_KB)
    after = ks.at(2).after_actions
    assert after is not None
    stat(after, "p1", anon_huge_kb=HUGE_KB)  # written in place: still a huge page
    stat(after, "p2", anon_huge_kb=0)
    differential.check(ks)


def test_thp_and_small_pages_mixed(differential: Differential) -> None:
    # Small-page processes first and last: their pages meet huge pages' in both trees.
    procs = [
        {"name": "s1", "contents": ["a*40", "u:1*3", "zero*5"]},
        thp("h1", ["u:1*10", "a*600", "u:2*200", "zero*214"]),
        {"name": "s2", "contents": ["u:2*7", "a*9"]},
        thp("h2", ["a*100", "u:1*412", "b*40"]),
    ]
    acts = [
        {"after": 2, "do": "fork", "process": "h2", "child": "c2"},
        {"after": 3, "do": "write", "process": "c2", "pages": [500, 501], "content": "a"},
        {"after": 3, "do": "dontneed", "process": "h1", "start": 512, "count": 512},
    ]
    ks = differential(scenario("thp-mixed", 6, procs, actions=acts))
    huge_pages_given(ks, h1=2 * HUGE_KB, h2=HUGE_KB)
    differential.check(ks)


def test_thp_fork_before_the_merge(differential: Differential) -> None:
    # The child maps the same huge page; the split (from the parent's pair) splits it in
    # both, and the child's pages append to the KSM pages with the bypass.
    acts = [
        {"after": 1, "do": "fork", "process": "p1", "child": "c1"},
        {"after": 3, "do": "write", "process": "c1", "pages": [7], "content": "b"},
    ]
    ks = differential(scenario("thp-fork", 5, [thp("p1", ["a*512"])], actions=acts))
    huge_pages_given(ks, p1=HUGE_KB)
    after = ks.at(1).after_actions
    assert after is not None
    stat(after, "c1", anon_huge_kb=HUGE_KB)
    differential.check(ks)


# -- jiffies ---------------------------------------------------------------------------------


def test_chain_prune_in_jiffies(differential: Differential) -> None:
    # A chain [N2, N1] is made in scan 2 by B's pages, one batch (pages_to_scan 3) before the
    # scan ends; then A's writes free N1's page. In scan 3 L's page (first in the walk) looks
    # the chain up. At HZ 250, sleep_millisecs 101 is 26 jiffies and the timer wheel fires
    # strictly after that, so at least 27 jiffies pass between N2's creation and L's lookup;
    # stable_node_chains_prune_millisecs 105 is msecs_to_jiffies = 27: the kernel must prune
    # (N1 goes, the chain collapses: chains 0, dups 0). Exact milliseconds (101 < 105) would
    # not prune, nor would 26 jiffies: chains 1, dups 1.
    if differential.kernel.read_tunables().sleep_millisecs is None:
        pytest.skip("no KSM")
    from ksm_model.hostprobe import probe

    if probe().hz != 250:
        pytest.skip(f"the test's numbers are for HZ 250, this kernel has HZ {probe().hz}")
    procs = [
        {"name": "L", "contents": ["u:1"]},
        {"name": "A", "pages": 3, "fill": "a"},
        {"name": "B", "pages": 2, "fill": "a"},
        {"name": "C", "contents": ["u:3"]},
    ]
    acts = [
        {"after": 1, "do": "write", "process": "L", "pages": [0], "content": "a"},
        {"after": 1, "do": "write", "process": "C", "pages": [0], "content": "u:4"},
        {"after": 2, "do": "write", "process": "A", "pages": [0, 1, 2], "content": "b"},
        {"after": 2, "do": "write", "process": "C", "pages": [0], "content": "u:5"},
    ]
    tun = {
        "max_page_sharing": 3,
        "pages_to_scan": 3,
        "sleep_millisecs": 101,
        "stable_node_chains_prune_millisecs": 105,
    }
    ks = differential(scenario("prune-jiffies", 4, procs, tunables=tun, actions=acts))
    counters(ks.at(2).end, stable_node_chains=1, stable_node_dups=2)
    counters(ks.at(3).end, stable_node_chains=0, stable_node_dups=0, pages_shared=1)
    differential.check(ks)


# -- runner checks ---------------------------------------------------------------------------


def test_runner_leaves_no_worker_and_no_ksm_state(kernel: SysfsBackend) -> None:
    act = [{"after": 1, "do": "fork", "process": "p1", "child": "c1"}]
    runner = KernelRunner(kernel)
    series = runner.run(scenario("cleanup", 2, procs(2, 8, "a"), actions=act))
    assert list(series.at(2).end.processes) == ["p1", "p2", "c1"]
    assert runner.last_pids and not any(process_alive(p) for p in runner.last_pids)
    c = kernel.read_counters()
    assert (c.pages_shared, c.pages_sharing, c.pages_unshared, c.pages_volatile) == (0, 0, 0, 0)


def test_runner_normalises_knobs_left_by_others(differential: Differential) -> None:
    # Another run may leave any setting behind; unset scenario knobs get the kernel defaults,
    # the advisor is turned off, and the series is exactly Example 1's.
    differential.kernel.write_tunables(
        advisor_mode="scan-time", max_page_sharing=3, smart_scan=0, use_zero_pages=1
    )
    ks = differential(scenario("dirty-host", 2, procs(3, 100, "a")))
    counters(ks.at(2).end, pages_shared=2, pages_sharing=298, general_profit=1201408)
    differential.check(ks)


def test_a_sample_that_is_not_frozen_is_refused(kernel: SysfsBackend) -> None:
    # With sleep_millisecs=0 ksmd starts the next scan at once, before run=0 can take effect:
    # the runner must notice (visits or full_scans moved) instead of returning wrong values.
    # Which it notices first depends on how far ksmd got: several whole scans, or part of one.
    s = scenario("no-sleep", 3, procs(2, 200, "a"), tunables={"sleep_millisecs": 0})
    moved = "ksmd went on before it could be paused|full scans since the last sample"
    with pytest.raises(SamplingError, match=moved):
        KernelRunner(kernel).run(s)
    c = kernel.read_counters()
    assert (c.pages_shared, c.pages_sharing, c.pages_volatile) == (0, 0, 0)


def test_foreign_ksm_user_is_detected(kernel: SysfsBackend) -> None:
    with WorkerPool() as pool:
        intruder = pool.start("intruder", ["a"] * 4)  # registered with KSM, not in the scenario
        with pytest.raises(ForeignKsmActivity, match=f"pid {intruder.pid} "):
            KernelRunner(kernel).run(scenario("foreign", 2, procs(1, 4, "a")))


# -- random scenarios ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "seed",
    [
        pytest.param(s, marks=[pytest.mark.long] if s - SEED_START >= CI_SEEDS else [])
        for s in range(SEED_START, SEED_START + SEEDS)
    ],
    ids=lambda s: f"seed{s}",
)
def test_random_scenario(differential: Differential, seed: int) -> None:
    ks = differential(generate(seed))
    # The kernel side must be self-consistent at every end of scan.
    for sample in ks.samples:
        c = sample.end.counters
        merging = sum(int(s["ksm_merging_pages"] or 0) for s in sample.end.processes.values())
        assert merging == (c["pages_shared"] or 0) + (c["pages_sharing"] or 0), (
            f"seed {seed} F={sample.scan}: sum of ksm_merging_pages {merging} != shared+sharing"
        )
    differential.check(ks)
