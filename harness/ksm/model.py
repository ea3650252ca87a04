"""ModelBackend: the KsmBackend protocol over ksm_model.Kernel (source="model").

File access goes to the model's sysfs view, sleeping advances the model's virtual clock (so
wait_full_scans and frozen_sample run ksmd in virtual time, instantly), and ksm_stat reads
the model process with that pid.
"""

from __future__ import annotations

from ksm_model import Kernel

from harness.errors import HarnessError
from harness.ksm.backend import BackendBase
from harness.ksm.types import KsmStat


class ModelBackend(BackendBase):
    """The model's KSM; pass a Kernel to share one with a workload, else a fresh one."""

    source = "model"

    def __init__(self, kernel: Kernel | None = None) -> None:
        self.kernel = kernel if kernel is not None else Kernel()
        self.page_size = self.kernel.page_size

    def _read(self, name: str) -> str | None:
        try:
            return self.kernel.sysfs.read(name)
        except FileNotFoundError:
            return None

    def _write(self, name: str, text: str) -> None:
        self.kernel.sysfs.write(name, text)  # OSError(errno) propagates, as from the kernel

    def _sleep(self, seconds: float) -> None:
        self.kernel.advance(seconds)

    def _now(self) -> float:
        return self.kernel.now

    def ksm_stat(self, pid: int) -> KsmStat:
        try:
            proc = self.kernel.process(pid)
        except ProcessLookupError:
            raise HarnessError(
                f"no model process with pid {pid}",
                hint="pids come from Kernel.spawn()/fork() of this backend's kernel",
            ) from None
        s = proc.ksm_stat()

        def num(name: str) -> int | None:
            v = s.get(name)
            return None if v is None or isinstance(v, bool) else v

        def flag(name: str) -> bool | None:
            v = s.get(name)
            return v if isinstance(v, bool) else None

        return KsmStat(
            pid=pid,
            rmap_items=num("ksm_rmap_items"),
            zero_pages=num("ksm_zero_pages"),
            merging_pages=num("ksm_merging_pages"),
            process_profit=num("ksm_process_profit"),
            merge_any=flag("ksm_merge_any"),
            mergeable=flag("ksm_mergeable"),
        )
