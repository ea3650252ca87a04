"""Benchmark: ksm_model vs the real ksmd on the same machine, in one run.

Over 1 GiB (262,144 pages), pages_to_scan=20000, sleep_millisecs=0, smart_scan=0:
  (a) steady-state scans of unique pages,
  (b) steady-state scans of already-merged pages (all pages identical),
  (c) the first two scans of identical pages,
printing page visits per second (pages_scanned per wall second) for both sides and the ratio
model/kernel, plus the model's memory per tracked page (tracemalloc, unique pages).

The real side runs a child process (1 GiB mmap + MADV_NOHUGEPAGE + MADV_MERGEABLE) while
holding the host-wide KSM lock, and restores every knob afterwards. Run as root:

    .venv/bin/python bench/bench_model_vs_kernel.py [--pages N] [--no-kernel] [--json FILE]

It lives in bench/, not in kernel-model/: the model's distribution never imports the harness,
and the kernel side needs it (the KSM lock, the sysfs backend, the process chokepoint).
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass

from benchlib import Figures, add_json_option
from ksm_model import MADV_MERGEABLE, Kernel

from harness.ksm.types import PAGE_SIZE as PS

KNOBS = {"pages_to_scan": 20000, "sleep_millisecs": 0, "smart_scan": 0}
MERGED_SCANS = 10  # steady scans measured for (b), which are fast

CHILD = r"""
import mmap, sys
n, kind, ps = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
buf = mmap.mmap(-1, n * ps, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
buf.madvise(mmap.MADV_NOHUGEPAGE)
if kind == "unique":
    words = memoryview(buf).cast("Q")
    for i in range(n):
        words[i * (ps // 8)] = i + 1
else:
    chunk = b"a" * (1 << 22)
    for off in range(0, n * ps, len(chunk)):
        buf[off:off + len(chunk)] = chunk[: n * ps - off]
buf.madvise(mmap.MADV_MERGEABLE)
print("ready", flush=True)
sys.stdin.readline()
"""


@dataclass
class Rates:
    unique: float  # (a)
    merged: float  # (b)
    first_two: float  # (c)


# -- the model ---------------------------------------------------------------------------------
def model_kernel(n: int, kind: str) -> Kernel:
    k = Kernel()
    for name, value in KNOBS.items():
        k.sysfs.write(name, str(value))
    p = k.spawn(name=f"bench-{kind}")
    a = p.mmap(n * PS)
    if kind == "unique":
        for i in range(n):
            p.write(a + i * PS, (i + 1).to_bytes(8, "little"))
    else:
        p.fill(a, n * PS, ord("a"))
    p.madvise(a, n * PS, MADV_MERGEABLE)
    return k


def model_rate(k: Kernel, scans: int) -> float:
    before = k.pages_scanned
    target = k.full_scans + scans
    t = time.perf_counter()
    k.run_until(full_scans=target)
    return (k.pages_scanned - before) / (time.perf_counter() - t)


def measure_model(n: int) -> Rates:
    k = model_kernel(n, "identical")
    k.sysfs.write("run", "1")
    first = model_rate(k, 2)
    merged = model_rate(k, MERGED_SCANS)
    k = model_kernel(n, "unique")
    k.sysfs.write("run", "1")
    k.run_until(full_scans=2)
    unique = model_rate(k, 2)
    return Rates(unique=unique, merged=merged, first_two=first)


def model_bytes_per_page(n: int) -> tuple[float, float]:
    """(bytes per page right after a full scan, peak bytes per page during a steady scan)."""
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    k = model_kernel(n, "unique")
    k.sysfs.write("run", "1")
    k.run_until(full_scans=2)
    tracemalloc.reset_peak()
    k.run_until(full_scans=3)
    gc.collect()
    current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert k.pages_unshared == n
    return (current - base) / n, (peak - base) / n


# -- the real kernel ---------------------------------------------------------------------------
def measure_kernel(n: int) -> Rates:
    from harness.ksm.lock import ksm_lock
    from harness.ksm.sysfs import SysfsBackend

    backend = SysfsBackend()
    with ksm_lock(), backend.saved():
        backend.write_tunables(run=2, force=True)
        backend.write_tunables(
            max_page_sharing=256,
            use_zero_pages=0,
            merge_across_nodes=1,
            stable_node_chains_prune_millisecs=2000,
            **KNOBS,
        )
        first, merged = _kernel_case(backend, n, "identical", lambda w: (w(2), w(MERGED_SCANS)))
        backend.write_tunables(run=2, force=True)
        (_, unique) = _kernel_case(backend, n, "unique", lambda w: (w(2), w(2)))
        backend.write_tunables(run=2, force=True)
    return Rates(unique=unique, merged=merged, first_two=first)


def _kernel_case(
    backend: object,
    n: int,
    kind: str,
    plan: Callable[[Callable[[int], float]], tuple[float, float]],
) -> tuple[float, float]:
    from harness.ksm.sysfs import SysfsBackend
    from harness.run import PIPE, spawn

    assert isinstance(backend, SysfsBackend)
    child = spawn([sys.executable, "-c", CHILD, str(n), kind, str(PS)], stdin=PIPE, stdout=PIPE)
    try:
        assert child.stdout is not None and child.stdin is not None
        if child.stdout.readline().strip() != b"ready":
            raise RuntimeError("benchmark child failed to start")
        backend.write_tunables(run=1)

        def wait(scans: int) -> float:
            start_scans = backend._read_int("full_scans") or 0
            before = backend._read_int("pages_scanned") or 0
            t = time.perf_counter()
            while (backend._read_int("full_scans") or 0) < start_scans + scans:
                time.sleep(0.001)
            elapsed = time.perf_counter() - t
            return ((backend._read_int("pages_scanned") or 0) - before) / elapsed

        return plan(wait)
    finally:
        backend.write_tunables(run=0)
        if child.stdin is not None:
            child.stdin.close()
        child.wait(timeout=30)


# -- report ----------------------------------------------------------------------------------
LABELS = {
    "unique": "(a) steady scans, unique pages",
    "merged": "(b) steady scans, merged pages",
    "first_two": "(c) first two scans, identical",
}
TARGETS = {"unique": 1.0, "merged": 0.3, "first_two": None}  # model/kernel ratio asked for


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pages", type=int, default=262144, help="pages per case (default 1 GiB)")
    ap.add_argument("--no-kernel", action="store_true", help="model only")
    ap.add_argument("--no-memory", action="store_true", help="skip the tracemalloc run")
    add_json_option(ap)
    args = ap.parse_args(argv)
    n = args.pages
    fig = Figures("model vs kernel (bench/bench_model_vs_kernel.py)", args)
    fig.add("pages_per_case", n)
    fig.add("mib_per_case", round(n * PS / 2**20, 1), "MiB")
    fig.note(f"ksmd knobs on both sides: {KNOBS}")
    model = measure_model(n)
    kernel = None if args.no_kernel else measure_kernel(n)
    for case, label in LABELS.items():
        m = getattr(model, case)
        kv = getattr(kernel, case) if kernel else None
        fig.add(f"{case}.model_visits_s", round(m), "page visits/s")
        fig.add(f"{case}.kernel_visits_s", None if kv is None else round(kv), "page visits/s")
        ratio = fig.add(f"{case}.ratio", None if not kv else round(m / kv, 3), "model/kernel")
        target = TARGETS[case]
        if target is not None and ratio is not None:
            verdict = "met" if ratio >= target else "NOT met"
            fig.note(f"{label}: {ratio:.2f}x (target >= {target:.1f}x: {verdict})")
    if not args.no_memory:
        after, peak = model_bytes_per_page(n)
        fig.add("model_bytes_per_page.after_scan", round(after, 1), "bytes (tracemalloc)")
        fig.add("model_bytes_per_page.peak_in_scan", round(peak, 1), "bytes (tracemalloc)")
    fig.finish(args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
