"""Accelerator probe: is KVM usable for a real guest here, or do we fall back to TCG?

`/dev/kvm` existing proves little (on these machines the host is a VM whose KVM hangs standard
guests), so the probe boots a tiny guest of our own image under KVM and waits, with a short
deadline, for its agent's `ready`. The verdict is cached per host (hostname, kernel release,
/dev/kvm device), so only the first fleet on a host pays for it.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from harness.errors import AccelUnavailable, HarnessError
from harness.guests.agent import AgentClient, UnixChannel
from harness.guests.backend import RUNTIME_ROOT, prepare_runtime_root
from harness.guests.qemu_backend import QemuBackend
from harness.guests.spec import NAME_PREFIX, GuestImage, GuestSpec, parse_kind
from harness.kinds import AccelKind
from harness.paths import cache_dir

PROBE_DEADLINE = 15.0
# A verdict that KVM is unusable is retried after this long: the probe may have failed for a
# passing reason (a loaded host missing the deadline), and TCG is far slower. A usable verdict
# holds while the host key (host, kernel release, /dev/kvm) stays the same.
FAILED_VERDICT_TTL = 6 * 3600.0
DEV_KVM = Path("/dev/kvm")


def default_cache_path() -> Path:
    return cache_dir() / "accel.json"


@dataclass(frozen=True)
class KvmVerdict:
    """Whether KVM ran a guest to userspace here, and why not if it did not."""

    usable: bool
    reason: str
    probed_at: float = 0.0
    seconds: float = 0.0


@dataclass(frozen=True)
class AccelChoice:
    """The accelerator a fleet uses, why, and whether the verdict came from the cache."""

    accel: AccelKind  # kvm or tcg, never auto
    reason: str
    cached: bool = False


def host_key(dev_kvm: Path = DEV_KVM) -> str:
    try:
        rdev = os.stat(dev_kvm).st_rdev
        dev = f"{os.major(rdev)}:{os.minor(rdev)}"
    except OSError:
        dev = "none"
    return f"{socket.gethostname()}|{os.uname().release}|kvm={dev}"


def static_kvm_problem(dev_kvm: Path = DEV_KVM) -> str | None:
    """Reasons KVM cannot work that need no guest to find out."""
    if not dev_kvm.exists():
        return f"{dev_kvm} does not exist (no KVM module, or not passed into this container)"
    if not os.access(dev_kvm, os.R_OK | os.W_OK):
        return f"{dev_kvm} is not readable and writable by uid {os.geteuid()}"
    return None


def probe_kvm(
    image: GuestImage,
    runtime_root: Path = RUNTIME_ROOT,
    deadline: float = PROBE_DEADLINE,
    dev_kvm: Path = DEV_KVM,
) -> KvmVerdict:
    """Boot a 128 MiB guest under KVM (mem-merge off: it must not touch KSM) and await ready."""
    t0 = time.monotonic()
    problem = static_kvm_problem(dev_kvm)
    if problem is not None:
        return KvmVerdict(False, problem, time.time(), 0.0)
    run_dir = prepare_runtime_root(runtime_root) / f"probe-{secrets.token_hex(4)}"
    spec = GuestSpec(
        name=f"{NAME_PREFIX}probe-{run_dir.name[6:]}",
        memory_mib=128,
        image=image,
        runtime_dir=run_dir,
        accel=AccelKind.KVM,
        mem_merge=False,
    )
    backend = QemuBackend()
    try:
        backend.start(spec)
        end = t0 + deadline
        try:
            chan = UnixChannel.connect(spec.agent_socket, end, alive=lambda: backend.alive(spec))
            client = AgentClient(chan, spec.name)
            try:
                client.wait_ready(max(end - time.monotonic(), 0.1))
            finally:
                client.close()
        except HarnessError as exc:
            if not backend.alive(spec):
                why = f"a KVM guest failed to start: {backend.exit_reason(spec)}"
            else:
                why = (
                    f"a KVM guest did not reach userspace within {deadline:.0f} s "
                    f"(hangs under this host's KVM; {exc.message})"
                )
            return KvmVerdict(False, why, time.time(), time.monotonic() - t0)
        took = time.monotonic() - t0
        return KvmVerdict(True, f"a KVM guest was ready in {took:.1f} s", time.time(), took)
    finally:
        backend.stop(spec, timeout=3.0)
        shutil.rmtree(run_dir, ignore_errors=True)


def _load_cache(path: Path) -> dict[str, dict[str, object]]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def cached_verdict(path: Path, key: str) -> KvmVerdict | None:
    entry = _load_cache(path).get(key)
    if not isinstance(entry, dict):
        return None
    try:
        return KvmVerdict(
            usable=bool(entry["usable"]),
            reason=str(entry["reason"]),
            probed_at=float(entry.get("probed_at", 0.0)),  # type: ignore[arg-type]
            seconds=float(entry.get("seconds", 0.0)),  # type: ignore[arg-type]
        )
    except (KeyError, TypeError, ValueError):
        return None


def store_verdict(path: Path, key: str, verdict: KvmVerdict) -> None:
    data = _load_cache(path)
    data[key] = asdict(verdict)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)
    except OSError:
        pass  # a cache we cannot write only costs a probe next time


def resolve_accel(
    requested: str,
    image: GuestImage,
    *,
    cache_path: Path | None = None,
    probe: Callable[[GuestImage], KvmVerdict] | None = None,
    key: str | None = None,
    refresh: bool = False,
    ttl: float = FAILED_VERDICT_TTL,
) -> AccelChoice:
    """Turn auto|kvm|tcg into the accelerator to use; `kvm` unusable raises AccelUnavailable."""
    requested = parse_kind(AccelKind, requested)
    if requested is AccelKind.TCG:
        return AccelChoice(AccelKind.TCG, "tcg was asked for")
    path = cache_path or default_cache_path()
    key = key or host_key()
    verdict = None if refresh else cached_verdict(path, key)
    if verdict is not None and not verdict.usable and time.time() - verdict.probed_at > ttl:
        verdict = None  # an old failure: look again
    cached = verdict is not None
    if verdict is None:
        verdict = (probe or probe_kvm)(image)
        store_verdict(path, key, verdict)
    if verdict.usable:
        return AccelChoice(AccelKind.KVM, verdict.reason, cached)
    if requested is AccelKind.KVM:
        raise AccelUnavailable(
            f"--accel kvm asked for, but KVM cannot run a guest here: {verdict.reason}",
            hint="use --accel tcg (or auto, which falls back to TCG)",
        )
    return AccelChoice(AccelKind.TCG, f"KVM unusable, using TCG: {verdict.reason}", cached)
