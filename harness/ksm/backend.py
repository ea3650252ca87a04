"""The one seam: every consumer talks to KSM through KsmBackend.

BackendBase holds everything that does not depend on where the files live (parsing, validation,
write order, the unmerge guard, save/restore, LTP-style reads); a concrete backend supplies
only file access and a clock. The choice kernel/model is made once, when the backend is built.
"""

from __future__ import annotations

import errno
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from typing import Protocol, runtime_checkable

from harness.console import plural
from harness.errors import (
    KsmBusy,
    KsmPermissionDenied,
    KsmReadError,
    KsmWriteRefused,
    RestoreIncomplete,
    ScanTimeout,
    UnmergeGuard,
)
from harness.ksm.tunables import WRITE_ORDER, validate
from harness.ksm.types import (
    COUNTER_NAMES,
    PAGE_SIZE,
    TUNABLE_NAMES,
    Counters,
    KsmStat,
    Sample,
    Tunables,
)
from harness.signals import shielded, signals_as_interrupt
from harness.waiting import wait_until


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
        """write_tunables with the values as a mapping: all of them, or none.

        Before anything is written every value is parsed and checked against the kernel's
        current state (the advisor owning pages_to_scan, EBUSY knobs while pages are merged,
        the unmerge memory guard); if the kernel still refuses one write, the ones already
        made are undone.
        """
        ordered = validate(dict(values))
        current = self.read_tunables()
        missing = [n for n in ordered if getattr(current, n) is None]
        if missing:
            raise KsmWriteRefused(
                f"{missing[0]}: this kernel has no such KSM file",
                hint="`ksmh status` lists the tunables this kernel has",
                errno=errno.ENOENT,
            )
        self._precheck(ordered, current)
        before = current
        if ordered.get("run") == 2 and current.run != 2 and not force:
            self._check_unmerge_memory()
        wrote = False
        try:
            for name, value in ordered.items():
                if getattr(current, name) == value and name != "run":
                    continue  # an unchanged knob is never rewritten (and cannot EBUSY)
                self._write_one(name, value, current)
                wrote = True
                if name == "advisor_mode":
                    # The kernel resets pages_to_scan when the mode changes (to 100, or to the
                    # advisor's minimum): what "unchanged" means for it must be read again.
                    current = self.read_tunables()
        except KsmWriteRefused:
            if wrote:
                self.restore(before)  # all or nothing: undo what was written
            raise

    def _precheck(self, ordered: Mapping[str, int | str], cur: Tunables) -> None:
        """Refuse, before writing anything, what the kernel would refuse in its current state."""
        mode = ordered.get("advisor_mode", cur.advisor_mode)
        if (
            "pages_to_scan" in ordered
            and mode == "scan-time"
            and (cur.advisor_mode != "scan-time" or ordered["pages_to_scan"] != cur.pages_to_scan)
        ):
            raise KsmWriteRefused(
                "pages_to_scan: the kernel refuses it while advisor_mode is scan-time",
                hint="the advisor sets pages_to_scan itself; set advisor_mode=none first",
                errno=errno.EINVAL,
            )
        busy = [
            n
            for n in ("merge_across_nodes", "max_page_sharing")
            if n in ordered and ordered[n] != getattr(cur, n)
        ]
        if busy:
            shared = self.read_counters().pages_shared
            if shared:
                raise KsmBusy(
                    f"{busy[0]}: the kernel refuses changes while pages are merged "
                    f"(pages_shared {shared})",
                    hint="unmerge first with `ksmh set run=2`, then set it, then `ksmh set run=1`",
                    errno=errno.EBUSY,
                )

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
        """Restore every tunable on exit, also on exceptions, SIGINT, SIGTERM and SIGHUP.

        SIGTERM and SIGHUP raise KeyboardInterrupt inside, so the restore runs for them as for
        Ctrl-C; a second signal during the restore is held until it is done. A restore that
        could not bring everything back raises RestoreIncomplete (unless another exception is
        already on its way), naming each knob.
        """
        before = self.read_tunables()
        try:
            with signals_as_interrupt():
                yield before
        finally:
            with shielded():
                problems = self.restore(before)
            if problems and sys.exc_info()[0] is None:
                raise RestoreIncomplete(
                    "KSM knobs not restored: " + "; ".join(problems),
                    hint="`ksmh status` shows them; `ksmh recover` retries",
                )

    def restore(self, before: Tunables) -> list[str]:
        """Bring every knob back to `before`, best effort and complete.

        Each knob is tried on its own, in the safe order, so one refused write (e.g.
        pages_to_scan while the host's advisor is in scan-time mode) does not stop the others;
        EBUSY knobs are retried after a run=2; `run` is written last. Returns one line per knob
        that could not be restored (empty when everything is back).
        """
        want = {k: v for k, v in before.present().items() if k != "run"}
        if want.get("advisor_mode") == "scan-time":
            want.pop("pages_to_scan", None)  # the advisor owns it: no value to go back to
        problems: dict[str, str] = {}
        busy = []
        for name in WRITE_ORDER:
            if name not in want:
                continue
            try:
                if self.read_field(name) != want[name]:
                    self._write_one(name, want[name], self.read_tunables())
            except KsmBusy:
                busy.append(name)
            except (KsmWriteRefused, KsmReadError) as exc:
                problems[name] = exc.message
        if busy:
            try:
                self._write_one("run", 2, self.read_tunables())
                for name in busy:
                    self._write_one(name, want[name], self.read_tunables())
            except (KsmWriteRefused, KsmReadError) as exc:
                for name in busy:
                    problems.setdefault(name, exc.message)
        if before.run is not None:
            try:
                if self.read_field("run") != before.run:
                    self._write_one("run", before.run, self.read_tunables())
            except (KsmWriteRefused, KsmReadError) as exc:
                problems["run"] = exc.message
        return [f"{n}: not restored to {before.as_dict()[n]!r} ({m})" for n, m in problems.items()]

    # -- scans -----------------------------------------------------------------------------
    def wait_full_scans(self, delta: int, timeout: float) -> int:
        """Block until full_scans has grown by delta; return the new value."""
        start = self._read_int("full_scans")
        if start is None:
            raise ScanTimeout("this kernel has no full_scans counter")
        seen = [start]

        def grown() -> bool:
            seen[0] = self._read_int("full_scans") or 0
            return seen[0] >= start + delta

        def timeout_error() -> ScanTimeout:
            return ScanTimeout(
                f"ksmd made {seen[0] - start} of {delta} full scans in {timeout:g} s",
                hint=self._scan_hint(),
            )

        wait_until(
            grown,
            timeout,
            interval=self.poll_interval,
            error=timeout_error,
            clock=self._now,
            sleep=self._sleep,
        )
        return seen[0]

    def _scan_hint(self) -> str:
        """Why ksmd may not be completing scans, from what this backend can see."""
        t = self.read_tunables()
        if t.run != 1:
            return f"ksmd is not running (run={t.run}): `ksmh set run=1`"
        if t.pages_to_scan == 0:
            return "pages_to_scan is 0: ksmd scans nothing; `ksmh set pages_to_scan=100`"
        users = self.registered()
        if users == 0:
            return (
                "no process is registered with KSM: nothing scans without mergeable memory "
                "(madvise MADV_MERGEABLE, or boot a guest)"
            )
        who = (
            ""
            if users is None
            else f"{plural(users, 'process')} {'is' if users == 1 else 'are'} registered; "
        )
        return f"{who}raise pages_to_scan or lower sleep_millisecs to scan faster"

    def registered(self) -> int | None:
        """How many processes KSM scans or still counts pages of, when the backend can tell
        (None: it cannot, e.g. without root other users' processes are not visible)."""
        return None

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
