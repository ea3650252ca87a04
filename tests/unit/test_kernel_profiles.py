"""Profile selection by behaviour: fake /sys/kernel/mm/ksm trees and ksm_stat files of each
kernel version, the release cut-offs, backports seen in the files, and the behaviour probe."""

from __future__ import annotations

from pathlib import Path

import pytest
from ksm_model import Kernel
from ksm_model.hostprobe import host_profile
from ksm_model.profiles import (
    ADVISOR_FILES,
    COMMON_FILES,
    FEATURES,
    PROFILES,
    for_release,
    resolve,
    select,
)

from harness.kernels.detect import PROBE, KernelFacts, facts_from_tree, needs_probe, probe
from harness.record import Snapshot
from harness.scenario.series import ScanSample, Series

STAT_61 = "ksm_rmap_items 0\n"
STAT_64 = "ksm_rmap_items 0\nksm_merging_pages 0\nksm_process_profit 0\n"
STAT_66 = "ksm_rmap_items 0\nksm_zero_pages 0\nksm_merging_pages 0\nksm_process_profit 0\n"
STAT_614 = STAT_66 + "ksm_merge_any: no\nksm_mergeable: no\n"

# (release, files beyond the common ones, ksm_stat text, expected profile name)
VERSIONS = [
    ("6.1.0-57-amd64", (), STAT_61, "6.1"),
    ("6.4.16", ("general_profit",), STAT_64, "6.4"),
    ("6.6.63", ("general_profit", "pages_scanned", "ksm_zero_pages"), STAT_66, "6.6"),
    (
        "6.7.12",
        ("general_profit", "pages_scanned", "ksm_zero_pages", "smart_scan", "pages_skipped"),
        STAT_66,
        "6.7",
    ),
    ("6.8.0-49-generic", None, STAT_66, "6.8"),
    ("6.12.117+deb12-amd64", None, STAT_66, "6.12"),
    ("6.14.3", None, STAT_614, "6.14"),
    ("6.18.44-fc-v782", None, STAT_614, "6.17"),
]
ALL_NEW = (
    "general_profit", "pages_scanned", "ksm_zero_pages", "smart_scan", "pages_skipped",
    *ADVISOR_FILES,
)  # fmt: skip


def fake_tree(root: Path, extra: tuple[str, ...] | None, stat: str) -> tuple[Path, Path]:
    """/sys/kernel/mm/ksm with those files, and /proc/self/ksm_stat with that text."""
    ksm = root / "sys/kernel/mm/ksm"
    ksm.mkdir(parents=True)
    for name in (*COMMON_FILES, *(ALL_NEW if extra is None else extra)):
        (ksm / name).write_text("0\n")
    self_dir = root / "proc/self"
    self_dir.mkdir(parents=True)
    (self_dir / "ksm_stat").write_text(stat)
    return ksm, root / "proc"


@pytest.mark.parametrize(("release", "extra", "stat", "name"), VERSIONS)
def test_each_version_tree_selects_its_mainline_profile(
    tmp_path: Path, release: str, extra: tuple[str, ...] | None, stat: str, name: str
) -> None:
    ksm, proc = fake_tree(tmp_path, extra, stat)
    facts = facts_from_tree(release, ksm, proc / "self" / "ksm_stat")
    profile = facts.profile()
    assert profile.name == name
    assert profile == PROFILES[name]  # nothing adjusted: the files are what the release has
    assert set(profile.files) == {p.name for p in ksm.iterdir()}
    # ksm_model's own reader of the running kernel gives the same answer from the same tree.
    assert host_profile(ksm, proc, release) == profile


def test_release_cut_offs() -> None:
    assert for_release("6.6.0").pages_scanned and not for_release("6.6.0").pages_scanned_exact
    assert for_release("6.10.14-amd64").pages_scanned_exact
    assert not for_release("6.8.0-49-generic").chain_best_dup
    assert for_release("6.9.1").chain_best_dup and not for_release("6.9.1").checksum_first
    assert for_release("6.11.0").checksum_first and for_release("6.11.0").lru_batch == 31
    assert not for_release("6.13.2").ksm_stat_flags and for_release("6.14.0").ksm_stat_flags
    assert for_release("5.15.0-91-generic").name == "6.1"  # the oldest modelled
    assert for_release("7.0.1").name == "6.17"
    assert [p.name for p in PROFILES.values()][:3] == ["6.1", "6.4", "6.6"]
    for feature, (since, before, _) in FEATURES.items():
        older = for_release(f"{since[0]}.{since[1] - 1}")
        assert getattr(older, feature) == before, feature
        assert getattr(for_release(f"{since[0]}.{since[1]}"), feature) != before, feature


def test_backports_seen_in_the_files_win_over_the_release(tmp_path: Path) -> None:
    # A distribution kernel numbered 5.14 with smart scan, general_profit and the advisor
    # backported (what RHEL 9 did): the files say so, the release cannot.
    ksm, proc = fake_tree(
        tmp_path, ("general_profit", "smart_scan", "pages_skipped", *ADVISOR_FILES), STAT_64
    )
    p = facts_from_tree("5.14.0-427.13.1.el9_4.x86_64", ksm, proc / "self" / "ksm_stat").profile()
    assert p.smart_scan and p.advisor and p.general_profit and p.prctl
    assert not p.checksum_first and not p.zero_pages_counted  # what no file shows stays 6.1
    assert p.name == "6.1+advisor+general-profit+prctl+smart-scan"
    assert set(p.files) == {f.name for f in ksm.iterdir()}


def test_a_missing_file_is_followed_too() -> None:
    p = select("6.8.0", files=[*COMMON_FILES, "general_profit"])  # advisor, smart_scan removed
    assert not p.advisor and not p.smart_scan and not p.pages_scanned
    assert p.name.startswith("6.8-")


def test_stat_lines_decide_the_flag_lines() -> None:
    assert select("6.12.0", stat_fields=["ksm_rmap_items", "ksm_merge_any"]).ksm_stat_flags
    assert not select("6.14.0", stat_fields=["ksm_rmap_items"]).ksm_stat_flags


def test_probed_behaviour_names_the_profile() -> None:
    p = select("6.12.117+deb12-amd64", probed={"fork_resets_counters": True})
    assert p.name == "6.12+fork-reset" and p.fork_resets_counters
    assert select("6.1.0-57-amd64", probed={"fork_resets_counters": False}).name == "6.1"
    assert select("6.8.0", probed={"pages_scanned_exact": True}).name == "6.8+scanned-exact"
    with pytest.raises(ValueError, match="not a probed feature"):
        select("6.8.0", probed={"smart_scan": True})


def test_probe_only_where_the_release_cannot_tell() -> None:
    assert needs_probe("6.1.0-57-amd64") == ("fork_resets_counters", "pages_scanned_exact")
    assert needs_probe("6.12.117+deb12-amd64") == ("fork_resets_counters",)
    assert needs_probe("6.18.44-fc-v782") == ()


class FakeRunner:
    """What the probe needs of a runner: run(PROBE) -> Series (values of a real kernel)."""

    def __init__(self, inherited: int, scanned: int | None) -> None:
        self.inherited, self.scanned = inherited, scanned

    def run(self, scenario: object) -> Series:
        assert scenario is PROBE

        def snap(**procs: dict[str, object]) -> Snapshot:
            return Snapshot({"pages_scanned": self.scanned}, procs)  # type: ignore[arg-type]

        stat = {"ksm_rmap_items": 8}
        child = {"ksm_rmap_items": self.inherited}
        samples = (
            ScanSample(1, snap(p1=stat)),
            ScanSample(2, snap(p1=stat), snap(p1=stat, c1=child), ("ok",)),
            ScanSample(3, snap(p1=stat, c1=child)),
        )
        return Series("kernel", PROBE, snap(p1=stat), samples)


@pytest.mark.parametrize(
    ("inherited", "scanned", "files", "expected"),
    [
        (0, 8, ["pages_scanned"], {"fork_resets_counters": True, "pages_scanned_exact": True}),
        (8, 0, ["pages_scanned"], {"fork_resets_counters": False, "pages_scanned_exact": False}),
        (8, None, [], {"fork_resets_counters": False}),  # 6.1: no pages_scanned file
    ],
)
def test_probe_reads_the_fork_and_the_scan_counts(
    inherited: int, scanned: int | None, files: list[str], expected: dict[str, bool]
) -> None:
    assert probe(FakeRunner(inherited, scanned), files) == expected  # type: ignore[arg-type]


def test_kernel_takes_a_selected_profile_and_host() -> None:
    p = select("6.12.117+deb12-amd64", probed={"fork_resets_counters": True})
    assert Kernel(profile=p).profile is p
    assert resolve("latest") is PROFILES["6.17"]
    assert Kernel(profile="host").profile.name.startswith("6.")
    assert KernelFacts("6.1.0-57-amd64", frozenset(COMMON_FILES)).profile() is PROFILES["6.1"]
