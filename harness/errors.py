"""The harness's exception tree.

Every error a user can cause or meet carries a one-line message and, where there is one, a hint
for what to do next; the CLI prints exactly those two and exits 2, never a traceback.
"""

from __future__ import annotations


class HarnessError(Exception):
    """Base of every error the harness raises on purpose."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class KsmUnavailable(HarnessError):
    """The requested KSM backend cannot be used on this host (absent, read-only, not yet built)."""


class KsmReadError(HarnessError):
    """A KSM file exists but could not be read or parsed."""


class KsmWriteRefused(HarnessError):
    """A tunable write was refused, by our own range check or by the kernel."""

    def __init__(self, message: str, hint: str | None = None, errno: int | None = None) -> None:
        super().__init__(message, hint)
        self.errno = errno


class KsmPermissionDenied(KsmWriteRefused):
    """Writing /sys/kernel/mm/ksm needs root (EACCES/EPERM)."""


class KsmBusy(KsmWriteRefused):
    """EBUSY: merge_across_nodes / max_page_sharing changed while pages are merged."""


class UnmergeGuard(HarnessError):
    """run=2 refused: unmerging could need more memory than MemAvailable."""


class RestoreIncomplete(HarnessError):
    """Some KSM knobs could not be brought back to their saved values."""


class ScanTimeout(HarnessError):
    """ksmd did not complete the requested number of full scans in time."""


class GuestBootTimeout(HarnessError):
    """A guest did not report ready before its deadline."""


class GuestError(HarnessError):
    """A guest or its agent failed (crashed, answered an error, protocol violation)."""


class AccelUnavailable(HarnessError):
    """The requested accelerator (kvm) cannot run a guest on this host."""


class PlaybookError(HarnessError):
    """A playbook file is invalid; the message names file, line and field."""


class RemoteCommandFailed(HarnessError):
    """A command on a remote host failed or the host was unreachable."""


class CommandFailed(HarnessError):
    """A local subprocess exited non-zero."""

    def __init__(
        self, message: str, hint: str | None = None, returncode: int = 1, stderr: str = ""
    ) -> None:
        super().__init__(message, hint)
        self.returncode = returncode
        self.stderr = stderr
