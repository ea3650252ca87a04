"""What each KSM tunable accepts, checked before anything is written.

The ranges are the kernel's own (measured on 6.18 by writing out-of-range values: run 3 and
max_page_sharing 1 give EINVAL, max_page_sharing 2^31 gives ERANGE, the uint knobs stop at
2^32-1), so a value we refuse is one the kernel would refuse too, and we refuse it before
touching any file, which keeps a rejected `ksmh set a=1 b=bad` from half-applying.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from harness.errors import KsmWriteRefused

U32_MAX = 2**32 - 1
S32_MAX = 2**31 - 1
ADVISOR_MODES = ("none", "scan-time")

# The spellings the kernel's kstrtobool() reads the same way (it looks at the first one or two
# characters, so it also takes "yellow"; we take only the words).
_TRUE = {"1", "y", "yes", "on", "true"}
_FALSE = {"0", "n", "no", "off", "false"}
BOOL_HELP = "1/0, y/n, yes/no, on/off or true/false (as the kernel's kstrtobool)"


def _int_in(lo: int, hi: int) -> Callable[[str, object], int]:
    def parse(name: str, value: object) -> int:
        try:
            n = int(str(value).strip(), 10) if not isinstance(value, bool) else int(value)
        except ValueError:
            raise KsmWriteRefused(
                f"{name}: {value!r} is not an integer", hint=f"{name} takes {lo}..{hi}"
            ) from None
        if not lo <= n <= hi:
            raise KsmWriteRefused(
                f"{name}: {n} is out of range {lo}..{hi}", hint=f"{name} takes {lo}..{hi}"
            )
        return n

    return parse


def _bool(name: str, value: object) -> int:
    text = str(value).strip().lower() if not isinstance(value, bool) else str(int(value))
    if text in _TRUE:
        return 1
    if text in _FALSE:
        return 0
    raise KsmWriteRefused(f"{name}: {value!r} is not a boolean", hint=f"{name} takes {BOOL_HELP}")


def _advisor(name: str, value: object) -> str:
    text = str(value).strip()
    if text not in ADVISOR_MODES:
        raise KsmWriteRefused(
            f"{name}: {value!r} is not an advisor mode", hint="advisor_mode takes none or scan-time"
        )
    return text


@dataclass(frozen=True)
class TunableSpec:
    name: str
    parse: Callable[[str, object], int | str]
    help: str


SPECS: dict[str, TunableSpec] = {
    s.name: s
    for s in (
        TunableSpec("run", _int_in(0, 2), "0 stop ksmd, 1 merge, 2 stop and unmerge everything"),
        TunableSpec("pages_to_scan", _int_in(0, U32_MAX), "pages ksmd scans per batch"),
        TunableSpec("sleep_millisecs", _int_in(0, U32_MAX), "ksmd sleep between batches (ms)"),
        TunableSpec("merge_across_nodes", _int_in(0, 1), "merge pages from different NUMA nodes"),
        TunableSpec("use_zero_pages", _bool, "merge empty pages with the kernel zero page"),
        TunableSpec("max_page_sharing", _int_in(2, S32_MAX), "most mappings of one KSM page"),
        TunableSpec(
            "stable_node_chains_prune_millisecs",
            _int_in(0, U32_MAX),
            "how often stale stable-node chains are pruned (ms)",
        ),
        TunableSpec("smart_scan", _bool, "skip pages that did not merge in recent scans"),
        TunableSpec("advisor_mode", _advisor, "none, or scan-time (auto-tune pages_to_scan)"),
        TunableSpec("advisor_max_cpu", _int_in(0, U32_MAX), "advisor: max ksmd CPU percent"),
        TunableSpec(
            "advisor_min_pages_to_scan", _int_in(0, U32_MAX), "advisor: lower bound of batch"
        ),
        TunableSpec(
            "advisor_max_pages_to_scan", _int_in(0, U32_MAX), "advisor: upper bound of batch"
        ),
        TunableSpec(
            "advisor_target_scan_time", _int_in(1, U32_MAX), "advisor: target full scan time (s)"
        ),
    )
}

# Order of writes: advisor_mode first (switching it resets pages_to_scan in the kernel), the
# knobs that need an empty stable tree before run can merge anything, and run last, so ksmd
# starts with the final settings.
WRITE_ORDER = (
    "advisor_mode",
    "merge_across_nodes",
    "max_page_sharing",
    "use_zero_pages",
    "smart_scan",
    "stable_node_chains_prune_millisecs",
    "advisor_max_cpu",
    "advisor_min_pages_to_scan",
    "advisor_max_pages_to_scan",
    "advisor_target_scan_time",
    "pages_to_scan",
    "sleep_millisecs",
    "run",
)


def validate(values: dict[str, object]) -> dict[str, int | str]:
    """Parse every value or raise before anything is written; returns them in write order."""
    unknown = sorted(set(values) - set(SPECS))
    if unknown:
        raise KsmWriteRefused(
            f"unknown KSM tunable {unknown[0]!r}", hint="known: " + ", ".join(WRITE_ORDER)
        )
    parsed = {name: SPECS[name].parse(name, v) for name, v in values.items()}
    return {name: parsed[name] for name in WRITE_ORDER if name in parsed}
