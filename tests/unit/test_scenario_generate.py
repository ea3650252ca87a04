"""The random-scenario generator: deterministic by seed, always valid, covers every action."""

from __future__ import annotations

from collections import Counter

from harness.scenario.generate import generate
from harness.scenario.spec import Fork, Scenario, SetTunable, Spawn


def test_same_seed_same_scenario() -> None:
    for seed in (0, 1, 17, 4242):
        assert generate(seed) == generate(seed)
        assert generate(seed).to_mapping() == generate(seed).to_mapping()


def test_pinned_scenario_for_seed_22() -> None:
    # Pins the generator: a change of this text changes every CI case, so make it on purpose.
    assert generate(22).describe().splitlines() == [
        "scenario 'random-22' seed=22",
        "  scans=8 tunables={'max_page_sharing': 256, 'use_zero_pages': 1, 'smart_scan': 1, "
        "'stable_node_chains_prune_millisecs': 0}",
        "  process p1: a*1 u:0*1",
        "  process p2: c*1 u:1001*1 u:0*1 u:1002*1 u:1003*1 u:1004*1 u:1005*1 u:1006*1 u:1007*1 "
        "u:1008*1 u:1009*1 u:1010*1 u:1011*1",
        "  after F=1: write p1 pages [0, 1] <- c",
        "  after F=2: write p2 pages [2, 4, 6, 10] <- zero",
        "  after F=2: set max_page_sharing=3",
        "  after F=3: write p2 pages [1, 5, 7, 12] <- b",
        "  after F=3: write p1 pages [0] <- a",
        "  after F=4: fork p2 -> c1",
        "  after F=5: write p1 pages [0, 1] <- c",
        "  after F=5: unmergeable c1 pages [10:+3]",
        "  after F=6: fork p2 -> c2",
    ]


def test_different_seeds_differ() -> None:
    seen = {repr(generate(seed)) for seed in range(200)}
    assert len(seen) == 200


def test_ranges_and_coverage() -> None:
    kinds: Counter[str] = Counter()
    mps: set[int] = set()
    prune: Counter[int] = Counter()
    zero, smart = set(), set()
    dup_groups = 0
    zero_forks = 0  # fork after use_zero_pages=1: KSM zero pages copied (diff-findings F1)
    thp_seeds = thp_spawns = thp_zero = 0
    for seed in range(600):
        s = generate(seed)
        assert isinstance(s, Scenario)  # construction validates it
        assert 1 <= len(s.processes) <= 4
        assert all(1 <= len(p.pages) <= (1100 if p.thp else 300) for p in s.processes)
        huge = [p for p in s.processes if p.thp]
        assert len(huge) <= 1 and all(len(p.pages) >= 512 for p in huge)
        thp_seeds += bool(huge)
        thp_zero += any("zero" in p.pages and len(set(p.pages)) > 1 for p in huge)
        thp_spawns += sum(isinstance(a, Spawn) and a.spec.thp for a in s.actions)
        assert 2 <= s.scans <= 10
        t = s.tunable_values
        mps.add(t["max_page_sharing"])
        prune[t.get("stable_node_chains_prune_millisecs", -1)] += 1
        zero.add(t["use_zero_pages"])
        smart.add(t["smart_scan"])
        kinds.update(a.kind for a in s.actions)
        pages = Counter(tok for p in s.processes for tok in p.pages)
        dup_groups += sum(1 for n in pages.values() if n > 1)
        zero_seen = t["use_zero_pages"] == 1
        for a in s.actions:
            if isinstance(a, SetTunable) and a.name == "use_zero_pages" and a.value == 1:
                zero_seen = True
            zero_forks += isinstance(a, Fork) and zero_seen
    assert mps == {2, 3, 256}
    assert set(prune) == {0, -1}  # 0 or the runner's never-prune default
    assert zero == {0, 1} and smart == {0, 1}
    assert set(kinds) == {
        "write", "fork", "exit", "unmergeable", "mergeable", "dontneed", "spawn", "rerun", "set",
    }  # fmt: skip
    assert dup_groups > 600
    assert zero_forks > 10
    assert 150 < thp_seeds < 270 and thp_zero > 40 and thp_spawns > 5


def test_thp_processes_do_not_change_the_rest_of_a_seed() -> None:
    # THP choices come from their own random stream: only THP processes differ.
    changed = 0
    for seed in range(100):
        s, plain = generate(seed), generate(seed, thp=False)
        assert not any(p.thp for p in plain.processes)
        assert (s.scans, s.tunables) == (plain.scans, plain.tunables)
        for p, q in zip(s.processes, plain.processes, strict=True):
            assert p == q or (p.thp and p.name == q.name and len(p.pages) >= len(q.pages))
        for a, b in zip(s.actions, plain.actions, strict=True):
            assert a == b or (isinstance(a, Spawn) and a.spec.thp and a.spec.name == b.process)
        changed += s != plain
    assert 20 < changed < 50


def test_limits_are_honoured() -> None:
    for seed in range(100):
        s = generate(seed, max_processes=2, max_pages=10, max_scans=3, thp=False)
        assert len(s.processes) <= 2
        assert all(len(p.pages) <= 10 for p in s.processes)
        assert s.scans <= 3
