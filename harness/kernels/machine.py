"""One guest of a given installed Debian kernel, ready to run differential scenarios.

    with matrix_guest("6.1.0-57-amd64") as g:
        series = g.runner().run(scenario)      # harness.kernels.guest.GuestRunner
        g.release, g.files, g.thp               # what the guest's kernel says about itself

The guest is the busybox image of that release (harness.guests.image, kernel + matching
modules in its initramfs), booted through Fleet(spec) like any other guest, with mem_merge off:
the host's KSM never sees its RAM, so no host lock is needed. Like every run's fleet it is
journaled (harness.recovery.run_session, no knobs): if the check is SIGKILLed, `ksmh recover`
(or the next run that takes the host lock) stops the guest. It has 1 GiB of RAM because a
kernel with less than 512 MiB turns transparent huge pages off at boot (hugepage_init), and
THP scenarios need them; only the memory the guest touches costs host memory.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from harness.errors import GuestError
from harness.guests.agent import AgentClient
from harness.guests.fleet import Fleet
from harness.guests.image import ensure_image
from harness.guests.spec import FleetSpec
from harness.journal import FleetEntry
from harness.kernels.guest import GuestKsm, GuestRunner, unescape

MEMORY_MIB = 1024
THP_ROOT = "/sys/kernel/mm/transparent_hugepage"
# khugepaged collapses small pages back into huge pages on its own schedule, which the model
# does not follow (harness.thp on the host): in the guest it is held off for good.
KHUGEPAGED_PIN_MS = "86400000"


@dataclass
class MatrixGuest:
    """A booted guest: its agent, kernel release and KSM."""

    client: AgentClient
    release: str
    page_size: int
    boot_seconds: float
    ksm: GuestKsm = field(init=False)

    def __post_init__(self) -> None:
        self.ksm = GuestKsm(self.client, self.page_size)

    def read(self, path: str) -> str | None:
        """A small file of the guest (None when it cannot be read)."""
        try:
            return unescape(self.client.call("readfile", path).fields["data"])
        except GuestError:
            return None

    def write(self, path: str, value: str) -> None:
        self.client.call("writefile", path, value)

    @property
    def files(self) -> dict[str, str]:
        """NAME -> text of every file in the guest's /sys/kernel/mm/ksm."""
        return self.ksm.files()

    @property
    def thp(self) -> str:
        """The guest's transparent_hugepage/enabled mode ("never" without THP)."""
        text = self.read(f"{THP_ROOT}/enabled") or ""
        start, end = text.find("["), text.find("]")
        return text[start + 1 : end] if 0 <= start < end else "never"

    def runner(self, **kw: object) -> GuestRunner:
        """A scenario runner on this guest's KSM (KernelRunner options as keywords)."""
        return GuestRunner(self.ksm, **kw)  # type: ignore[arg-type]


@contextmanager
def matrix_guest(
    release: str, memory_mib: int = MEMORY_MIB, say: Callable[[str], None] | None = None
) -> Iterator[MatrixGuest]:
    """Boot one guest of kernel `release`; torn down (QEMU stopped, files removed) on exit."""
    from harness.recovery import run_session

    image = ensure_image(release=release)
    spec = FleetSpec(count=1, memory_mib=memory_mib, mem_merge=False, concurrency=1)
    t0 = time.monotonic()
    fleet = Fleet(spec, image=image, progress=False)
    echo = say or (lambda s: print(s, file=sys.stderr, flush=True))
    with run_session(None, f"kernels-{fleet.run_id}", "kernels", echo=echo, take_lock=False) as j:
        if j is not None:
            j.add_fleet(
                FleetEntry(
                    run_id=fleet.run_id,
                    backend=str(fleet.backend.name),
                    uri=spec.uri,
                    runtime_root=str(fleet.run_dir.parent),
                )
            )
        with fleet:
            if j is not None:
                j.set_guests(fleet.run_id, dict(fleet.pids()))
            yield _ready(fleet, release, t0)


def _ready(fleet: Fleet, release: str, t0: float) -> MatrixGuest:
    """The booted guest, checked to run `release`, with khugepaged held off."""
    guest = fleet.guests[0]
    if guest.state != "ready" or guest.client is None:
        raise GuestError(
            f"guest of kernel {release} did not boot: {guest.error}",
            hint=f"see its console log {guest.spec.console_log}",
        )
    got = unescape(guest.client.call("readfile", "/proc/sys/kernel/osrelease").fields["data"])
    if got.strip() != release:
        raise GuestError(f"the guest booted kernel {got.strip()!r}, not {release!r}")
    g = MatrixGuest(guest.client, release, 4096, time.monotonic() - t0)
    if g.read(f"{THP_ROOT}/khugepaged/scan_sleep_millisecs") is not None:
        g.write(f"{THP_ROOT}/khugepaged/scan_sleep_millisecs", KHUGEPAGED_PIN_MS)
    return g
