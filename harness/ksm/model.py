"""ModelBackend: the one adapter between the harness and ksm_model (source="model").

Everything in the harness that runs the model goes through it: the `ksm` fixture and the CLI
(as a KsmBackend), the differential scenario runner (processes driven through `kernel`), the
playbook runner's model side and the exporter's twin (fed by shadow capture). It owns the
Kernel, turns harness options into model settings, and reads the model in harness types.

File access goes to the model's sysfs view; sleeping advances the model's virtual clock (so
wait_full_scans and frozen_sample run ksmd in virtual time, instantly); ksm_stat reads the
model process with that pid.
"""

from __future__ import annotations

from typing import Any

from ksm_model import Kernel
from ksm_model.hostprobe import HostSettings, probe

from harness.errors import HarnessError
from harness.ksm.backend import BackendBase
from harness.ksm.types import COUNTER_NAMES, TUNABLE_NAMES, KsmStat
from harness.record import StatValue, stat_record


def host_settings(profile: object) -> HostSettings | None:
    """For profile "host": the running kernel's settings the model takes (CONFIG_HZ,
    CONFIG_PT_RECLAIM, THP mode and use_zero_page, ksmd's CPU time); None for a fixed profile."""
    return probe() if profile == "host" else None


class ModelBackend(BackendBase):
    """The model's KSM. Pass a Kernel to share one with a workload; else one is made from
    `profile` ("6.13", "6.12", "6.11", "6.1", or "host": the running kernel's) and further
    Kernel options.

    profile="host" models the running kernel as it is set up (ksm_model.hostprobe): its
    CONFIG_HZ (time in jiffies), CONFIG_PT_RECLAIM, THP mode and use_zero_page, and ksmd's
    CPU time so far (the scan-time advisor's first step counts it); explicit options win.
    """

    source = "model"

    def __init__(self, kernel: Kernel | None = None, *, profile: str = "6.11", **options: Any):
        if kernel is None:
            host = host_settings(profile)
            if host is not None:
                options = {**host.kernel_args(), **options}
            try:
                kernel = Kernel(profile=profile, **options)
            except (TypeError, ValueError) as exc:
                raise HarnessError(f"cannot build the model: {exc}") from None
            if host is not None and host.ksmd_runtime_ns is not None:
                kernel.ksmd_runtime_ns = host.ksmd_runtime_ns
        self.kernel = kernel
        self.page_size = kernel.page_size

    @property
    def profile(self) -> str:
        return str(getattr(self.kernel.profile, "name", self.kernel.profile))

    # -- BackendBase primitives -------------------------------------------------------------
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

    def registered(self) -> int | None:
        return len(self.kernel.mm_list)

    # -- what the runners use -----------------------------------------------------------------
    def stat_record(self, pid: int) -> dict[str, StatValue]:
        """ksm_stat of a model process in the record format (harness.record)."""
        return stat_record(self.ksm_stat(pid))

    def counters(self) -> dict[str, int]:
        """Every counter this profile has, as ints."""
        return self.read_counters().present()

    def files(self) -> dict[str, str]:
        """The text of every counter and tunable file the profile has (for snapshots)."""
        out = {}
        for name in (*COUNTER_NAMES, *TUNABLE_NAMES):
            text = self._read(name)
            if text is not None:
                out[name] = text
        return out

    def ksmd_would_run(self) -> bool:
        return self.kernel.run == 1 and self.kernel.ksmd_should_run()

    def step(self, scans: int) -> int:
        """Make `scans` full scans when ksmd would run (run=1, an mm registered, pages_to_scan
        > 0); returns the number made (0 when it would not run)."""
        if scans <= 0 or not self.ksmd_would_run() or self.kernel.pages_to_scan == 0:
            return 0
        self.kernel.run_until(full_scans=self.kernel.full_scans + scans)
        return scans

    def ksmd_cpu_seconds(self) -> float:
        """The model's estimate of ksmd's CPU time so far (virtual)."""
        return float(self.kernel.ksmd_runtime_ns) / 1e9
