"""KSM backends behind one protocol: the real kernel (sysfs), the model, remote hosts."""

from harness.ksm.backend import BackendBase, KsmBackend
from harness.ksm.sysfs import SysfsBackend
from harness.ksm.types import Counters, Derived, KsmStat, Sample, Tunables, derive

__all__ = [
    "BackendBase",
    "Counters",
    "Derived",
    "KsmBackend",
    "KsmStat",
    "Sample",
    "SysfsBackend",
    "Tunables",
    "derive",
]
