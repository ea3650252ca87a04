"""Kernel version profiles: which files exist and which behaviour applies (spec section 17)."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

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
NEW_FILES = (
    "pages_scanned",  # 6.6 (exact since 6.10)
    "pages_skipped",  # 6.7
    "ksm_zero_pages",  # 6.6
    "general_profit",  # 6.4
    "smart_scan",  # 6.7
    "advisor_mode",  # 6.8
    "advisor_max_cpu",
    "advisor_min_pages_to_scan",
    "advisor_max_pages_to_scan",
    "advisor_target_scan_time",
)


@dataclass(frozen=True)
class Profile:
    """What a kernel version has; see spec section 17."""

    name: str
    files: tuple[str, ...]
    checksum_first: bool  # 6.11+: checksum test before the stable-tree search
    smart_scan: bool  # 6.7+
    advisor: bool  # 6.8+
    zero_pages_counted: bool  # 6.6+: ksm_zero_pages (sysfs and ksm_stat)
    unshare_zero_pages: bool  # 6.6+: MADV_UNMERGEABLE / run=2 unshare KSM zero pages
    general_profit: bool  # 6.4+: general_profit, ksm_stat merging/profit
    prctl: bool  # 6.4+: PR_SET_MEMORY_MERGE
    ksm_stat_flags: bool  # ksm_stat "ksm_merge_any:" / "ksm_mergeable:" lines
    lru_batch: int  # folios per per-CPU LRU batch: PAGEVEC_SIZE 15, FOLIO_BATCH_SIZE 31 (6.11)
    thp_split_remaps_zero: bool  # 6.12+: a THP split maps zero-filled subpages to the zero page
    thp_align_anon: bool  # 6.7+: anonymous mmaps of a multiple of the PMD size are PMD-aligned
    thp_wp_zero_alloc: bool = False  # 6.13+: a write to the huge zero page maps a new THP


PROFILES = {
    "6.11": Profile(
        name="6.11",
        files=COMMON_FILES + NEW_FILES,
        checksum_first=True,
        smart_scan=True,
        advisor=True,
        zero_pages_counted=True,
        unshare_zero_pages=True,
        general_profit=True,
        prctl=True,
        ksm_stat_flags=True,
        lru_batch=31,
        thp_split_remaps_zero=False,
        thp_align_anon=True,
    ),
    "6.1": Profile(
        name="6.1",
        files=COMMON_FILES,
        checksum_first=False,
        smart_scan=False,
        advisor=False,
        zero_pages_counted=False,
        unshare_zero_pages=False,
        general_profit=False,
        prctl=False,
        ksm_stat_flags=False,
        lru_batch=15,
        thp_split_remaps_zero=False,
        thp_align_anon=False,
    ),
}
# 6.12 (b1f202060afe "mm: remap unused subpages to shared zeropage when splitting isolated
# thp"): the same KSM as 6.11, but a huge page split maps its zero-filled subpages to the
# shared zero page, so they leave KSM's view (measured on 6.18).
PROFILES["6.12"] = replace(PROFILES["6.11"], name="6.12", thp_split_remaps_zero=True)
# 6.13 ("mm: allocate THP on hugezeropage wp-fault"): a write fault on the huge zero page
# maps a new huge page instead of splitting the PMD (measured on 6.18).
PROFILES["6.13"] = replace(PROFILES["6.12"], name="6.13", thp_wp_zero_alloc=True)


def _release_tuple(release: str) -> tuple[int, int]:
    parts = release.split(".")
    nums = []
    for p in parts[:2]:
        digits = "".join(ch for ch in p if ch.isdigit()) or "0"
        nums.append(int(digits[:4]))
    while len(nums) < 2:
        nums.append(0)
    return nums[0], nums[1]


def resolve(name: str, release: str | None = None) -> Profile:
    """A profile by name; "host" picks the newest profile not newer than the running kernel
    (6.13, 6.12, 6.11), else "6.1".

    A 6.6-6.10 host therefore gets the 6.1 behaviour (stable search before the checksum, no
    smart_scan/advisor/zero-page counting), which is the closest of the profiles.
    """
    if name == "host":
        rel = _release_tuple(release if release is not None else os.uname().release)
        newer = [(6, 13), (6, 12), (6, 11)]
        name = next((f"{a}.{b}" for a, b in newer if rel >= (a, b)), "6.1")
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown profile {name!r}: use 6.13, 6.12, 6.11, 6.1 or host") from None
