"""/sys/kernel/mm/ksm of the model: same file names, formats, accepted values and errors."""

from __future__ import annotations

import errno
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ksm_model.kernel import Kernel

U32 = (1 << 32) - 1
U64 = (1 << 64) - 1
S32_MAX = (1 << 31) - 1
S32_MIN = -(1 << 31)

# The read-only counter files (every other file is a tunable); kernel.counters() reads these.
COUNTER_FILES = frozenset(
    {
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
    }
)


def _err(code: int) -> OSError:
    return OSError(code, os.strerror(code))


def _strip_nl(s: str) -> str:
    return s[:-1] if s.endswith("\n") else s


def _kstrtoull(s: str) -> int:
    """lib/kstrtox.c, base 10: optional '+', digits, one optional trailing newline."""
    s = _strip_nl(s)
    if s.startswith("+"):
        s = s[1:]
    if not s or not s.isascii() or not s.isdigit():
        raise _err(errno.EINVAL)
    v = int(s)
    if v > U64:
        raise _err(errno.ERANGE)
    return v


def _kstrtoll(s: str) -> int:
    t = _strip_nl(s)
    if t.startswith("-"):
        v = -_kstrtoull(t[1:] + "\n") if t[1:2] != "+" else None
        if v is None:
            raise _err(errno.EINVAL)
        if v < -(1 << 63):
            raise _err(errno.ERANGE)
        return v
    v = _kstrtoull(t)
    if v > (1 << 63) - 1:
        raise _err(errno.ERANGE)
    return v


def _uint(s: str) -> int:
    v = _kstrtoull(s)
    if v > U32:
        raise _err(errno.ERANGE)
    return v


def _int(s: str) -> int:
    v = _kstrtoll(s)
    if v > S32_MAX or v < S32_MIN:
        raise _err(errno.ERANGE)
    return v


def _einval(fn: object, s: str) -> int:
    """Parse, mapping every parse error to EINVAL (what most *_store functions do)."""
    try:
        return fn(s)  # type: ignore[operator, no-any-return]
    except OSError:
        raise _err(errno.EINVAL) from None


def kstrtobool(s: str) -> bool:
    """lib/kstrtox.c kstrtobool: looks at the first one or two characters only."""
    c0 = s[:1]
    if c0 in ("e", "E", "y", "Y", "t", "T", "1"):
        return True
    if c0 in ("d", "D", "f", "F", "n", "N", "0"):
        return False
    if c0 in ("o", "O"):
        c1 = s[1:2]
        if c1 in ("n", "N"):
            return True
        if c1 in ("f", "F"):
            return False
    raise _err(errno.EINVAL)


class Sysfs:
    """k.sysfs.read(name) / k.sysfs.write(name, value)."""

    def __init__(self, kernel: Kernel) -> None:
        self.k = kernel

    def files(self) -> tuple[str, ...]:
        """The file names this profile has."""
        return self.k.profile.files

    def _check(self, name: str) -> None:
        if name not in self.k.profile.files:
            raise FileNotFoundError(errno.ENOENT, f"no such KSM file: {name}", name)

    def read(self, name: str) -> str:
        """The text the kernel file reads, e.g. "100\\n"."""
        self._check(name)
        k = self.k
        a = k.advisor
        if name == "advisor_mode":
            text = "none [scan-time]" if a.mode == "scan-time" else "[none] scan-time"
            return text + "\n"
        values: dict[str, int] = {
            "run": k.run,
            "pages_to_scan": k.pages_to_scan,
            "sleep_millisecs": k.sleep_millisecs,
            "merge_across_nodes": k.merge_across_nodes,
            "use_zero_pages": int(k.use_zero_pages),
            "max_page_sharing": k.max_page_sharing,
            "stable_node_chains_prune_millisecs": k.stable_node_chains_prune_millisecs,
            "smart_scan": int(k.smart_scan),
            "advisor_max_cpu": a.max_cpu & U32,
            "advisor_min_pages_to_scan": a.min_pages,
            "advisor_max_pages_to_scan": a.max_pages,
            "advisor_target_scan_time": a.target,
            "pages_shared": k.pages_shared,
            "pages_sharing": k.pages_sharing,
            "pages_unshared": k.pages_unshared,
            "pages_volatile": k.pages_volatile,
            "pages_scanned": k.pages_scanned,
            "pages_skipped": k.pages_skipped,
            "full_scans": k.seqnr,
            "stable_node_chains": k.stable_node_chains,
            "stable_node_dups": k.stable_node_dups,
            "ksm_zero_pages": k.ksm_zero_pages,
            "general_profit": k.general_profit,
        }
        return f"{values[name]}\n"

    def write(self, name: str, value: object) -> None:
        """Store like the kernel's *_store; refusals raise OSError(errno)."""
        self._check(name)
        if name in COUNTER_FILES:
            raise PermissionError(errno.EACCES, f"{name} is read-only", name)
        s = str(int(value)) if isinstance(value, bool) else str(value)
        if s == "":
            return  # a zero-length write never reaches the store function
        getattr(self, "_w_" + name)(s)

    # -- stores ---------------------------------------------------------------------------------
    def _w_run(self, s: str) -> None:
        k = self.k
        flags = _einval(_uint, s)
        if flags > 2:
            raise _err(errno.EINVAL)
        if k.run != flags:
            k.run = flags
            if flags & 2:
                k.unmerge_all()
        if flags & 1 and k._next_batch_ns is None:
            k._next_batch_ns = k.now_ns

    def _w_pages_to_scan(self, s: str) -> None:
        k = self.k
        if k.advisor.mode != "none":
            raise _err(errno.EINVAL)
        k.pages_to_scan = _einval(_uint, s)

    def _w_sleep_millisecs(self, s: str) -> None:
        k = self.k
        old, k.sleep_millisecs = k.sleep_millisecs, _einval(_uint, s)
        # ksmd sleeps until the value differs from the one it went to sleep with.
        if k._next_batch_ns is not None and k.sleep_millisecs != old:
            k.wake_ksmd()

    def _busy_change(self) -> None:
        from ksm_model import stable

        if self.k.pages_shared or stable.remove_all(self.k):
            raise _err(errno.EBUSY)

    def _w_merge_across_nodes(self, s: str) -> None:
        knob = _kstrtoull(s)
        if knob > 1:
            raise _err(errno.EINVAL)
        if self.k.merge_across_nodes != knob:
            self._busy_change()
            self.k.merge_across_nodes = knob

    def _w_max_page_sharing(self, s: str) -> None:
        knob = _int(s)
        if knob < 2:
            raise _err(errno.EINVAL)
        if self.k.max_page_sharing != knob:
            self._busy_change()
            self.k.max_page_sharing = knob
            self.k.stable_gen += 1

    def _w_use_zero_pages(self, s: str) -> None:
        self.k.use_zero_pages = kstrtobool(s)

    def _w_smart_scan(self, s: str) -> None:
        self.k.smart_scan = kstrtobool(s)

    def _w_stable_node_chains_prune_millisecs(self, s: str) -> None:
        self.k.stable_node_chains_prune_millisecs = _einval(_uint, s)

    def _w_advisor_mode(self, s: str) -> None:
        k = self.k
        t = _strip_nl(s)
        if t not in ("none", "scan-time"):
            raise _err(errno.EINVAL)
        if t != k.advisor.mode:
            k.advisor.mode = t
            if t == "none":
                k.pages_to_scan = 100
            else:
                k.advisor.reset()
                k.pages_to_scan = k.advisor.min_pages & U32

    def _w_advisor_max_cpu(self, s: str) -> None:
        self.k.advisor.max_cpu = _einval(_kstrtoull, s) & U32  # stored as unsigned int

    def _w_advisor_min_pages_to_scan(self, s: str) -> None:
        self.k.advisor.min_pages = _einval(_kstrtoull, s)

    def _w_advisor_max_pages_to_scan(self, s: str) -> None:
        self.k.advisor.max_pages = _einval(_kstrtoull, s)

    def _w_advisor_target_scan_time(self, s: str) -> None:
        v = _einval(_kstrtoull, s)
        if v < 1:
            raise _err(errno.EINVAL)
        self.k.advisor.target = v
