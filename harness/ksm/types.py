"""Typed snapshots of KSM state: what every KsmBackend returns.

A field is None when the running kernel (or model profile) has no such file: absence is a fact
about the kernel, not an error.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

PAGE_SIZE = 4096

COUNTER_NAMES = (
    "pages_shared",
    "pages_sharing",
    "pages_unshared",
    "pages_volatile",
    "pages_scanned",
    "pages_skipped",
    "full_scans",
    "stable_node_chains",
    "stable_node_dups",
    "ksm_zero_pages",
    "general_profit",
)

TUNABLE_NAMES = (
    "run",
    "pages_to_scan",
    "sleep_millisecs",
    "merge_across_nodes",
    "use_zero_pages",
    "max_page_sharing",
    "stable_node_chains_prune_millisecs",
    "smart_scan",
    "advisor_mode",
    "advisor_max_cpu",
    "advisor_min_pages_to_scan",
    "advisor_max_pages_to_scan",
    "advisor_target_scan_time",
)


@dataclass(frozen=True)
class Counters:
    """The read-only counters of /sys/kernel/mm/ksm."""

    pages_shared: int | None = None
    pages_sharing: int | None = None
    pages_unshared: int | None = None
    pages_volatile: int | None = None
    pages_scanned: int | None = None
    pages_skipped: int | None = None
    full_scans: int | None = None
    stable_node_chains: int | None = None
    stable_node_dups: int | None = None
    ksm_zero_pages: int | None = None
    general_profit: int | None = None

    def as_dict(self) -> dict[str, int | None]:
        return asdict(self)

    def present(self) -> dict[str, int]:
        """Only the counters this kernel has."""
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class Tunables:
    """The writable knobs of /sys/kernel/mm/ksm. advisor_mode is the selected word, e.g. 'none'."""

    run: int | None = None
    pages_to_scan: int | None = None
    sleep_millisecs: int | None = None
    merge_across_nodes: int | None = None
    use_zero_pages: int | None = None
    max_page_sharing: int | None = None
    stable_node_chains_prune_millisecs: int | None = None
    smart_scan: int | None = None
    advisor_mode: str | None = None
    advisor_max_cpu: int | None = None
    advisor_min_pages_to_scan: int | None = None
    advisor_max_pages_to_scan: int | None = None
    advisor_target_scan_time: int | None = None

    def as_dict(self) -> dict[str, int | str | None]:
        return asdict(self)

    def present(self) -> dict[str, int | str]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class Derived:
    """Figures the kernel documentation defines on top of the raw counters."""

    saved_bytes: int | None
    sharing_ratio: float | None
    waste_ratio: float | None


def derive(c: Counters, page_size: int = PAGE_SIZE) -> Derived:
    """saved = (pages_sharing + ksm_zero_pages) x page size; ratios as in admin-guide/mm/ksm.rst.

    A ratio whose denominator is zero is None (undefined), not 0 or infinity.
    """
    saved = None
    if c.pages_sharing is not None:
        saved = (c.pages_sharing + (c.ksm_zero_pages or 0)) * page_size
    sharing = None
    if c.pages_sharing is not None and c.pages_shared:
        sharing = c.pages_sharing / c.pages_shared
    waste = None
    if c.pages_unshared is not None and c.pages_sharing:
        waste = c.pages_unshared / c.pages_sharing
    return Derived(saved_bytes=saved, sharing_ratio=sharing, waste_ratio=waste)


@dataclass(frozen=True)
class KsmStat:
    """/proc/PID/ksm_stat (or, on 5.19-6.0 kernels, only ksm_merging_pages)."""

    pid: int
    rmap_items: int | None = None
    zero_pages: int | None = None
    merging_pages: int | None = None
    process_profit: int | None = None
    merge_any: bool | None = None
    mergeable: bool | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Sample:
    """One consistent reading: counters and tunables, with the time it was taken (monotonic s)."""

    counters: Counters
    tunables: Tunables
    time: float

    def as_dict(self) -> dict[str, Any]:
        return {"time": self.time, **self.counters.as_dict(), **self.tunables.as_dict()}


def counters_from_mapping(values: Mapping[str, int | None]) -> Counters:
    names = {f.name for f in fields(Counters)}
    return Counters(**{k: v for k, v in values.items() if k in names})


def counters_with_derived(
    c: Mapping[str, int | None], page_size: int = PAGE_SIZE
) -> dict[str, Any]:
    """Counters plus saved_bytes / sharing_ratio / waste_ratio (see derive)."""
    d = derive(counters_from_mapping(dict(c)), page_size)
    return {
        **c,
        "saved_bytes": d.saved_bytes,
        "sharing_ratio": d.sharing_ratio,
        "waste_ratio": d.waste_ratio,
    }
