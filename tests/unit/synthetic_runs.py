"""Synthetic run.json documents, shaped exactly like the runner's (see a real results/ run):
one night per call, with the figures a trend and a push read set by the caller."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

T0 = datetime(2026, 11, 1, 2, 0, 0, tzinfo=UTC)


def night(
    i: int,
    *,
    playbook: str = "nightly",
    host: str = "alpha",
    kernel: str = "6.18.44",
    saved: int = 400 * 2**20,
    sweep: dict[int, tuple[float, float]] | None = None,  # pages_to_scan -> (seconds, cpu)
    boot: float = 5.0,
    shared_delta: int = -2,
    sharing_delta: int = 0,
    unmerged_delta: int = 9,
    unshared: int = 5680,
    thp: bool = False,
    expectations: tuple[str, ...] = ("passed", "passed", "passed", "passed"),
    status: str | None = None,
    revision: str = "a" * 40,
    backend: str = "kernel",
) -> dict[str, Any]:
    """Night i (started i days after T0) of a series."""
    started = T0 + timedelta(days=i)
    run_id = started.strftime("%Y%m%d-%H%M%S-") + playbook
    pages_sharing = saved // 4096
    kernel_end = {
        "pages_shared": 6645,
        "pages_sharing": pages_sharing,
        "pages_unshared": unshared,
        "pages_volatile": 33236 - unshared,
        "full_scans": 5,
        "stable_node_chains": 4,
        "stable_node_dups": 400,
        "ksm_zero_pages": 0,
        "general_profit": saved - 10_000_000,
        "saved_bytes": saved,
        "sharing_ratio": pages_sharing / 6645,
    }
    # The model's unshared is 0 at every sync; its unmerged pages (unshared + volatile) are 9
    # fewer than the kernel's by default, however the kernel splits them (as measured here).
    model_end = {**kernel_end, "pages_shared": 6645 - shared_delta, "pages_unshared": 0,
                 "pages_sharing": pages_sharing - sharing_delta,
                 "pages_volatile": 33236 - unmerged_delta}  # fmt: skip
    counters: dict[str, Any] = {}
    if backend == "kernel":
        counters["kernel"] = {"start": {}, "end": kernel_end, "delta": {}}
    counters["model"] = {"start": {}, "end": model_end, "delta": {}}
    points = [
        {"value": v, "scans": 4, "pages_sharing": pages_sharing, "converged": True,
         "seconds": s, "ksmd_cpu_seconds": c}
        for v, (s, c) in sorted((sweep or {}).items())
    ]  # fmt: skip
    failed = [f"line {20 + j}: x" for j, e in enumerate(expectations) if e == "failed"]
    verdict = status or ("failed" if failed else "passed")
    return {
        "run_id": run_id,
        "playbook": {"name": playbook, "file": f"playbooks/{playbook}.yaml", "source": {}},
        "started": started.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "backend": backend,
        "host": {
            "hostname": host,
            "kernel_release": kernel,
            "qemu": "QEMU emulator version 7.2.22",
        },
        "provenance": {
            "host": host,
            "kernel_release": kernel,
            "qemu": "7.2.22",
            "libvirt": "9.0.0",
            "model_profile": "6.11",
            "model_version": "0.1.0",
            "harness_version": "0.1.0",
            "harness_revision": revision,
            "harness_dirty": False,
            "playbook_digest": "sha256:" + "0" * 64,
        },
        "accelerator": "tcg",
        "guests": [
            {"name": g, "index": j, "pid": 100 + j, "thp": thp}
            for j, g in enumerate(("g00", "g01"))
        ],
        "boot": {
            "seconds": {"g00": boot, "g01": boot + 1},
            "median": boot + 0.5,
            "max": boot + 1,
        },
        "phases": [
            {
                "name": "fill",
                "t_start": 10.0,
                "waits": [
                    {
                        "line": 14,
                        "kind": "converged",
                        "scans": 2,
                        "seconds": 2.5,
                        "timed_out": False,
                        "t_end": 20.0,
                    }
                ],
                "expectations": [
                    {"text": f"e{j}", "line": 20 + j, "status": e, "detail": ""}
                    for j, e in enumerate(expectations)
                ],
                "sweeps": [{"tunable": "pages_to_scan", "line": 30, "points": points}]
                if points
                else [],
                "counters": counters,
            }
        ],
        "finished": (started + timedelta(minutes=15)).strftime("%Y-%m-%dT%H:%M:%S%z"),
        "duration_seconds": 900.0,
        "shadow": {"profile": "6.11"},
        "verdict": {
            "status": verdict,
            "exit_status": {"passed": 0, "failed": 1}.get(verdict, 2),
            "failed": failed,
            "error": "boom" if verdict == "error" else None,
        },
    }


def write(root: Path, run: dict[str, Any]) -> Path:
    d = root / run["provenance"]["host"] / run["run_id"]
    d.mkdir(parents=True, exist_ok=True)
    (d / "run.json").write_text(json.dumps(run, indent=2))
    return d
