"""Benchmark: ksm_model's memory per tracked page, and a model of a 64 GiB host.

Two measurements:
  (a) bytes per tracked page of unique pages (the workload of bench_model_vs_kernel.py, case
      a): tracemalloc after a full scan and at the peak inside the next one;
  (b) a host of --pages pages (default 16,777,216: 64 GiB) in --guests processes, each half
      identical pages (16 contents, so every content is a stable_node_chain of many dups), a
      quarter unique pages and a quarter zero-filled pages, with the default knobs
      (smart_scan on, max_page_sharing 256, use_zero_pages 0) but pages_to_scan 100000. It
      runs ksmd until every identical and zero page is merged and the merge counters hold
      still for a full scan ("converged"), and prints the seconds per full scan (the first
      two, and the steady ones after), RSS per page and the peak RSS (inside the scans, and
      for the whole process with the setup).

Model only (no root, no KSM):

    .venv/bin/python bench/bench_model_memory.py [--pages N] [--guests G] [--json FILE]
"""

from __future__ import annotations

import argparse
import gc
import resource
import time
from pathlib import Path

from bench_model_vs_kernel import model_bytes_per_page
from benchlib import Figures, add_json_option
from ksm_model import MADV_MERGEABLE, Kernel

PS = 4096
CONTENTS = 16  # identical contents in the identical half
RUN = 512  # pages per fill of one content
STEADY_SCANS = 3  # full scans timed after convergence
MAX_SCANS = 12


def _status_kib(field: str) -> int:
    """A figure of /proc/self/status in KiB (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak_rss() -> bool:
    """Reset VmHWM (clear_refs 5); False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def build_host(pages: int, guests: int) -> tuple[Kernel, int]:
    """The host model: `guests` processes of pages/guests pages each (see the docstring).

    Returns the kernel and the number of pages that should end up merged.
    """
    k = Kernel()
    k.sysfs.write("pages_to_scan", "100000")
    k.sysfs.write("sleep_millisecs", "0")
    per = pages // guests
    half, quarter = per // 2, per // 4
    uniq = 0
    for g in range(guests):
        p = k.spawn(name=f"guest{g}")
        a = p.mmap(per * PS)
        for off in range(0, half, RUN):
            byte = 1 + (off // RUN) % CONTENTS
            p.fill(a + off * PS, min(RUN, half - off) * PS, byte)
        for i in range(half, half + quarter):
            uniq += 1
            p.write(a + i * PS, uniq.to_bytes(8, "little"))
        for off in range(half + quarter, per, RUN):
            p.fill(a + off * PS, min(RUN, per - off) * PS, 0)
        p.madvise(a, per * PS, MADV_MERGEABLE)
    return k, guests * (per - quarter)


def _merge_state(k: Kernel) -> tuple[int, ...]:
    return (k.pages_shared, k.pages_sharing, k.stable_node_chains, k.stable_node_dups)


def _scan(k: Kernel) -> float:
    """One full scan; its wall seconds."""
    t = time.perf_counter()
    k.run_until(full_scans=k.full_scans + 1)
    return time.perf_counter() - t


def measure_host(fig: Figures, pages: int, guests: int) -> None:
    """(b): build the host, scan until converged, then time STEADY_SCANS more scans."""
    gc.collect()
    rss0 = _status_kib("VmRSS")
    t = time.perf_counter()
    k, merged = build_host(pages, guests)
    n = guests * (pages // guests)
    fig.add("host.pages", n)
    fig.add("host.gib", round(n * PS / 2**30, 1), "GiB")
    fig.add("host.processes", guests)
    fig.add("host.setup_s", round(time.perf_counter() - t, 1), "s")
    rss = (_status_kib("VmRSS") - rss0) * 1024 / n
    fig.add("host.rss_per_page.after_setup", round(rss, 1), "bytes (no rmap_item yet)")
    hwm_reset = _reset_peak_rss()
    k.sysfs.write("run", "1")
    times: list[float] = []
    last: tuple[int, ...] | None = None
    converged = None
    while converged is None and k.full_scans < MAX_SCANS:
        times.append(_scan(k))
        state = _merge_state(k)
        if k.pages_shared + k.pages_sharing == merged and state == last:
            converged = k.full_scans
        last = state
    fig.add("host.converged_at_full_scans", converged)
    fig.add("host.first_two_scans_s", [round(s, 1) for s in times[:2]], "s each")
    rss_conv = _status_kib("VmRSS")
    before = k.pages_scanned
    steady = [_scan(k) for _ in range(STEADY_SCANS)]
    fig.add("host.steady_s_per_full_scan", round(sum(steady) / len(steady), 2), "s")
    fig.add("host.steady_visits_s", round((k.pages_scanned - before) / sum(steady)), "visits/s")
    rss = (rss_conv - rss0) * 1024 / n
    fig.add("host.rss_per_page.converged", round(rss, 1), "bytes")
    if hwm_reset:
        fig.add("host.peak_rss_in_scans", round(_status_kib("VmHWM") / 1024), "MiB")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    fig.add("host.peak_rss_process", round(peak), "MiB (setup included)")
    c = k.counters()
    for name in (
        "pages_shared",
        "pages_sharing",
        "pages_unshared",
        "pages_volatile",
        "stable_node_chains",
        "stable_node_dups",
        "pages_skipped",
    ):
        fig.add(f"host.{name}", c[name])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pages", type=int, default=16 << 20, help="host pages (default 64 GiB)")
    ap.add_argument("--guests", type=int, default=16, help="processes sharing them (16)")
    ap.add_argument(
        "--unique-pages", type=int, default=262144, help="pages for (a) (default 1 GiB)"
    )
    add_json_option(ap)
    args = ap.parse_args(argv)
    if args.pages < 4 * args.guests or args.guests < 1 or args.unique_pages < 1:
        ap.error("need --guests >= 1, --pages >= 4 x guests and --unique-pages >= 1")
    fig = Figures("model memory (bench/bench_model_memory.py)", args)
    after, peak = model_bytes_per_page(args.unique_pages)
    fig.add("unique.pages", args.unique_pages)
    fig.add("unique.bytes_per_page.after_scan", round(after, 1), "bytes (tracemalloc)")
    fig.add("unique.bytes_per_page.peak_in_scan", round(peak, 1), "bytes (tracemalloc)")
    fig.note("target: <= 100 bytes per tracked page after a full scan and at the peak")
    measure_host(fig, args.pages, args.guests)
    fig.finish(args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
