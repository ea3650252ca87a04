"""The scan-time advisor (mm/ksm.c scan_time_advisor), on the model's virtual clock."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ksm_model.kernel import Kernel

KSM_ADVISOR_MIN_CPU = 10
EWMA_WEIGHT = 30
ULONG = (1 << 64) - 1


class Advisor:
    """advisor_ctx plus the advisor_* knobs."""

    __slots__ = (
        "change",
        "cpu_time",
        "max_cpu",
        "max_pages",
        "min_pages",
        "mode",
        "scan_time",
        "start_ns",
        "target",
    )

    def __init__(self) -> None:
        self.mode = "none"
        self.max_cpu = 70
        self.min_pages = 500
        self.max_pages = 30000
        self.target = 200
        self.reset()

    def reset(self) -> None:
        self.start_ns = 0
        self.scan_time = 0
        self.change = 0
        self.cpu_time = 0

    def start_scan(self, k: Kernel) -> None:
        if self.mode == "scan-time":
            self.start_ns = k.now_ns

    def stop_scan(self, k: Kernel) -> None:
        if self.mode == "scan-time":
            self._scan_time_advisor(k)

    def _scan_time_advisor(self, k: Kernel) -> None:
        scan_time = ((k.now_ns - self.start_ns) // 1_000_000) // 1000
        scan_time = scan_time or 1
        cpu_time = k.ksmd_runtime_ns
        diff_ms = ((cpu_time - self.cpu_time) & ULONG) // 1_000_000
        cpu_percent = ((diff_ms * 100) // (scan_time * 1000)) & 0xFFFFFFFF
        cpu_percent = cpu_percent or 1
        last = self.scan_time or scan_time
        factor = (self.target * 100) // scan_time or 1
        change = (scan_time * 100) // last or 1
        change = ((100 - EWMA_WEIGHT) * self.change + EWMA_WEIGHT * change) // 100
        pts = k.pages_to_scan
        pages = (pts * 100) // factor
        pages = (pages * change) // 100
        per = pts // cpu_percent or 1
        pages = min(pages, per * self.max_cpu)
        pages = max(pages, per * KSM_ADVISOR_MIN_CPU)
        pages = min(pages, self.max_pages)
        self.change = change
        self.scan_time = scan_time
        self.cpu_time = cpu_time
        k.pages_to_scan = pages & 0xFFFFFFFF
