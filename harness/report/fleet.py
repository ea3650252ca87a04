"""The aggregate report of a playbook run on a fleet of hosts: fleet.json and report.md.

One row per host (verdict, backend, accelerator, guests, end-of-run counters, saved bytes,
expectations, time, where its results are), the fleet-wide saved bytes, and every failure:
hosts that errored (with the error and hint) and expectations that failed, per host.
Pure functions over each host's run.json (or the error that stopped it), so they are unit
tested without hosts.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from harness.console import plural
from harness.units import human_bytes

FLEET_FILE = "fleet.json"
REPORT_FILE = "report.md"


@dataclass(frozen=True)
class HostSummary:
    """What one host's run came to. status: passed | failed | error."""

    host: str
    status: str
    exit_status: int
    address: str = ""
    error: str | None = None
    hint: str | None = None
    run_id: str | None = None
    directory: str | None = None  # the local copy of its results/<run-id>/
    backend: str | None = None
    accelerator: str | None = None
    kernel_release: str | None = None
    guests: int | None = None
    seconds: float | None = None
    pages_shared: int | None = None
    pages_sharing: int | None = None
    saved_bytes: int | None = None  # primary source, at the last sync of the run
    peak_saved_bytes: int | None = None  # primary source, highest over the run's samples
    model_saved_bytes: int | None = None
    expectations: dict[str, int] = field(default_factory=dict)  # status -> count
    failed: list[str] = field(default_factory=list)


def _last_end(run: Mapping[str, Any], source: str) -> dict[str, Any]:
    """The counters at the end of the last phase that recorded `source`."""
    for phase in reversed(run.get("phases") or []):
        end = (phase.get("counters") or {}).get(source, {}).get("end")
        if end:
            return dict(end)
    return {}


def _int(v: Any) -> int | None:
    return int(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def summarize_host(
    host: str,
    exit_status: int,
    run: Mapping[str, Any] | None,
    *,
    samples: Sequence[Mapping[str, Any]] = (),
    directory: str | None = None,
    address: str = "",
    error: str | None = None,
    hint: str | None = None,
) -> HostSummary:
    """One host's row from its run.json and samples (either may be missing after an error).

    The status follows the exit status of `ksmh run` there (0 passed, 1 failed, else error);
    an error without a run.json keeps only what the caller knows.
    """
    status = {0: "passed", 1: "failed"}.get(exit_status, "error")
    if run is None:
        return HostSummary(host, status, exit_status, address, error, hint, directory=directory)
    verdict = run.get("verdict") or {}
    primary = str(run.get("backend") or "kernel")
    end = _last_end(run, primary)
    model_end = _last_end(run, "model")
    peak = [
        v
        for row in samples
        if row.get("source") == primary and (v := _int(row.get("saved_bytes"))) is not None
    ]
    counts: dict[str, int] = {}
    for phase in run.get("phases") or []:
        for e in phase.get("expectations") or []:
            counts[e.get("status", "?")] = counts.get(e.get("status", "?"), 0) + 1
    return HostSummary(
        host=host,
        status=status,
        exit_status=exit_status,
        address=address,
        error=error or verdict.get("error"),
        hint=hint,
        run_id=run.get("run_id"),
        directory=directory,
        backend=run.get("backend"),
        accelerator=run.get("accelerator"),
        kernel_release=(run.get("host") or {}).get("kernel_release"),
        guests=len(run.get("guests") or []),
        seconds=run.get("duration_seconds"),
        pages_shared=_int(end.get("pages_shared")),
        pages_sharing=_int(end.get("pages_sharing")),
        saved_bytes=_int(end.get("saved_bytes")),
        peak_saved_bytes=max(peak) if peak else _int(end.get("saved_bytes")),
        model_saved_bytes=_int(model_end.get("saved_bytes")) if primary != "model" else None,
        expectations=counts,
        failed=list(verdict.get("failed") or []),
    )


def fleet_exit_status(hosts: Sequence[HostSummary]) -> int:
    """2 when any host errored, else 1 when any expectation failed anywhere, else 0."""
    if any(h.status == "error" for h in hosts):
        return 2
    return 1 if any(h.status == "failed" for h in hosts) else 0


def fleet_document(
    fleet_id: str,
    playbook: Mapping[str, Any],
    hosts: Sequence[HostSummary],
    *,
    started: str,
    finished: str,
    options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """fleet.json: the per-host summaries plus the fleet-wide totals."""
    saved = [h.saved_bytes for h in hosts if h.saved_bytes is not None]
    peaks = [h.peak_saved_bytes for h in hosts if h.peak_saved_bytes is not None]
    return {
        "fleet_run_id": fleet_id,
        "playbook": dict(playbook),
        "started": started,
        "finished": finished,
        "options": dict(options or {}),
        "exit_status": fleet_exit_status(hosts),
        "totals": {
            "hosts": len(hosts),
            "passed": sum(h.status == "passed" for h in hosts),
            "failed": sum(h.status == "failed" for h in hosts),
            "errored": sum(h.status == "error" for h in hosts),
            "saved_bytes": sum(saved),
            "peak_saved_bytes": sum(peaks),
            "hosts_with_results": len(saved),
        },
        "hosts": [asdict(h) for h in hosts],
    }


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.1f}"
    return str(v)


TABLE_HEAD = (
    "host",
    "verdict",
    "exit",
    "backend",
    "accel",
    "guests",
    "pages_shared",
    "pages_sharing",
    "saved",
    "peak saved",
    "model saved",
    "expectations",
    "seconds",
)


def table_rows(hosts: Sequence[HostSummary]) -> list[list[str]]:
    """The per-host table as cells (shared by report.md and the terminal)."""
    rows = []
    for h in hosts:
        total = sum(h.expectations.values())
        rows.append(
            [
                h.host,
                h.status.upper(),
                str(h.exit_status),
                _cell(h.backend),
                _cell(h.accelerator),
                _cell(h.guests),
                _cell(h.pages_shared),
                _cell(h.pages_sharing),
                human_bytes(h.saved_bytes),
                human_bytes(h.peak_saved_bytes),
                human_bytes(h.model_saved_bytes),
                f"{h.expectations.get('passed', 0)}/{total}" if total else "-",
                _cell(h.seconds),
            ]
        )
    return rows


def format_table(hosts: Sequence[HostSummary]) -> str:
    """The per-host table aligned for a terminal."""
    rows = [list(TABLE_HEAD), *table_rows(hosts)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(TABLE_HEAD))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )


def failure_lines(hosts: Sequence[HostSummary]) -> list[str]:
    """One line per errored host (with its hint) and per failed expectation."""
    out = []
    for h in hosts:
        if h.status == "error":
            hint = f" (hint: {h.hint})" if h.hint else ""
            out.append(f"{h.host}: ERROR: {h.error or f'exit status {h.exit_status}'}{hint}")
        for text in h.failed:
            out.append(f"{h.host}: expectation failed: {text}")
    return out


def render_fleet_markdown(doc: Mapping[str, Any], report_dir: Path | None = None) -> str:
    """report.md of a fleet run; links to each host's report relative to report_dir."""
    hosts = [HostSummary(**h) for h in doc["hosts"]]
    totals = doc["totals"]
    pb = doc.get("playbook", {})
    status = {0: "PASSED", 1: "FAILED", 2: "ERROR"}.get(doc["exit_status"], "?")
    out = [
        f"# ksm-harness fleet run {doc['fleet_run_id']}: {pb.get('name', '?')}",
        "",
        f"**Verdict: {status}** (exit status {doc['exit_status']}): "
        f"{totals['passed']} passed, {totals['failed']} failed, {totals['errored']} errored "
        f"of {plural(totals['hosts'], 'host')}",
        "",
        f"- playbook: `{pb.get('file', '?')}`",
        f"- started {doc.get('started', '?')}, finished {doc.get('finished', '?')}",
        f"- **fleet-wide saved: {human_bytes(totals['saved_bytes'])}** "
        f"({totals['saved_bytes']} bytes at the end of each host's run, "
        f"{plural(totals['hosts_with_results'], 'host')} with results); "
        f"sum of per-host peaks {human_bytes(totals['peak_saved_bytes'])}",
        "",
        "## Hosts",
        "",
        "| " + " | ".join(TABLE_HEAD) + " | report |",
        "|---" * (len(TABLE_HEAD) + 1) + "|",
    ]
    for h, cells in zip(hosts, table_rows(hosts), strict=True):
        link = "-"
        if h.directory:
            target = Path(h.directory) / "report.md"
            if report_dir is not None:
                target = Path(os.path.relpath(target, report_dir))
            link = f"[{h.run_id or 'report'}]({target.as_posix()})"
        out.append("| " + " | ".join(cells) + f" | {link} |")
    failures = failure_lines(hosts)
    out += ["", "## Failures", ""]
    out += [f"- {line}" for line in failures] if failures else ["None."]
    return "\n".join(out) + "\n"


def write_fleet_report(directory: Path, doc: Mapping[str, Any]) -> Path:
    """Write fleet.json and report.md into directory; return the report's path."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / FLEET_FILE).write_text(json.dumps(doc, indent=2) + "\n")
    path = directory / REPORT_FILE
    path.write_text(render_fleet_markdown(doc, directory))
    return path
