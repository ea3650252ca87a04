"""KSM backends behind one protocol: the real kernel (sysfs), the model, remote hosts."""

from __future__ import annotations

from typing import Any

from harness.ksm.backend import BackendBase, KsmBackend
from harness.ksm.sysfs import SysfsBackend
from harness.ksm.types import Counters, Derived, KsmStat, Sample, Tunables, derive

__all__ = [
    "BackendBase",
    "Counters",
    "Derived",
    "KsmBackend",
    "KsmStat",
    "ModelBackend",
    "Sample",
    "SysfsBackend",
    "Tunables",
    "derive",
]


def __getattr__(name: str) -> Any:
    # ModelBackend needs the ksm-model distribution; import it only when asked for, so the
    # kernel side works where the model is not installed (e.g. a prepared remote host).
    if name == "ModelBackend":
        from harness.ksm.model import ModelBackend

        return ModelBackend
    raise AttributeError(f"module 'harness.ksm' has no attribute {name!r}")
