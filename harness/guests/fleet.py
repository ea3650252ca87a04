"""Fleet: N identical guests booted in parallel, driven through their agents, always torn down.

    spec = FleetSpec(count=3, memory_mib=256)          # harness.guests.spec
    with Fleet(spec) as fleet:
        fleet.run("fill", "a", "32M", "byte:0x5a").raise_if_failed()
        pids = fleet.pids()            # guest name -> QEMU PID, for /proc/PID/ksm_stat

Every operation returns a FleetResult (harness.fleet_result) with one MemberResult per guest
(value or error): a partial failure is never hidden. A guest that dies is marked failed and
the others carry on. Teardown runs on normal exit, exceptions, SIGINT and SIGTERM (the context
manager turns SIGTERM/SIGHUP into KeyboardInterrupt), and as an atexit backstop. A fleet can
also be left running (`detach`) and found again from run.json (`Fleet.attach`), which is what
the CLI's `fleet up` / `exec` / `down` do.
"""

from __future__ import annotations

import atexit
import json
import os
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType
from typing import Any

from harness import procfs
from harness.console import BootProgress
from harness.errors import GuestError, HarnessError
from harness.fleet_result import FleetResult, MemberResult
from harness.guests.accel import AccelChoice, resolve_accel
from harness.guests.agent import (
    AgentChannelClosed,
    AgentClient,
    AgentCommandError,
    AgentReply,
    UnixChannel,
)
from harness.guests.backend import (
    RUNTIME_ROOT,
    GuestBackend,
    prepare_runtime_root,
    remove_quietly,
)
from harness.guests.machine import resolve_machine
from harness.guests.spec import NAME_PREFIX, FleetSpec, GuestImage, GuestSpec, parse_kind
from harness.guests.thp import thp_off_for_children
from harness.kinds import AccelKind, GuestBackendKind, ImageKind, MachineKind
from harness.signals import raise_interrupt, signals_as_interrupt

RUN_FILE = "run.json"
REGISTER_TIMEOUT = 10.0  # seconds for a started QEMU to register its RAM with KSM
EXEC_GRACE = 1.0  # seconds a started process may show an empty command line (mid-execve)
SUN_PATH_MAX = 108  # sizeof(sockaddr_un.sun_path) on Linux, the NUL included
# The result of one agent command (or boot) on one guest.
GuestResult = MemberResult[AgentReply]
# Kept for callers that install it themselves (harness.signals.raise_interrupt).
sigterm_to_interrupt = raise_interrupt
AccelResolver = Callable[[AccelKind, GuestImage], AccelChoice]
__all__ = [
    "RUN_FILE",
    "Fleet",
    "FleetResult",
    "FleetSpec",
    "Guest",
    "GuestResult",
    "guest_name",
    "list_runs",
    "new_run_id",
    "sigterm_to_interrupt",
]


@dataclass
class Guest:
    """One guest of a fleet and its live state."""

    spec: GuestSpec
    pid: int | None = None
    state: str = "new"  # new, booting, ready, failed, stopped
    error: HarnessError | None = None
    boot_seconds: float | None = None
    client: AgentClient | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


def new_run_id() -> str:
    """Short, sortable by time, unique enough: 'r' + seconds since epoch in hex + 4 random hex."""
    return f"r{int(time.time()):x}{secrets.token_hex(2)}"


def guest_name(run_id: str, index: int) -> str:
    return f"{NAME_PREFIX}{run_id}-g{index:02d}"


class Fleet:
    """The guests a FleetSpec describes, on one backend.

    Keyword arguments are runtime collaborators, not part of the description: `run_id`
    (default: a fresh one), `runtime_root` (sockets, logs, run.json), `progress` (a boot
    progress bar: None = when stderr is a terminal), `accel_resolver` (auto|kvm|tcg -> the
    accelerator; default harness.guests.accel.resolve_accel), `backend` (a GuestBackend
    object instead of the one spec.backend names) and `image` (an already built GuestImage
    instead of building spec.image; its kind wins).
    """

    # How long a fresh connection to a running guest's agent may take to answer a ping.
    reconnect_timeout = 10.0

    def __init__(
        self,
        spec: FleetSpec,
        *,
        run_id: str | None = None,
        runtime_root: Path = RUNTIME_ROOT,
        progress: bool | None = None,
        accel_resolver: AccelResolver | None = None,
        backend: GuestBackend | None = None,
        image: GuestImage | None = None,
    ) -> None:
        if not isinstance(spec, FleetSpec):
            raise TypeError(f"Fleet(spec): a FleetSpec, not {type(spec).__name__}")
        if image is not None and image.kind != spec.image:
            spec = replace(spec, image=ImageKind(image.kind))
        self.spec = spec
        self.backend = backend if backend is not None else make_backend(spec.backend, spec.uri)
        self.image = image
        self.run_id = run_id or new_run_id()
        self.run_dir = runtime_root / self.run_id
        longest = self.run_dir / f"{guest_name(self.run_id, max(spec.count - 1, 0))}.agent"
        if len(str(longest).encode()) >= SUN_PATH_MAX:
            raise HarnessError(
                f"runtime directory {runtime_root} is too long for the guests' sockets "
                f"({longest} is over {SUN_PATH_MAX - 1} bytes, the limit of a UNIX socket path)",
                hint="use a shorter runtime directory (KSM_HARNESS_RUNTIME or --runtime-dir)",
            )
        self.progress = progress
        self.accel_resolver: AccelResolver = accel_resolver or (
            lambda req, img: resolve_accel(req, img)
        )
        self.accel: AccelChoice | None = None
        self.machine = MachineKind.PC  # resolved in up() (harness.guests.machine)
        # Who booted it: `fleet down --all` leaves a fleet alone while this process lives (a
        # run's fleet), and stops it once it is gone (a detached `fleet up`, a crashed run).
        # Set once at creation; attaching from another process keeps it.
        self.owner: dict[str, int | None] = {
            "pid": os.getpid(),
            "start": procfs.start_time(os.getpid()),
        }
        self.guests: list[Guest] = []
        self._atexit_registered = False
        self._signals: ExitStack | None = None
        self._cancel = threading.Event()
        # Guests start one after another, each once KSM has registered the one before (see
        # _start_in_turn): the index order is then ksmd's mm_slot order.
        self._turn = threading.Condition()
        self._next_start = 0

    # -- boot -------------------------------------------------------------------------------

    def up(self) -> FleetResult[AgentReply]:
        """Boot every guest (bounded concurrency) and wait for each agent's ready."""
        spec = self.spec
        if self.image is None:
            self.image = build_image(spec.image)
        self.accel = self.accel_resolver(spec.accel, self.image)
        self.machine, machine_args = resolve_machine(
            spec.machine, spec.backend, self.image, self.accel.accel
        )
        prepare_runtime_root(self.run_dir.parent)
        self.run_dir.mkdir(exist_ok=True)
        self.guests = [
            Guest(
                GuestSpec(
                    name=guest_name(self.run_id, i),
                    memory_mib=spec.memory_mib,
                    image=self.image,
                    runtime_dir=self.run_dir,
                    index=i,
                    vcpus=spec.vcpus,
                    accel=self.accel.accel,
                    mem_merge=spec.mem_merge,
                    extra_cmdline=machine_args,
                    machine=self.machine,
                )
            )
            for i in range(spec.count)
        ]
        if not self._atexit_registered:
            atexit.register(self.down)
            self._atexit_registered = True
        self._save()
        progress = BootProgress(spec.count, f"booting {self.run_id}", self.progress)

        def boot(guest: Guest) -> GuestResult:
            result = self._boot_one(guest)
            progress.step(result.ok)
            return result

        pool = ThreadPoolExecutor(spec.concurrency, thread_name_prefix="boot")
        try:
            # QEMU inherits PR_SET_THP_DISABLE from us (fork + exec) while the guests start.
            with thp_off_for_children(not spec.thp), progress:
                results = list(pool.map(boot, self.guests))
        except BaseException:
            # Ctrl-C / SIGTERM while booting: stop what runs so the boot threads see their
            # guest die at once instead of waiting out the ready deadline, then stop the rest.
            self._cancel.set()
            for guest in self.guests:
                self._stop_quietly(guest)
            pool.shutdown(wait=True, cancel_futures=True)
            for guest in self.guests:
                self._stop_quietly(guest)
            raise
        pool.shutdown()
        self._save()
        return FleetResult("boot", results)

    def _boot_one(self, guest: Guest) -> GuestResult:
        spec = guest.spec
        t0 = time.monotonic()
        if self._cancel.is_set():
            guest.state, guest.error = "failed", GuestError(f"{spec.name}: boot cancelled")
            return GuestResult(spec.name, None, guest.error, 0.0)
        guest.state = "booting"
        try:
            guest.pid = self._start_in_turn(spec)
        except HarnessError as exc:
            guest.state, guest.error = "failed", exc
            self._stop_quietly(guest)
            return GuestResult(spec.name, None, exc, time.monotonic() - t0)
        try:
            deadline = t0 + self.spec.ready_timeout
            chan = UnixChannel.connect(
                spec.agent_socket, deadline, alive=lambda: self.backend.alive(spec)
            )
            client = AgentClient(chan, spec.name, self.spec.command_timeout)
            try:
                info = client.wait_ready(max(deadline - time.monotonic(), 0.1))
            except HarnessError:
                client.close()
                raise
            guest.client = client
            guest.boot_seconds = time.monotonic() - t0
            guest.state = "ready"
            reply = AgentReply("ready", " ".join(f"{k}={v}" for k, v in info.items()), info)
            return GuestResult(spec.name, reply, None, guest.boot_seconds)
        except HarnessError as exc:
            error = self._explain(guest, exc)
            guest.state, guest.error = "failed", error
            # A guest that did not come up would only burn CPU; stop it now.
            self._stop_quietly(guest)
            return GuestResult(spec.name, None, error, time.monotonic() - t0)

    def _start_in_turn(self, spec: GuestSpec) -> int | None:
        """Start guest `spec.index` once the guests before it are started and registered with
        KSM, and wait for its own registration (QEMU madvises its RAM MADV_MERGEABLE early in
        machine init). ksmd walks mms in the order they registered, which decides which
        guest's pages meet first in the unstable tree (and, with THP, which huge pages KSM
        splits): started in parallel, QEMUs registered in a racy order (measured: g01, g00,
        g02, g03) that no /proc file shows, while the model's shadow orders its twins by
        start time. In turn, both orders are the index order. Costs well under a second per
        guest; the agents still come up in parallel."""
        with self._turn:
            self._turn.wait_for(lambda: self._next_start >= spec.index or self._cancel.is_set())
        try:
            pid = self.backend.start(spec)
            if spec.mem_merge and pid is not None:
                wait_ksm_registered(pid, spec)
            return pid
        finally:
            with self._turn:
                self._next_start = max(self._next_start, spec.index + 1)
                self._turn.notify_all()

    def _explain(self, guest: Guest, exc: HarnessError) -> HarnessError:
        """Prefer 'the guest died (why)' over the symptom seen on the agent channel."""
        if isinstance(exc, AgentCommandError):
            return exc  # the agent answered: the guest is alive
        # The channel's EOF can arrive a moment before the process has exited: for a closed
        # channel, give the backend up to 2 s to see the death.
        deadline = time.monotonic() + 2.0
        while True:
            try:
                alive = self.backend.alive(guest.spec)
            except HarnessError:
                alive = True
            if not alive:
                break
            if time.monotonic() >= deadline or not isinstance(exc, AgentChannelClosed):
                return exc
            time.sleep(0.05)
        why = self.backend.exit_reason(guest.spec)
        return GuestError(
            f"{guest.spec.name}: guest died: {why}",
            hint=f"console log: {guest.spec.console_log}",
        )

    # -- commands ---------------------------------------------------------------------------

    def select(self, selection: str | Sequence[str] | None = None) -> list[Guest]:
        """Guests by name, by index ('0,2,5-7') or all (None / 'all')."""
        if selection is None or selection == "all":
            return list(self.guests)
        items = selection.split(",") if isinstance(selection, str) else list(selection)
        by_name = {g.spec.name: g for g in self.guests}
        chosen: list[Guest] = []
        for item in (i.strip() for i in items):
            if item in by_name:
                chosen.append(by_name[item])
                continue
            lo, sep, hi = item.partition("-")
            try:
                first, last = int(lo), int(hi) if sep else int(lo)
            except ValueError:
                raise HarnessError(
                    f"no guest {item!r} in run {self.run_id}",
                    hint="select by name, index or range: 0,2,5-7",
                ) from None
            picked = [g for g in self.guests if first <= g.spec.index <= last]
            if not picked:
                raise HarnessError(f"no guest with index {item} in run {self.run_id}")
            chosen.extend(picked)
        unique: dict[str, Guest] = {g.spec.name: g for g in chosen}
        return sorted(unique.values(), key=lambda g: g.spec.index)

    def run(
        self,
        command: str,
        *args: str,
        guests: str | Sequence[str] | None = None,
        timeout: float | None = None,
    ) -> FleetResult[AgentReply]:
        """Send one agent command to the selected guests in parallel; one result each."""
        chosen = self.select(guests)
        if not chosen:
            return FleetResult(command, [])
        with ThreadPoolExecutor(len(chosen), thread_name_prefix="agent") as pool:
            results = list(pool.map(lambda g: self._call(g, command, args, timeout), chosen))
        return FleetResult(command, results)

    def _call(
        self, guest: Guest, command: str, args: Sequence[str], timeout: float | None
    ) -> GuestResult:
        spec = guest.spec
        t0 = time.monotonic()
        with guest.lock:
            if guest.state != "ready":
                err = guest.error or GuestError(f"{spec.name} is {guest.state}, not running")
                return GuestResult(spec.name, None, err, 0.0)
            try:
                if guest.client is None:
                    guest.client = self._reconnect(guest)
                value = guest.client.call(command, *args, timeout=timeout)
                return GuestResult(spec.name, value, None, time.monotonic() - t0)
            except HarnessError as exc:
                error = self._explain(guest, exc)
                if error is not exc:  # the guest is dead: fail it for good
                    guest.state, guest.error = "failed", error
                    if guest.client is not None:
                        guest.client.close()
                        guest.client = None
                return GuestResult(spec.name, None, error, time.monotonic() - t0)

    def _reconnect(self, guest: Guest) -> AgentClient:
        """A new connection to a running guest's agent (e.g. after attach), checked by a ping.

        QEMU serves one client per socket and queues the rest, so a connection can succeed and
        still never be answered while another process holds the channel: say so quickly.
        """
        spec = guest.spec
        chan = UnixChannel.connect(spec.agent_socket, time.monotonic() + 10.0)
        client = AgentClient(chan, spec.name, self.spec.command_timeout)
        try:
            client.call("ping", timeout=self.reconnect_timeout)
        except AgentCommandError:
            pass  # it answered: the channel is ours
        except GuestError as exc:
            client.close()
            if not self.backend.alive(spec):
                raise
            raise GuestError(
                f"{spec.name}: its agent does not answer a new connection ({exc.message})",
                hint="another process probably holds the agent channel (one client at a time)",
            ) from exc
        return client

    def fill(self, region: str, size: str, pattern: str, **kw: Any) -> FleetResult[AgentReply]:
        return self.run("fill", region, size, pattern, **kw)

    def verify(self, region: str, **kw: Any) -> FleetResult[AgentReply]:
        return self.run("verify", region, **kw)

    def pids(self) -> dict[str, int]:
        """Guest name -> QEMU PID of every guest that is running."""
        return {
            g.spec.name: g.pid
            for g in self.guests
            if g.pid is not None and g.state == "ready" and self.backend.alive(g.spec)
        }

    # -- state on disk ----------------------------------------------------------------------

    def _save(self) -> None:
        data = {
            "run_id": self.run_id,
            "spec": self.spec.as_json(),
            "backend": self.backend.name,
            "accel": str(self.accel.accel) if self.accel else None,
            "accel_reason": self.accel.reason if self.accel else None,
            "machine": str(self.machine),
            "memory_mib": self.spec.memory_mib,
            "image": None
            if self.image is None
            else {
                "kernel": str(self.image.kernel),
                "initrd": str(self.image.initrd),
                "kind": self.image.kind,
                "kernel_release": self.image.kernel_release,
                "digest": self.image.digest,
                "disk": str(self.image.disk) if self.image.disk else None,
                "cmdline": list(self.image.cmdline),
                "microvm": self.image.microvm,
            },
            "created": time.time(),
            "owner": self.owner,
            "guests": [
                {
                    "name": g.spec.name,
                    "index": g.spec.index,
                    "pid": g.pid,
                    "state": g.state,
                    "error": str(g.error) if g.error else None,
                    "boot_seconds": g.boot_seconds,
                }
                for g in self.guests
            ],
        }
        self.run_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.run_dir / f".{RUN_FILE}.tmp"
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, self.run_dir / RUN_FILE)

    @classmethod
    def attach(cls, run_id: str, runtime_root: Path = RUNTIME_ROOT, **kw: Any) -> Fleet:
        """The fleet of an earlier `up` in this or another process, from its run.json."""
        path = runtime_root / run_id / RUN_FILE
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise HarnessError(
                f"no fleet run {run_id!r} (no {path})", hint="see `ksmh fleet list`"
            ) from None
        except (OSError, ValueError) as exc:
            raise HarnessError(
                f"fleet run {run_id!r} is unreadable ({path}: {exc})",
                hint="remove it with `ksmh fleet down --all`",
            ) from exc
        if "spec" not in data or not data.get("image"):
            raise HarnessError(
                f"fleet run {run_id!r} was written by another version of ksm-harness ({path})",
                hint="remove it with `ksmh fleet down --all`",
            )
        img = data["image"]
        image = GuestImage(
            Path(img["kernel"]), Path(img["initrd"]), img["kind"], img["kernel_release"],
            img["digest"], Path(img["disk"]) if img.get("disk") else None,
            tuple(img.get("cmdline") or ()), bool(img.get("microvm")),
        )  # fmt: skip
        backend: GuestBackend | None = kw.pop("backend", None)
        spec = FleetSpec.from_json(
            {**data["spec"], "count": len(data["guests"]) or 1, "image": image.kind}
        )
        fleet = cls(spec, backend=backend, image=image, run_id=run_id,
                    runtime_root=runtime_root, **kw)  # fmt: skip
        accel = AccelKind.KVM if data.get("accel") == AccelKind.KVM else AccelKind.TCG
        fleet.accel = AccelChoice(accel, data.get("accel_reason") or "", True)
        if isinstance(data.get("owner"), dict):
            fleet.owner = data["owner"]
        machine = MachineKind.MICROVM if data.get("machine") == "microvm" else MachineKind.PC
        fleet.machine = machine
        for g in data["guests"]:
            gspec = GuestSpec(
                name=g["name"], memory_mib=spec.memory_mib, image=image,
                runtime_dir=fleet.run_dir, index=g["index"], vcpus=spec.vcpus,
                accel=accel, mem_merge=spec.mem_merge, machine=machine,
            )  # fmt: skip
            guest = Guest(gspec, pid=g.get("pid"), boot_seconds=g.get("boot_seconds"))
            alive = g.get("state") == "ready" and fleet.backend.alive(gspec)
            guest.state = (
                "ready" if alive else ("failed" if g.get("state") != "stopped" else "stopped")
            )
            if not alive and g.get("state") == "ready":
                guest.error = GuestError(f"{gspec.name} is no longer running")
            elif g.get("error"):
                guest.error = GuestError(g["error"])
            fleet.guests.append(guest)
        return fleet

    # -- teardown ---------------------------------------------------------------------------

    def _stop_quietly(self, guest: Guest) -> HarnessError | None:
        if guest.client is not None:
            guest.client.close()
            guest.client = None
        try:
            self.backend.stop(guest.spec)
            return None
        except HarnessError as exc:
            return exc

    def down(self, keep_logs: bool = False) -> FleetResult[AgentReply]:
        """Stop every guest and remove the run directory (sockets, pid files, logs)."""
        if self._atexit_registered:
            atexit.unregister(self.down)
            self._atexit_registered = False

        def stop(guest: Guest) -> GuestResult:
            err = self._stop_quietly(guest)
            if guest.state != "failed":
                guest.state = "stopped"
            return GuestResult(guest.spec.name, None, err, 0.0)

        results: list[GuestResult] = []
        if self.guests:
            with ThreadPoolExecutor(min(len(self.guests), 8), thread_name_prefix="stop") as pool:
                results = list(pool.map(stop, self.guests))
        if keep_logs:
            for g in self.guests:
                remove_quietly(g.spec.qmp_socket, g.spec.agent_socket, g.spec.pid_file)
            if self.run_dir.exists():
                self._save()
        else:
            shutil.rmtree(self.run_dir, ignore_errors=True)
        return FleetResult("down", results)

    def detach(self) -> None:
        """Leave the guests running past this process (ksmh fleet up); close our connections."""
        for g in self.guests:
            if g.client is not None:
                g.client.close()
                g.client = None
        if self._atexit_registered:
            atexit.unregister(self.down)
            self._atexit_registered = False
        self._save()

    def __enter__(self) -> Fleet:
        self._signals = ExitStack()
        self._signals.enter_context(signals_as_interrupt())
        try:
            self.up()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.down()
        finally:
            if self._signals is not None:
                self._signals.close()
                self._signals = None


def list_runs(runtime_root: Path = RUNTIME_ROOT) -> list[dict[str, Any]]:
    """The run.json of every fleet run with a runtime directory, oldest first."""
    runs = []
    if runtime_root.exists():
        for path in sorted(runtime_root.glob(f"*/{RUN_FILE}")):
            try:
                runs.append(json.loads(path.read_text()))
            except (OSError, ValueError):
                continue
    return sorted(runs, key=lambda r: r.get("created", 0))


# The factories live here, not in backend.py, which the backends import (no import circle).
def build_image(kind: str) -> GuestImage:
    """The image of a kind, built (or found current) on demand."""
    kind = parse_kind(ImageKind, kind)
    if kind is ImageKind.BUSYBOX:
        from harness.guests.image import ensure_image

        return ensure_image()
    from harness.guests.debian_image import ensure_debian_image

    return ensure_debian_image()


def make_backend(kind: str, uri: str | None = None) -> GuestBackend:
    kind = parse_kind(GuestBackendKind, kind)
    if kind is GuestBackendKind.QEMU:
        from harness.guests.qemu_backend import QemuBackend

        return QemuBackend()
    from harness.guests.libvirt_backend import DEFAULT_URI, LibvirtBackend

    return LibvirtBackend(uri or DEFAULT_URI)


def wait_ksm_registered(
    pid: int,
    spec: GuestSpec,
    timeout: float = REGISTER_TIMEOUT,
    proc: Path = procfs.PROC,
    ksm_run: Path = Path("/sys/kernel/mm/ksm/run"),
) -> bool:
    """Wait until guest `spec`'s QEMU (local process `pid`) is registered with KSM
    (harness.procfs.ksm_user). False, without waiting, when this host has no KSM, or once the
    command line of `pid` shows it is not the guest's QEMU (a fake or remote pid) or says
    mem-merge=off; False as soon as its RAM turns out to be memory KSM never takes (shared,
    memfd or hugetlbfs: QEMU's madvise does not register it); False when it died or after
    `timeout` (a QEMU that maps private anonymous RAM madvises it at once, but a loaded host
    can deschedule it in between: no shorter grace than that)."""
    if not ksm_run.exists():
        return False
    t0 = time.monotonic()
    while procfs.pid_alive(pid, proc):
        if procfs.ksm_user(pid, proc) is not None:
            return True
        # Popen returns while execve is still setting up the new image: its command line
        # reads empty for a moment (measured: guests then started 10 ms apart, out of order).
        line = procfs.cmdline(pid, proc, limit=1 << 16)
        waited = time.monotonic() - t0
        if line and (spec.name not in line or "mem-merge=off" in line):
            return False
        if not line and waited > EXEC_GRACE:
            return False
        if _ram_mapping(pid, spec.memory_mib << 20, proc) == "other" or waited >= timeout:
            return False
        time.sleep(0.005)
    return False


def _ram_mapping(pid: int, size: int, proc: Path) -> str | None:
    """How `pid` maps a range of at least `size` bytes (its guest RAM): "anon" (private
    anonymous, what KSM merges), "other" (shared or file-backed only), None (none yet)."""
    try:
        text = (proc / str(pid) / "maps").read_text()
    except OSError:
        return None
    found = None
    for line in text.splitlines():
        fields = line.split(None, 5)
        lo, _, hi = fields[0].partition("-")
        try:
            big = int(hi, 16) - int(lo, 16) >= size
        except ValueError:
            continue
        if big:
            private_anon = fields[1].endswith("p") and (len(fields) < 6 or not fields[5].strip())
            if private_anon:
                return "anon"
            found = "other"
    return found
