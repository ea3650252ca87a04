"""Scanning: how long one full scan takes at the current knobs, and who fills it."""

from __future__ import annotations

import math

from harness.console import plural
from harness.doctor.analysis import Analysis
from harness.doctor.catalog import Evidence, Finding
from harness.doctor.facts import Facts
from harness.doctor.findings.common import knob, pages, window

# ksmd's page visits per second of CPU over unique pages, measured here (DESIGN.md: 0.29-0.33
# M/s on one core): the CPU part of a scan, on top of the sleeps.
VISITS_PER_SECOND = 300_000


def mergeable_pages(f: Facts) -> int:
    return sum(u.mergeable_pages for u in f.users)


def full_scan_seconds(f: Facts) -> float | None:
    """Seconds one full scan takes: batches x sleep + visits / rate; None if it never ends."""
    n = mergeable_pages(f)
    per_batch = f.host.knob("pages_to_scan")
    sleep_ms = f.host.knob("sleep_millisecs")
    if per_batch is None or sleep_ms is None:
        return None
    if per_batch == 0:
        return math.inf if n else 0.0
    return math.ceil(n / per_batch) * sleep_ms / 1000 + n / VISITS_PER_SECOND


def suggested_pages_to_scan(f: Facts) -> int:
    """pages_to_scan for one full scan in target_scan_seconds at the current sleep."""
    n = mergeable_pages(f)
    sleep_ms = f.host.knob("sleep_millisecs") or 0
    sleeping = f.options.target_scan_seconds - n / VISITS_PER_SECOND
    if sleep_ms == 0 or sleeping <= 0:
        return max(100, n)
    return max(100, math.ceil(n * sleep_ms / 1000 / sleeping))


def _slow(a: Analysis) -> list[Finding]:
    f = a.facts
    secs = full_scan_seconds(f)
    if secs is None or secs <= f.options.max_scan_seconds or f.host.knob("run") == 2:
        return []
    n = mergeable_pages(f)
    top = sorted(f.users, key=lambda u: -u.mergeable_pages)[:3]
    shares = ", ".join(
        f"pid {u.pid} ({u.comm}) {u.mergeable_pages:,} ({100 * u.mergeable_pages / n:.0f}%)"
        for u in top
    )
    ev = [
        knob(f.host, "pages_to_scan"),
        knob(f.host, "sleep_millisecs"),
        Evidence(
            "/proc/*/smaps",
            f"{n} present pages in mergeable VMAs of {plural(len(f.users), 'process')}: {shares}",
        ),
    ]
    w = f.watch
    if w is not None and w.delta("pages_scanned") is not None:
        ev.append(
            Evidence(
                str(f.host.ksm_root / "pages_scanned"),
                f"+{w.delta('pages_scanned')} in {window(f):.1f} s "
                f"(full_scans +{w.delta('full_scans')})",
            )
        )
    took = "never ends" if math.isinf(secs) else f"takes about {secs:,.0f} s"
    fix = f"ksmh set pages_to_scan={suggested_pages_to_scan(f)}"
    if f.host.advisor == "scan-time":
        fix = "ksmh set advisor_max_pages_to_scan=... (the advisor caps pages_to_scan)"
    return [
        Finding(
            "slow-full-scan",
            "host",
            f"one full scan of {pages(n)} {took} at pages_to_scan="
            f"{f.host.knobs.get('pages_to_scan')}, sleep_millisecs="
            f"{f.host.knobs.get('sleep_millisecs')}; a page merges after two visits",
            tuple(ev),
            fix + f" (one full scan in ~{f.options.target_scan_seconds:.0f} s)",
            data={"seconds": None if math.isinf(secs) else round(secs, 1), "pages": n},
        )
    ]


def _foreign(a: Analysis) -> list[Finding]:
    f = a.facts
    if f.selection == "all":
        return []
    n = max(mergeable_pages(f), 1)
    out = []
    for u in f.users:
        if u.pid in f.processes:
            continue
        out.append(
            Finding(
                "foreign-ksm-user",
                f"pid {u.pid} ({u.comm})",
                f"pid {u.pid} ({u.cmdline or u.comm}) is not among the examined processes "
                f"but KSM scans it: {pages(u.mergeable_pages)}, "
                f"{100 * u.mergeable_pages / n:.0f}% of every full scan",
                (
                    Evidence(f"/proc/{u.pid}/ksm_stat", u.reason),
                    Evidence(
                        f"/proc/{u.pid}/smaps",
                        f"{u.mergeable_pages} present pages in mergeable VMAs",
                    ),
                ),
                f"stop it, exclude its memory (MADV_UNMERGEABLE, prctl(PR_SET_MEMORY_MERGE, "
                f"0)), or examine it too (ksmh doctor --pid {u.pid} ... or --all)",
                pid=u.pid,
                data={"mergeable_pages": u.mergeable_pages},
            )
        )
    return out


def check(a: Analysis) -> list[Finding]:
    if not a.facts.host.present:
        return []
    return _slow(a) + _foreign(a)
