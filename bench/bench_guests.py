"""Fleet benchmark: prints figures, asserts nothing.

    sudo .venv/bin/python bench/bench_guests.py [--count 16] [--big 64] [--concurrency N] \
        [--debian] [--json FILE]

1. boot-to-ready of one 256 MiB guest, of 16 x 256 MiB guests and of 64 x 128 MiB guests
   (accel and machine as resolved: TCG and microvm here; concurrency 2 per CPU by default);
2. host memory overhead per guest beyond its RAM: the Rss of every QEMU mapping except the
   guest-RAM block (from /proc/PID/smaps), after boot;
3. overcommit estimate for 256 MiB guests that each fill 192 MiB of memory identical across
   guests (`mix:S:common=100`, pages distinct within a guest): measured on 4 guests with KSM off
   (Rss per guest) and on (per-guest unmerged Rss, plus the KSM pages held once), extrapolated to
   MemTotal minus a 1 GiB host reserve. The host is never actually filled.
Steps 1-2 use mem-merge off; step 3 holds the host KSM lock and restores every knob.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import time
from pathlib import Path

from benchlib import Figures, add_json_option

from harness.guests.fleet import Fleet
from harness.guests.spec import FleetSpec, default_concurrency
from harness.kinds import ImageKind
from harness.ksm.types import PAGE_SIZE
from harness.signals import signals_as_interrupt

MIB = 1024 * 1024
_HEADER = re.compile(r"^[0-9a-f]+-[0-9a-f]+ ")


def smaps_split(pid: int, ram_mib: int) -> tuple[int, int, int]:
    """(Rss of the guest RAM mapping, Rss and Pss of everything else) in bytes.

    Pss divides pages shared with other processes (QEMU's libraries, mostly) among them, so
    the Pss outside the RAM block is what one more guest costs the host beyond its RAM.
    """
    ram = other_rss = other_pss = 0
    size = rss = pss = 0

    def account() -> None:
        nonlocal ram, other_rss, other_pss
        # The guest RAM block: the one anonymous mapping at least as large as the guest's RAM.
        if size >= ram_mib * MIB:
            ram += rss
        else:
            other_rss += rss
            other_pss += pss

    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        if _HEADER.match(line):
            account()
            size = rss = pss = 0
        elif line.startswith("Size:"):
            size = int(line.split()[1]) * 1024
        elif line.startswith("Rss:"):
            rss = int(line.split()[1]) * 1024
        elif line.startswith("Pss:"):
            pss = int(line.split()[1]) * 1024
    account()
    return ram, other_rss, other_pss


def meminfo_kib(key: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def boot_times(count: int, memory: int, concurrency: int) -> tuple[float, list[float], Fleet]:
    """Wall seconds from Fleet.up() to every agent ready, each guest's seconds, the fleet."""
    t0 = time.monotonic()
    spec = FleetSpec(count, memory, mem_merge=False, concurrency=concurrency, ready_timeout=600)
    fleet = Fleet(spec)
    result = fleet.up()
    wall = time.monotonic() - t0
    result.raise_if_failed()
    return wall, [r.seconds for r in result.values()], fleet


def bench_boot(args: argparse.Namespace, fig: Figures) -> None:
    wall, _, fleet = boot_times(1, 256, 1)
    try:
        fig.add("accel", str(fleet.accel.accel) if fleet.accel else None)
        fig.add("machine", str(fleet.machine))
        fig.add("kernel", fleet.image.kernel.name if fleet.image else None)
        fig.add("boot_1x256.seconds", round(wall, 1), "s (incl. image check, accel)")
        pid = next(iter(fleet.pids().values()))
        ram, rss, pss = smaps_split(pid, 256)
        fig.add("boot_1x256.ram_rss_mib", round(ram / MIB), "MiB (guest RAM resident)")
        fig.add("boot_1x256.other_rss_mib", round(rss / MIB, 1), "MiB (outside guest RAM)")
        fig.add("boot_1x256.other_pss_mib", round(pss / MIB, 1), "MiB (outside guest RAM)")
    finally:
        fleet.down()
    n = args.count
    wall, each, fleet = boot_times(n, 256, args.concurrency)
    try:
        key = f"boot_{n}x256"
        fig.add(f"{key}.concurrency", args.concurrency)
        fig.add(f"{key}.seconds", round(wall, 1), f"s wall to all ready (load {load()})")
        fig.add(f"{key}.per_guest_median_seconds", round(statistics.median(each), 1), "s")
        fig.add(f"{key}.per_guest_max_seconds", round(max(each), 1), "s")
        splits = [smaps_split(pid, 256) for pid in fleet.pids().values()]
        pss_all = [x[2] / MIB for x in splits]
        fig.add("overhead_per_guest.pss_median_mib", round(statistics.median(pss_all), 1), "MiB")
        fig.add("overhead_per_guest.pss_max_mib", round(max(pss_all), 1), "MiB")
        rss = statistics.median(x[1] / MIB for x in splits)
        fig.add("overhead_per_guest.rss_median_mib", round(rss, 1), "MiB")
        ram = statistics.median(x[0] / MIB for x in splits)
        fig.add("guest_ram_resident_after_boot_mib", round(ram), "MiB (median)")
    finally:
        fleet.down()
    if args.big:
        wall, each, fleet = boot_times(args.big, 128, args.concurrency)
        fleet.down()
        key = f"boot_{args.big}x128"
        fig.add(f"{key}.seconds", round(wall, 1), f"s wall to all ready (load {load()})")
        fig.add(f"{key}.per_guest_median_seconds", round(statistics.median(each), 1), "s")


def load() -> float:
    return round(os.getloadavg()[0], 2)


def bench_overcommit(args: argparse.Namespace, fig: Figures) -> None:
    from harness.ksm.lock import ksm_lock
    from harness.ksm.sysfs import SysfsBackend

    ksm = SysfsBackend()
    n, memory, fill, want = args.guests, 256, args.fill, 192
    grow = (n - 1) * fill * MIB // PAGE_SIZE
    with ksm_lock(), ksm.saved():
        ksm.write_tunables(run=0)
        with Fleet(FleetSpec(n, memory, ready_timeout=600)) as fleet:
            fleet.fill("a", f"{fill}M", "mix:11:common=100,zero=0").raise_if_failed()
            pids = fleet.pids()
            off = [smaps_split(p, memory) for p in pids.values()]
            before = ksm.read_counters()
            ksm.write_tunables(run=1, pages_to_scan=5000, sleep_millisecs=10)
            t0 = time.monotonic()
            target = (before.pages_sharing or 0) + grow
            while time.monotonic() - t0 < 300:
                if (ksm.read_counters().pages_sharing or 0) >= target:
                    break
                time.sleep(0.5)
            merge_s = time.monotonic() - t0
            ksm.wait_full_scans(2, timeout=120)
            c = ksm.read_counters()
            merged = [ksm.ksm_stat(p).merging_pages or 0 for p in pids.values()]
            rss_on = [sum(smaps_split(p, memory)[:2]) for p in pids.values()]
            fleet.verify("a").raise_if_failed()
    budget = (meminfo_kib("MemTotal") - 1024 * 1024) * 1024
    ram_off = statistics.mean(x[0] for x in off)
    over_off = statistics.mean(x[1] for x in off)
    per_off = ram_off + over_off
    unique = statistics.mean(r - m * PAGE_SIZE for r, m in zip(rss_on, merged, strict=True))
    shared = (c.pages_shared or 0) * PAGE_SIZE
    fig.note(f"overcommit: {n} guests x {memory} MiB measured, each filling {fill} MiB identical")
    fig.add("overcommit.merge_seconds", round(merge_s, 1), f"s (pages_sharing +{grow})")
    fig.add("overcommit.pages_shared", c.pages_shared, "after 2 more full scans")
    fig.add("overcommit.pages_sharing", c.pages_sharing, "after 2 more full scans")
    fig.add("overcommit.per_guest_without_ksm_mib", round(per_off / MIB), "MiB (QEMU Rss)")
    fig.add("overcommit.per_guest_with_ksm_mib", round(unique / MIB), "MiB unmerged")
    fig.add("overcommit.ksm_pages_held_once_mib", round(shared / MIB), "MiB")
    # Extrapolate to a `want` MiB fill: the extra identical memory is private without KSM
    # (capped by the guest's RAM) and only grows the once-held KSM pages with it.
    extra = (want - fill) * MIB
    per_off_w = min(ram_off + max(extra, 0), memory * MIB) + over_off
    shared_w = shared + max(extra, 0)
    fig.add("overcommit.host_budget_gib", round(budget / MIB / 1024, 1), "GiB (MemTotal - 1 GiB)")
    fig.add(f"overcommit.fit_without_ksm_{want}mib", int(budget // per_off_w), "guests (derived)")
    fig.add(f"overcommit.fit_with_ksm_{want}mib", int((budget - shared_w) // unique),
            "guests (derived)")  # fmt: skip


def bench_debian(args: argparse.Namespace, fig: Figures) -> None:
    """Sharing that identical Debian (systemd) guests get from KSM with no workload at all."""
    from harness.ksm.lock import ksm_lock
    from harness.ksm.sysfs import SysfsBackend

    ksm = SysfsBackend()
    n, memory = args.debian_guests, 256
    spec = FleetSpec(n, memory, image=ImageKind.DEBIAN, ready_timeout=600)
    with ksm_lock(), ksm.saved():
        ksm.write_tunables(run=0)
        t0 = time.monotonic()
        with Fleet(spec) as fleet:
            boot = time.monotonic() - t0
            pids = fleet.pids()
            if len(pids) < n:
                raise SystemExit(f"only {len(pids)} of {n} Debian guests came up")
            rss = [sum(smaps_split(p, memory)[:2]) for p in pids.values()]
            before = ksm.read_counters()
            ksm.write_tunables(run=1, pages_to_scan=5000, sleep_millisecs=10)
            last = -1
            t1 = time.monotonic()
            while time.monotonic() - t1 < 300:
                ksm.wait_full_scans(2, timeout=120)
                sharing = ksm.read_counters().pages_sharing or 0
                if last >= 0 and abs(sharing - last) <= max(last // 100, 16):
                    break  # settled: under 1 % change over two full scans
                last = sharing
            settled = time.monotonic() - t1
            c = ksm.read_counters()
    gain = ((c.pages_sharing or 0) - (before.pages_sharing or 0)) * PAGE_SIZE
    fig.note(f"debian (mmdebstrap minbase + systemd) x {n}, {memory} MiB, idle after boot")
    fig.add("debian.fleet_ready_seconds", round(boot, 1), "s (image built or found first)")
    fig.add("debian.rss_per_guest_mib", round(statistics.mean(rss) / MIB), "MiB")
    fig.add("debian.settled_seconds", round(settled, 1), "s")
    fig.add("debian.saved_mib", round(gain / MIB), "MiB")
    fig.add("debian.saved_per_guest_mib", round(gain / MIB / n), "MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=16)
    parser.add_argument("--big", type=int, default=64, help="guests of 128 MiB (0: skip)")
    parser.add_argument("--concurrency", type=int, default=default_concurrency())
    parser.add_argument("--guests", type=int, default=4, help="guests of the overcommit run")
    parser.add_argument(
        "--fill", type=int, default=160, help="MiB each fills (192 does not fit in 256 MiB here)"
    )
    parser.add_argument("--debian", action="store_true", help="also the Debian image sharing")
    parser.add_argument("--debian-guests", type=int, default=3)
    parser.add_argument("--skip-boot", action="store_true")
    parser.add_argument("--skip-overcommit", action="store_true")
    add_json_option(parser)
    args = parser.parse_args()
    fig = Figures("guest fleets (bench/bench_guests.py)", args)
    with signals_as_interrupt():  # SIGTERM tears the fleets down like Ctrl-C
        if not args.skip_boot:
            bench_boot(args, fig)
        if not args.skip_overcommit:
            bench_overcommit(args, fig)
        if args.debian:
            bench_debian(args, fig)
    fig.finish(args.json)


if __name__ == "__main__":
    main()
