"""ksmd's cost on one host: CPU per page visit by kind, per batch, and how long it really sleeps.

A Calibration is measured by `ksmh calibrate` (harness.twin.calibrate) and stored per host
with the kernel release, in a root-owned state directory:

    /var/lib/ksm-harness/calibration/<release>.json   (KSM_HARNESS_CALIBRATION_DIR overrides)

Cost model (what the forecast and the twin's CPU estimate use), per batch:

    CPU  = sum(costs[term] * term) over TERMS
    time = CPU + sleep(sleep_millisecs)

The terms are the model's page visits by kind (ksm_model.scanner.VISIT_KINDS: first, unique,
merged, joined, chained), unique visits once more weighted by the square of the unstable tree's
depth, log2(2 + pages in it) (harness.twin.timeline), and the batch itself. A unique page's
search walks that deep, and a deeper tree is also a colder one (more of its pages miss the
caches): measured here, a unique visit costs about first + 0.04 us x depth^2 (6 us at 4096
pages in the tree, 11 us at 65536), which a linear term in the depth does not fit. `dup` is
each dup of a stable_node_chain a stable tree walk examines (ksm_model's dups_walked): when
every dup of a chain is full, stable_node_dup() looks at all of them, on every search that
passes the chain, so a chain of 256 full dups adds about 6 us to every unique visit (measured).
A page smart_scan skips costs about what a merged page costs (the kernel looks the page up,
then skips it), so it counts as merged. ksmd sleeps msecs_to_jiffies(sleep_millisecs)
jiffies, which the timer wheel rounds up: armed part-way through a jiffy, a sleep of j < 63
jiffies ends j + 1 - f jiffies later; longer ones are filed at a coarser level (8, 64, ...
jiffies) and end up to one granule later. `sleep_extra` is the measured mean excess over j
jiffies at the finest level (about 0.5 plus the wake-up latency).
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from harness.errors import HarnessError
from harness.ksm.lock import private_dir

KINDS = ("first", "unique", "merged", "joined", "chained")
TERMS = ("first", "unique", "unique_depth2", "merged", "joined", "chained", "dup", "batch")
DEFAULT_DIR = Path("/var/lib/ksm-harness/calibration")
FORMAT = 1


def calibration_dir() -> Path:
    """Where calibrations live: KSM_HARNESS_CALIBRATION_DIR, else /var/lib/ksm-harness/..."""
    return Path(os.environ.get("KSM_HARNESS_CALIBRATION_DIR", str(DEFAULT_DIR)))


def msecs_to_jiffies(ms: int, hz: int) -> int:
    """include/linux/jiffies.h: rounded up."""
    return 0 if ms <= 0 else (ms * hz + 999) // 1000


def wheel_granule(jiffies: int) -> int:
    """Granularity of the timer-wheel level a timeout of `jiffies` is filed at (HZ > 100):
    level n holds deltas from 63 << 3(n-1) on, in granules of 8^n jiffies."""
    level = 0
    while level < 8 and jiffies >= (63 << (3 * level)):
        level += 1
    return 1 << (3 * level)


@dataclass(frozen=True)
class Calibration:
    """ksmd's measured costs on one host and kernel release; see the module docstring."""

    release: str
    hz: int
    costs: dict[str, float]  # CPU ns per unit of each term (TERMS)
    sleep_extra: float  # jiffies slept beyond msecs_to_jiffies(), finest wheel level
    sleep0_ns: float  # time between batches with sleep_millisecs=0 (ksmd only yields)
    host: str = field(default_factory=socket.gethostname)
    measured: str = ""
    cpu_source: str = "schedstat"  # or "stat": where ksmd's CPU time was read
    observations: list[dict[str, Any]] = field(default_factory=list, compare=False)
    fit_error: float = 0.0  # relative RMS error of the cost fit over the observations

    def cost_ns(self, terms: Sequence[float]) -> float:
        """ksmd CPU in ns for one batch's (or any stretch's) cost terms, TERMS order."""
        return sum(self.costs[t] * x for t, x in zip(TERMS, terms, strict=True))

    def sleep_ns(self, sleep_millisecs: int) -> float:
        """Mean wall time ksmd spends between two batches at this sleep_millisecs."""
        j = msecs_to_jiffies(sleep_millisecs, self.hz)
        if j == 0:
            return self.sleep0_ns
        granule = wheel_granule(j)
        # Filed at a coarser level the expiry is rounded up to the granule: (g - 1)/2 more.
        return (j + self.sleep_extra + (granule - 1) / 2) * 1e9 / self.hz

    def summary(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("observations")
        return d

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, **asdict(self)}, indent=2) + "\n"

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], where: str = "") -> Calibration:
        try:
            if data.get("format") != FORMAT:
                raise ValueError(f"format {data.get('format')!r}, expected {FORMAT}")
            costs = {t: float(data["costs"][t]) for t in TERMS}
            if any(v != v or v < 0 for v in costs.values()):
                raise ValueError("negative or NaN cost")
            return cls(
                release=str(data["release"]),
                hz=int(data["hz"]),
                costs=costs,
                sleep_extra=float(data["sleep_extra"]),
                sleep0_ns=float(data["sleep0_ns"]),
                host=str(data.get("host", "")),
                measured=str(data.get("measured", "")),
                cpu_source=str(data.get("cpu_source", "")),
                observations=list(data.get("observations", [])),
                fit_error=float(data.get("fit_error", 0.0)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise HarnessError(
                f"calibration {where} is not usable: {exc}",
                hint="measure it again with `ksmh calibrate`",
            ) from None


def release() -> str:
    return os.uname().release


def path_for(rel: str | None = None, directory: Path | None = None) -> Path:
    return (directory or calibration_dir()) / f"{rel or release()}.json"


def load(rel: str | None = None, directory: Path | None = None) -> Calibration | None:
    """This host's calibration for kernel release `rel` (default: the running one), or None."""
    path = path_for(rel, directory)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise HarnessError(f"cannot read {path}: {exc.strerror}") from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise HarnessError(
            f"{path} is not JSON ({exc})", hint="measure it again with `ksmh calibrate`"
        ) from None
    if not isinstance(data, dict):
        raise HarnessError(f"{path} is not a calibration", hint="`ksmh calibrate` rewrites it")
    return Calibration.from_mapping(data, str(path))


def require(rel: str | None = None, directory: Path | None = None) -> Calibration:
    """load(), or a HarnessError saying how to measure one."""
    cal = load(rel, directory)
    if cal is None:
        raise HarnessError(
            f"no calibration of ksmd for kernel {rel or release()} "
            f"in {directory or calibration_dir()}",
            hint="measure one with `ksmh calibrate` (as root, about a minute; KSM must be present)",
        )
    return cal


def save(cal: Calibration, directory: Path | None = None) -> Path:
    """Write atomically into the (root-owned, 0755) calibration directory; returns the path."""
    d = private_dir(directory or calibration_dir())
    path = d / f"{cal.release}.json"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(cal.to_json())
        os.chmod(tmp, 0o644)
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise HarnessError(f"cannot write {path}: {exc.strerror}") from None
    return path


# Rough costs for a host without a calibration (2 shared cores, 6.18, lightly loaded): enough
# to rank knob sets, not to promise times. Forecasts made with them say "uncalibrated".
DEFAULT = Calibration(
    release="uncalibrated",
    hz=250,
    costs={
        "first": 2000.0,
        "unique": 2000.0,
        "unique_depth2": 40.0,
        "merged": 500.0,
        "joined": 5000.0,
        "chained": 5000.0,
        "dup": 25.0,
        "batch": 0.0,
    },
    sleep_extra=0.5,
    sleep0_ns=50_000.0,
    host="",
    cpu_source="defaults",
)


def now_text() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
