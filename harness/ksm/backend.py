"""The one seam: every consumer talks to KSM through KsmBackend.

BackendBase holds everything that does not depend on where the files live (parsing, validation,
write order, the unmerge guard, save/restore, LTP-style reads); a concrete backend supplies
only file access and a clock. The choice kernel/model is made once, when the backend is built.
"""

from __future__ import annotations

import errno
import signal
import time
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from types import FrameType
from typing import Protocol, runtime_checkable

from harness.errors import (
    KsmBusy,
    KsmPermissionDenied,
    KsmReadError,
    KsmWriteRefused,
    ScanTimeout,
    UnmergeGuard,
)
from harness.ksm.tunables import validate
from harness.ksm.types import (
    COUNTER_NAMES,
    PAGE_SIZE,
    TUNABLE_NAMES,
    Counters,
    KsmStat,
    Sample,
    Tunables,
)


@runtime_checkable
class KsmBackend(Protocol):
    """Read and drive one KSM instance: a real kernel, the model, or a remote host."""

    source: str  # "kernel" or "model": the Prometheus `source` label
    page_size: int

    def read_field(self, name: str) -> int | str | None: ...
    def read_counters(self) -> Counters: ...
    def read_tunables(self) -> Tunables: ...
    def write_tunables(self, *, force: bool = False, **values: object) -> None: ...
    def saved(self) -> AbstractContextManager[Tunables]: ...
    def wait_full_scans(self, delta: int, timeout: float) -> int: ...
    def frozen_sample(self) -> Sample: ...
    def ksm_stat(self, pid: int) -> KsmStat: ...


def parse_advisor_mode(text: str) -> str:
    """'[none] scan-time' -> 'none' (the kernel brackets the selected mode)."""
    for word in text.split():
        if word.startswith("[") and word.endswith("]"):
            return word[1:-1]
    return text.strip()


def parse_ksm_stat(pid: int, text: str) -> KsmStat:
    """Parse /proc/PID/ksm_stat: 'name value' lines, yes/no for the two flags."""
    values: dict[str, int | bool] = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        name = name.rstrip(":")
        value = value.strip()
        if value in ("yes", "no"):
            values[name] = value == "yes"
        elif value.lstrip("-").isdigit():
            values[name] = int(value)
    return KsmStat(
        pid=pid,
        rmap_items=_int_or_none(values.get("ksm_rmap_items")),
        zero_pages=_int_or_none(values.get("ksm_zero_pages")),
        merging_pages=_int_or_none(values.get("ksm_merging_pages")),
        process_profit=_int_or_none(values.get("ksm_process_profit")),
        merge_any=_bool_or_none(values.get("ksm_merge_any")),
        mergeable=_bool_or_none(values.get("ksm_mergeable")),
    )


def _int_or_none(v: int | bool | None) -> int | None:
    return None if v is None or isinstance(v, bool) else v


def _bool_or_none(v: int | bool | None) -> bool | None:
    return v if isinstance(v, bool) else None


class BackendBase:
    """Shared behaviour; subclasses implement _read, _write, _sleep, _mem_available, ksm_stat."""

    source = "kernel"
    page_size = PAGE_SIZE
    # How long a frozen read may wait for a full scan, in backend seconds.
    poll_interval = 0.01

    # -- primitives a subclass provides ------------------------------------------------------
    def _read(self, name: str) -> str | None:
        """Text of one KSM file, or None when this kernel has no such file."""
        raise NotImplementedError

    def _write(self, name: str, text: str) -> None:
        """Write one KSM file; raise OSError with the kernel's errno on refusal."""
        raise NotImplementedError

    def _sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    def _now(self) -> float:
        return time.monotonic()

    def _mem_available(self) -> int | None:
        """Bytes of MemAvailable, or None when unknown (the guard then does not apply)."""
        return None

    def ksm_stat(self, pid: int) -> KsmStat:
        raise NotImplementedError

    # -- reading ---------------------------------------------------------------------------
    def _read_text(self, name: str) -> str | None:
        try:
            return self._read(name)
        except OSError as exc:
            raise KsmReadError(f"cannot read KSM file {name}: {exc.strerror or exc}") from None

    def _read_int(self, name: str) -> int | None:
        text = self._read_text(name)
        if text is None:
            return None
        try:
            return int(text.strip())
        except ValueError:
            raise KsmReadError(f"KSM file {name} holds {text.strip()!r}, not a number") from None

    def read_field(self, name: str) -> int | str | None:
        """One counter or tunable, parsed; None when absent; KsmReadError when unreadable.

        The exporter reads field by field so one unreadable file costs one series, not a scrape.
        """
        if name == "advisor_mode":
            text = self._read_text(name)
            return None if text is None else parse_advisor_mode(text)
        return self._read_int(name)

    def read_counters(self) -> Counters:
        return Counters(**{name: self._read_int(name) for name in COUNTER_NAMES})

    def read_tunables(self) -> Tunables:
        values = {name: self.read_field(name) for name in TUNABLE_NAMES}
        return Tunables(**values)  # type: ignore[arg-type]

    # -- writing ---------------------------------------------------------------------------
    def write_tunables(self, *, force: bool = False, **values: object) -> None:
        """Validate all values, then write them in a safe order.

        Nothing is written when any value is invalid, unknown or absent on this kernel, or
        when run=2 would need more memory than is available (unless force).
        """
        self.apply(values, force=force)

    def apply(self, values: Mapping[str, object], *, force: bool = False) -> None:
        """write_tunables with the values as a mapping."""
        ordered = validate(dict(values))
        current = self.read_tunables()
        missing = [n for n in ordered if getattr(current, n) is None]
        if missing:
            raise KsmWriteRefused(
                f"{missing[0]}: this kernel has no such KSM file",
                hint="`ksmh status` lists the tunables this kernel has",
            )
        if ordered.get("run") == 2 and current.run != 2 and not force:
            self._check_unmerge_memory()
        for name, value in ordered.items():
            if getattr(current, name) == value and name != "run":
                continue  # an unchanged knob is never rewritten (and cannot EBUSY)
            self._write_one(name, value, current)
            if name == "advisor_mode":
                # The kernel resets pages_to_scan when the mode changes (to 100, or to the
                # advisor's minimum): what "unchanged" means for it must be read again.
                current = self.read_tunables()

    def _write_one(self, name: str, value: int | str, current: Tunables) -> None:
        try:
            self._write(name, str(value))
        except OSError as exc:
            raise self._refusal(name, value, exc, current) from None

    def _refusal(self, name: str, value: object, exc: OSError, cur: Tunables) -> KsmWriteRefused:
        code = exc.errno
        if code in (errno.EACCES, errno.EPERM, errno.EROFS):
            return KsmPermissionDenied(
                f"{name}: permission denied writing KSM tunables",
                hint="run as root (sysfs KSM knobs are root-only)",
                errno=code,
            )
        if code == errno.EBUSY:
            return KsmBusy(
                f"{name}: the kernel refused ({errno.errorcode[code]}): pages are merged",
                hint="unmerge first with `ksmh set run=2`, then set it, then `ksmh set run=1`",
                errno=code,
            )
        if name == "pages_to_scan" and cur.advisor_mode == "scan-time":
            return KsmWriteRefused(
                "pages_to_scan: the kernel refused it while advisor_mode is scan-time",
                hint="the advisor sets pages_to_scan itself; `ksmh set advisor_mode=none` first",
                errno=code,
            )
        text = errno.errorcode.get(code or 0, str(code))
        return KsmWriteRefused(f"{name}={value}: the kernel refused it ({text})", errno=code)

    def _check_unmerge_memory(self) -> None:
        counters = self.read_counters()
        need = (counters.pages_sharing or 0) * self.page_size
        avail = self._mem_available()
        if avail is not None and need > avail:
            raise UnmergeGuard(
                f"run=2 could need {need // 2**20} MiB of new memory at once "
                f"({counters.pages_sharing} sharing pages) but MemAvailable is "
                f"{avail // 2**20} MiB",
                hint="free memory first, or pass --force to unmerge anyway",
            )

    # -- save / restore --------------------------------------------------------------------
    @contextmanager
    def saved(self) -> Iterator[Tunables]:
        """Restore every tunable on exit, also on exceptions, SIGINT and SIGTERM.

        SIGTERM is turned into KeyboardInterrupt for the duration, so the finally clause runs
        for it exactly as for Ctrl-C.
        """
        before = self.read_tunables()
        previous = _install_sigterm()
        try:
            yield before
        finally:
            try:
                self.restore(before)
            finally:
                _restore_sigterm(previous)

    def restore(self, before: Tunables) -> None:
        """Bring every knob back to `before`; run last, after a run=2 if EBUSY forces one."""
        # Every knob is passed: apply() skips the ones already right, and re-reads after an
        # advisor_mode change, which resets pages_to_scan behind our back.
        want = {k: v for k, v in before.present().items() if k != "run"}
        try:
            self.apply(want)
        except KsmBusy:
            # max_page_sharing / merge_across_nodes can only go back once nothing is merged.
            self.apply({"run": 2}, force=True)
            self.apply(want)
        if before.run is not None and self.read_tunables().run != before.run:
            self.write_tunables(run=before.run, force=True)

    # -- scans -----------------------------------------------------------------------------
    def wait_full_scans(self, delta: int, timeout: float) -> int:
        """Block until full_scans has grown by delta; return the new value."""
        start = self._read_int("full_scans")
        if start is None:
            raise ScanTimeout("this kernel has no full_scans counter")
        target = start + delta
        deadline = self._now() + timeout
        value = start
        while value < target:
            if self._now() >= deadline:
                raise ScanTimeout(
                    f"ksmd made {value - start} of {delta} full scans in {timeout:g} s",
                    hint="is run=1? raise pages_to_scan or lower sleep_millisecs",
                )
            self._sleep(self.poll_interval)
            value = self._read_int("full_scans") or 0
        return value

    def frozen_sample(self) -> Sample:
        """Counters read with ksmd paused (run=0) so they are one end-of-batch state.

        Writing run=0 takes ksmd's mutex, so it returns only after the batch in progress ends.
        The previous run value is restored afterwards and reported in the sample.
        """
        tunables = self.read_tunables()
        paused = tunables.run == 1
        if paused:
            self._write("run", "0")
        try:
            counters = self.read_counters()
            now = self._now()
        finally:
            if paused:
                self._write("run", "1")
        return Sample(counters=counters, tunables=tunables, time=now)


_SigHandler = signal.Handlers | int | None


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _install_sigterm() -> object:
    try:
        return signal.signal(signal.SIGTERM, _raise_interrupt)
    except ValueError:  # not the main thread: only the main thread may set handlers
        return None


def _restore_sigterm(previous: object) -> None:
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)  # type: ignore[arg-type]
