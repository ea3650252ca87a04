"""Guest density, measured: N guests filling the same content, with KSM and without.

    sudo .venv/bin/python bench/bench_density.py [--guests 48] [--memory 320] [--fill 192] \
        [--json FILE]

Two passes over the same fleet description (TCG here, THP off as playbooks have it):
1. mem-merge off: boot N guests, each fills FILL MiB of content identical across guests
   (`mix:S:common=100`: pages distinct within a guest), and the host's used memory
   (MemTotal - MemAvailable) is read before the boot and after the fill;
2. mem-merge on, under the host KSM lock with every knob restored afterwards: the same, then
   KSM runs (run=1) until pages_sharing has grown by the fill's duplicates and two more full
   scans have passed, and used memory is read again.
Per-guest memory is the used-memory delta over N in each pass; their ratio is what KSM saves.
The number of guests fitting in MemTotal - 2 GiB is derived from those measured per-guest
figures (labeled so): nothing fills the host. Other processes on a shared host move
MemAvailable too: the baseline is read right before each boot and the load is printed.

The busybox guest keeps ~88 MiB of its RAM (kernel, initramfs, page tables) and the agent
refuses a fill that leaves it under 16 MiB: a 256 MiB guest can fill at most ~150 MiB, so
192 MiB needs --memory 320 (the default here).
"""

from __future__ import annotations

import argparse
import os
import time
from contextlib import nullcontext

from benchlib import Figures, add_json_option

from harness import procfs
from harness.guests.fleet import Fleet
from harness.guests.spec import FleetSpec, default_concurrency
from harness.ksm.types import PAGE_SIZE
from harness.signals import signals_as_interrupt

MIB = 1024 * 1024
GIB = 1024 * MIB
PATTERN = "mix:11:common=100,zero=0"  # identical across guests, distinct within one


def used_bytes() -> int:
    info = procfs.meminfo()
    return info["MemTotal"] - info["MemAvailable"]


def load() -> float:
    return round(os.getloadavg()[0], 2)


def one_pass(args: argparse.Namespace, fig: Figures, merge: bool) -> float:
    """Boot, fill (and merge): the measured host memory per guest, in bytes."""
    from harness.ksm.lock import ksm_lock
    from harness.ksm.sysfs import SysfsBackend

    key = "ksm" if merge else "no_ksm"
    n = args.guests
    spec = FleetSpec(
        n,
        args.memory,
        mem_merge=merge,
        thp=False,
        accel=args.accel,
        concurrency=args.concurrency,
        ready_timeout=900,
        command_timeout=900,
    )
    ksm = SysfsBackend()
    with ksm_lock() if merge else nullcontext(), ksm.saved() if merge else nullcontext():
        if merge:
            ksm.write_tunables(run=0)  # nothing merges before the fill is in place
        base = used_bytes()
        fig.add(f"{key}.used_before_gib", round(base / GIB, 2), f"GiB (load {load()})")
        t0 = time.monotonic()
        with Fleet(spec) as fleet:
            ready = time.monotonic() - t0
            fig.add(f"{key}.ready_seconds", round(ready, 1), f"s for {n} guests (load {load()})")
            t1 = time.monotonic()
            fleet.fill("a", f"{args.fill}M", PATTERN).raise_if_failed()
            fig.add(f"{key}.fill_seconds", round(time.monotonic() - t1, 1), "s")
            if merge:
                before = ksm.read_counters().pages_sharing or 0
                grow = (n - 1) * args.fill * MIB // PAGE_SIZE
                ksm.write_tunables(run=1, pages_to_scan=10000, sleep_millisecs=10)
                t2 = time.monotonic()
                while time.monotonic() - t2 < args.merge_timeout:
                    if (ksm.read_counters().pages_sharing or 0) >= before + grow:
                        break
                    time.sleep(1.0)
                ksm.wait_full_scans(2, timeout=args.merge_timeout)
                c = ksm.read_counters()
                fig.add(f"{key}.merge_seconds", round(time.monotonic() - t2, 1), "s")
                fig.add(f"{key}.pages_shared", c.pages_shared)
                fig.add(f"{key}.pages_sharing", c.pages_sharing)
            used = used_bytes()
            fleet.verify("a").raise_if_failed()  # the content is still what was written
        per_guest = (used - base) / n
        fig.add(f"{key}.used_after_gib", round(used / GIB, 2), f"GiB (load {load()})")
        fig.add(f"{key}.per_guest_mib", round(per_guest / MIB, 1), "MiB (used delta / guests)")
    return float(per_guest)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--guests", type=int, default=48)
    parser.add_argument("--memory", type=int, default=320, help="MiB per guest (see above)")
    parser.add_argument("--fill", type=int, default=192, help="MiB each guest fills")
    parser.add_argument("--accel", default="auto")
    parser.add_argument("--concurrency", type=int, default=default_concurrency())
    parser.add_argument("--merge-timeout", type=float, default=900.0, metavar="S")
    add_json_option(parser)
    args = parser.parse_args()
    fig = Figures("guest density (bench/bench_density.py)", args)
    fig.note(
        f"{args.guests} guests x {args.memory} MiB, each filling {args.fill} MiB identical "
        f"across guests ({PATTERN}), THP off"
    )
    with signals_as_interrupt():  # SIGTERM tears the fleet down like Ctrl-C
        off = one_pass(args, fig, merge=False)
        on = one_pass(args, fig, merge=True)
    total = procfs.meminfo()["MemTotal"]
    budget = total - 2 * GIB
    fig.add("ratio_no_ksm_over_ksm", round(off / on, 2), "x (per-guest memory)")
    fig.add("budget_gib", round(budget / GIB, 1), "GiB (MemTotal - 2 GiB)")
    fig.add("fit_no_ksm", int(budget // off), "guests (derived from the measured per-guest)")
    fig.add("fit_ksm", int(budget // on), "guests (derived from the measured per-guest)")
    fig.note(
        "fits are derived: budget / measured per-guest memory; with KSM the once-held copy is "
        f"amortised over {args.guests} guests, so more guests would cost slightly less each"
    )
    fig.finish(args.json)


if __name__ == "__main__":
    main()
