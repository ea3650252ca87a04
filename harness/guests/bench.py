"""Fleet benchmark: prints figures, asserts nothing.  `python -m harness.guests.bench`

1. boot-to-ready of one 256 MiB guest, and of 16 x 256 MiB guests (accel as resolved, TCG here);
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
import re
import statistics
import time
from pathlib import Path

from harness.guests.fleet import Fleet

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
    t0 = time.monotonic()
    fleet = Fleet(count, memory, mem_merge=False, concurrency=concurrency, ready_timeout=600)
    result = fleet.up()
    wall = time.monotonic() - t0
    result.raise_if_failed()
    return wall, [r.seconds for r in result.values()], fleet


def bench_boot(args: argparse.Namespace) -> None:
    wall, _, fleet = boot_times(1, 256, 1)
    try:
        accel = fleet.accel.accel if fleet.accel else "?"
        print(f"boot-to-ready, 1 x 256 MiB ({accel}): {wall:.1f} s (incl. image check, accel)")
        pid = next(iter(fleet.pids().values()))
        ram, rss, pss = smaps_split(pid, 256)
        print(
            f"  QEMU after boot: guest RAM Rss {ram / MIB:.0f} MiB; outside RAM: "
            f"Rss {rss / MIB:.1f} MiB, Pss {pss / MIB:.1f} MiB"
        )
    finally:
        fleet.down()
    n = args.count
    wall, each, fleet = boot_times(n, 256, args.concurrency)
    try:
        print(
            f"boot-to-ready, {n} x 256 MiB, concurrency {args.concurrency}: {wall:.1f} s wall; "
            f"per guest median {statistics.median(each):.1f} s, max {max(each):.1f} s"
        )
        splits = [smaps_split(pid, 256) for pid in fleet.pids().values()]
        pss_all = [x[2] / MIB for x in splits]
        rss_all = [x[1] / MIB for x in splits]
        ram_all = [x[0] / MIB for x in splits]
        print(
            f"host overhead per guest beyond its RAM (outside the RAM block), median: "
            f"Pss {statistics.median(pss_all):.1f} MiB (max {max(pss_all):.1f}), "
            f"Rss {statistics.median(rss_all):.1f} MiB; guest RAM resident after boot: "
            f"{statistics.median(ram_all):.0f} MiB"
        )
    finally:
        fleet.down()


def bench_overcommit(args: argparse.Namespace) -> None:
    from harness.ksm.lock import ksm_lock
    from harness.ksm.sysfs import SysfsBackend

    ksm = SysfsBackend()
    n, memory, fill, want = args.guests, 256, args.fill, 192
    with ksm_lock(), ksm.saved():
        ksm.write_tunables(run=0)
        with Fleet(n, memory, mem_merge=True, ready_timeout=600) as fleet:
            fleet.fill("a", f"{fill}M", "mix:11:common=100,zero=0").raise_if_failed()
            pids = fleet.pids()
            off = [smaps_split(p, memory) for p in pids.values()]
            before = ksm.read_counters()
            ksm.write_tunables(run=1, pages_to_scan=5000, sleep_millisecs=10)
            t0 = time.monotonic()
            target = (before.pages_sharing or 0) + (n - 1) * fill * MIB // 4096
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
    unique = statistics.mean(r - m * 4096 for r, m in zip(rss_on, merged, strict=True))
    shared = (c.pages_shared or 0) * 4096
    print(f"overcommit: {n} guests x {memory} MiB measured, each filling {fill} MiB identical")
    print(
        f"  merge time until pages_sharing grew by {(n - 1) * fill * MIB // 4096}: {merge_s:.1f} s"
    )
    print(f"  KSM after 2 more full scans: pages_shared {c.pages_shared}, "
          f"pages_sharing {c.pages_sharing}")  # fmt: skip
    print(f"  per guest without KSM: {per_off / MIB:.0f} MiB (QEMU Rss: guest RAM "
          f"{ram_off / MIB:.0f} + the rest {over_off / MIB:.0f})")  # fmt: skip
    print(f"  per guest with KSM: {unique / MIB:.0f} MiB unmerged, plus {shared / MIB:.0f} MiB of "
          "KSM pages held once for all guests")  # fmt: skip
    # Extrapolate to a `want` MiB fill: the extra identical memory is private without KSM
    # (capped by the guest's RAM) and only grows the once-held KSM pages with it.
    extra = (want - fill) * MIB
    per_off_w = min(ram_off + max(extra, 0), memory * MIB) + over_off
    shared_w = shared + max(extra, 0)
    print(f"  host budget: MemTotal - 1 GiB host reserve = {budget / MIB / 1024:.1f} GiB")
    print(f"  256 MiB guests filling {want} MiB that fit without KSM: "
          f"{int(budget // per_off_w)} ({per_off_w / MIB:.0f} MiB each)")  # fmt: skip
    print(f"  256 MiB guests filling {want} MiB that fit with KSM: "
          f"{int((budget - shared_w) // unique)} ({unique / MIB:.0f} MiB each + "
          f"{shared_w / MIB:.0f} MiB shared once)")  # fmt: skip


def bench_debian(args: argparse.Namespace) -> None:
    """Sharing that identical Debian (systemd) guests get from KSM with no workload at all."""
    from harness.guests.debian_image import ensure_debian_image
    from harness.ksm.lock import ksm_lock
    from harness.ksm.sysfs import SysfsBackend

    image = ensure_debian_image()
    ksm = SysfsBackend()
    n, memory = args.debian_guests, 256
    with ksm_lock(), ksm.saved():
        ksm.write_tunables(run=0)
        t0 = time.monotonic()
        with Fleet(n, memory, image=image, mem_merge=True, ready_timeout=600) as fleet:
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
            c = ksm.read_counters()
            merged = {n_: ksm.ksm_stat(p).merging_pages or 0 for n_, p in pids.items()}
    gain = ((c.pages_sharing or 0) - (before.pages_sharing or 0)) * 4096
    print(f"debian (mmdebstrap minbase + systemd) x {n}, {memory} MiB, idle after boot:")
    print(f"  boot-to-ready of the fleet: {boot:.1f} s; QEMU Rss per guest "
          f"{statistics.mean(rss) / MIB:.0f} MiB")  # fmt: skip
    print(f"  settled in {time.monotonic() - t1:.1f} s: pages_shared {c.pages_shared}, "
          f"pages_sharing {c.pages_sharing} (+{gain // 4096} since run=1)")  # fmt: skip
    print(f"  saved: {gain / MIB:.0f} MiB for {n} guests = {gain / MIB / n:.0f} MiB per guest; "
          f"merging pages per guest: {sorted(merged.values())}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m harness.guests.bench")
    parser.add_argument("--count", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--guests", type=int, default=4, help="guests of the overcommit run")
    parser.add_argument(
        "--fill", type=int, default=160, help="MiB each fills (192 does not fit in 256 MiB here)"
    )
    parser.add_argument("--debian", action="store_true", help="also the Debian image sharing")
    parser.add_argument("--debian-guests", type=int, default=3)
    parser.add_argument("--skip-boot", action="store_true")
    parser.add_argument("--skip-overcommit", action="store_true")
    args = parser.parse_args()
    if not args.skip_boot:
        bench_boot(args)
    if not args.skip_overcommit:
        bench_overcommit(args)
    if args.debian:
        bench_debian(args)


if __name__ == "__main__":
    main()
