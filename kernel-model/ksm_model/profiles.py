"""Kernel profiles: which files exist and which behaviour applies, feature by feature.

A Profile is a set of behaviour features (spec sections 17 and 19), each with the mainline
release that introduced it (FEATURES). The named profiles are mainline at every release where
something observable changed: "6.1", "6.4", "6.6", ... "6.17"; a release maps to the newest
one not newer than it (for_release). Real kernels are not always mainline: distributions and
stable trees backport fixes. select() starts from the release and then follows what the
kernel's own files say (general_profit, smart_scan, ksm_zero_pages, advisor_mode, the
ksm_stat lines) and what a behaviour probe measured (the fork counter reset, exact
pages_scanned); an adjusted profile is named after its base, e.g. "6.12+fork-reset".

This module does no I/O. Kernel(profile="host") asks ksm_model.hostprobe (the separate module
that reads the running kernel's files); the behaviour probe drives real KSM, so it lives in
the harness (harness.kernels.detect).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, fields, replace

COMMON_FILES = (
    "run",
    "pages_to_scan",
    "sleep_millisecs",
    "pages_shared",
    "pages_sharing",
    "pages_unshared",
    "pages_volatile",
    "full_scans",
    "merge_across_nodes",  # CONFIG_NUMA builds (every distribution kernel)
    "max_page_sharing",
    "stable_node_chains",
    "stable_node_dups",
    "stable_node_chains_prune_millisecs",
    "use_zero_pages",
)
ADVISOR_FILES = (
    "advisor_mode",
    "advisor_max_cpu",
    "advisor_min_pages_to_scan",
    "advisor_max_pages_to_scan",
    "advisor_target_scan_time",
)
# Kept for callers of the earlier two-profile module: every file a 6.8+ kernel adds.
NEW_FILES = (
    "pages_scanned",
    "pages_skipped",
    "ksm_zero_pages",
    "general_profit",
    "smart_scan",
    *ADVISOR_FILES,
)


@dataclass(frozen=True)
class Profile:
    """What a kernel has and does; every feature is documented in FEATURES."""

    name: str
    general_profit: bool = True
    prctl: bool = True
    zero_pages_counted: bool = True
    unshare_zero_pages: bool = True
    pages_scanned: bool = True
    smart_scan: bool = True
    thp_align_anon: bool = True
    advisor: bool = True
    chain_best_dup: bool = True
    pages_scanned_exact: bool = True
    checksum_first: bool = True
    lru_batch: int = 31
    thp_split_remaps_zero: bool = True
    thp_wp_zero_alloc: bool = True
    ksm_stat_flags: bool = True
    fork_resets_counters: bool = True

    @property
    def files(self) -> tuple[str, ...]:
        """The /sys/kernel/mm/ksm files of this kernel."""
        out = list(COMMON_FILES)
        if self.general_profit:
            out.append("general_profit")
        if self.pages_scanned:
            out.append("pages_scanned")
        if self.zero_pages_counted:
            out.append("ksm_zero_pages")
        if self.smart_scan:
            out += ["smart_scan", "pages_skipped"]
        if self.advisor:
            out += ADVISOR_FILES
        return tuple(out)

    def features(self) -> dict[str, bool | int]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "name"}


# feature: (first mainline release, its value before, what it is). Values after are the
# Profile defaults. Releases marked "inferred" come from patch dates, not from a tag.
FEATURES: dict[str, tuple[tuple[int, int], bool | int, str]] = {
    "general_profit": ((6, 4), False, "general_profit; ksm_stat merging_pages/process_profit"),
    "prctl": ((6, 4), False, "PR_SET/GET_MEMORY_MERGE"),
    "zero_pages_counted": ((6, 6), False, "ksm_zero_pages in sysfs, ksm_stat and both profits"),
    "unshare_zero_pages": ((6, 6), False, "MADV_UNMERGEABLE and run=2 unshare KSM zero pages"),
    "pages_scanned": ((6, 6), False, "the pages_scanned file"),
    "smart_scan": ((6, 7), False, "smart_scan and pages_skipped"),
    "thp_align_anon": ((6, 7), False, "anonymous mmaps of a multiple of 2 MiB are PMD-aligned"),
    "advisor": ((6, 8), False, "advisor_mode and the advisor_* knobs"),
    "chain_best_dup": (
        (6, 9),
        False,
        "a chain lookup returns the best dup even when full and collapses any one-dup chain "
        "(before: only a pruning search with one live candidate collapses; measured on 6.1)",
    ),
    "pages_scanned_exact": (
        (6, 10),
        False,
        "pages_scanned per page (730cdc2c72c6, stable backports); before, +pages_to_scan+1 per "
        "batch that did not end a full scan",
    ),
    "checksum_first": ((6, 11), False, "checksum test before the stable-tree search"),
    "lru_batch": ((6, 11), 15, "folios per per-CPU LRU batch (PAGEVEC 15, folio_batch 31)"),
    "thp_split_remaps_zero": ((6, 12), False, "a THP split maps zero subpages to the zero page"),
    "thp_wp_zero_alloc": ((6, 13), False, "a write to the huge zero page maps a new THP"),
    "ksm_stat_flags": (
        (6, 14),
        False,
        "ksm_stat ksm_merge_any:/ksm_mergeable: lines (measured absent on 6.12)",
    ),
    "fork_resets_counters": (
        (6, 17),
        False,
        "fork resets the child's ksm_rmap_items/merging_pages and counts its copied KSM zero "
        "pages (Sept 2025, inferred; stable backports: on 6.12.117, not on 6.1.192)",
    ),
}
# Features a kernel shows in its files, so select() can follow backports: file -> features.
FILE_FEATURES = {
    "general_profit": ("general_profit", "prctl"),
    "pages_scanned": ("pages_scanned",),
    "ksm_zero_pages": ("zero_pages_counted", "unshare_zero_pages"),
    "smart_scan": ("smart_scan",),
    "advisor_mode": ("advisor",),
}
# Features only a behaviour probe can tell on a kernel older than their release.
PROBED = ("fork_resets_counters", "pages_scanned_exact")
SHORT = {"fork_resets_counters": "fork-reset", "pages_scanned_exact": "scanned-exact"}


def mainline(release: tuple[int, int]) -> Profile:
    """The mainline behaviour of `release`: every feature at its value then."""
    values: dict[str, bool | int] = {
        name: (Profile.__dataclass_fields__[name].default if release >= since else before)  # type: ignore[misc]
        for name, (since, before, _) in FEATURES.items()
    }
    return Profile(name=f"{release[0]}.{release[1]}", **values)  # type: ignore[arg-type]


# Every release where something changed; a kernel maps to the newest one not newer than it.
RELEASES = sorted({since for since, _, _ in FEATURES.values()} | {(6, 1)})
PROFILES: dict[str, Profile] = {f"{a}.{b}": mainline((a, b)) for a, b in RELEASES}
LATEST = PROFILES[f"{RELEASES[-1][0]}.{RELEASES[-1][1]}"]  # also the name "latest"


def release_tuple(release: str) -> tuple[int, int]:
    """'6.12.117+deb12-amd64' -> (6, 12); anything unparsable is (0, 0)."""
    m = re.match(r"^(\d+)\.(\d+)", release.strip())
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def for_release(release: str) -> Profile:
    """The named profile of a kernel release: the newest profile not newer than it (anything
    older than 6.1 gets 6.1, the oldest modelled)."""
    rel = release_tuple(release)
    name = max((r for r in RELEASES if r <= rel), default=RELEASES[0])
    return PROFILES[f"{name[0]}.{name[1]}"]


def select(
    release: str,
    files: Iterable[str] | None = None,
    stat_fields: Iterable[str] | None = None,
    probed: dict[str, bool] | None = None,
) -> Profile:
    """The profile of a real kernel: for_release(release), then each feature its `files` (the
    names in /sys/kernel/mm/ksm), its ksm_stat line names and `probed` behaviour show
    otherwise. Pure: the callers read the files and run the probe."""
    base = for_release(release)
    change: dict[str, bool] = {}
    if files is not None:
        have = set(files)
        for file, feats in FILE_FEATURES.items():
            for feat in feats:
                if getattr(base, feat) != (file in have):
                    change[feat] = file in have
    if stat_fields is not None:
        flags = "ksm_merge_any" in set(stat_fields)
        if base.ksm_stat_flags != flags:
            change["ksm_stat_flags"] = flags
    for feat, value in (probed or {}).items():
        if feat not in PROBED:
            raise ValueError(f"{feat!r} is not a probed feature ({', '.join(PROBED)})")
        if getattr(base, feat) != value:
            change[feat] = value
    if not change:
        return base
    name = base.name + "".join(
        f"{'+' if v else '-'}{SHORT.get(f, f.replace('_', '-'))}" for f, v in sorted(change.items())
    )
    return replace(base, name=name, **change)


def resolve(name: str | Profile, release: str | None = None) -> Profile:
    """A profile by name (or a Profile, returned as is); "latest" is the newest mainline
    profile; "host" is the running kernel's, from
    its release and files (ksm_model.hostprobe; `release` overrides the running one, and then
    no file is read)."""
    if isinstance(name, Profile):
        return name
    if name == "host":
        if release is not None:
            return for_release(release)
        from ksm_model.hostprobe import host_profile  # the one module that reads files

        return host_profile()
    if name == "latest":
        return LATEST
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(
            f"unknown profile {name!r}: use {', '.join(PROFILES)}, latest or host"
        ) from None
