"""Transparent huge pages for the QEMU processes we start: prctl(PR_SET_THP_DISABLE).

The flag belongs to this process and is inherited across fork and exec, so setting it while a
fleet boots makes every QEMU the qemu backend starts run with THP off (QEMU advises guest RAM
MADV_HUGEPAGE, and on 6.18 zero-filled THP subpages never merge). libvirtd starts its own
QEMUs, which do not inherit it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Iterator
from contextlib import contextmanager

PR_SET_THP_DISABLE = 41
PR_GET_THP_DISABLE = 42


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None


def thp_disabled() -> bool | None:
    """Whether THP is disabled for this process (None when prctl cannot tell)."""
    libc = _libc()
    if libc is None:
        return None
    value = int(libc.prctl(PR_GET_THP_DISABLE, 0, 0, 0, 0))
    return None if value < 0 else value == 1


def set_thp_disable(disable: bool) -> bool:
    """prctl(PR_SET_THP_DISABLE) on this process; False when not available (not Linux)."""
    libc = _libc()
    return libc is not None and int(libc.prctl(PR_SET_THP_DISABLE, int(disable), 0, 0, 0)) == 0


@contextmanager
def thp_off_for_children(off: bool = True) -> Iterator[None]:
    """THP disabled while the block runs (when `off`), then back to what it was."""
    before = thp_disabled() if off else None
    changed = off and before is False and set_thp_disable(True)
    try:
        yield
    finally:
        if changed:
            set_thp_disable(False)
