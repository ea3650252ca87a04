"""ksm_model: a counter-exact pure-Python model of the Linux kernel's KSM (mm/ksm.c).

No I/O and no dependencies. Entry point: ``Kernel``; see kernel.py, process.py, scanner.py.
"""

from ksm_model.kernel import Kernel
from ksm_model.process import (
    MADV_DONTNEED,
    MADV_HUGEPAGE,
    MADV_MERGEABLE,
    MADV_NOHUGEPAGE,
    MADV_UNMERGEABLE,
    Process,
)
from ksm_model.profiles import PROFILES, Profile

__all__ = [
    "MADV_DONTNEED",
    "MADV_HUGEPAGE",
    "MADV_MERGEABLE",
    "MADV_NOHUGEPAGE",
    "MADV_UNMERGEABLE",
    "PROFILES",
    "Kernel",
    "Process",
    "Profile",
]
