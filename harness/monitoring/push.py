"""Push a finished run's summary to a Prometheus Pushgateway (`ksmh run --push URL`).

The push is built from the run's results (run.json, through harness.report.nightly), after the
run ended: it cannot change the run's verdict or exit status. It replaces the metrics of the
group job="ksm_nightly", playbook=<name>, host=<host> (HTTP PUT, prometheus-client's
push_to_gateway), so a playbook that lost a sweep value does not leave its old series behind.
Pushgateway adds push_time_seconds per group. The outcome, failed or not, is recorded in
run.json under "push"; a failure is one line for the caller to print, never a traceback.
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry, push_to_gateway
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from harness.errors import HarnessError
from harness.report.nightly import DELTA_COUNTERS, Night, parse_started, summarize
from harness.report.results import RUN_FILE

JOB = "ksm_nightly"
PREFIX = "ksm_nightly_"
STATUSES = ("passed", "failed", "error")
EXPECTATION_STATUSES = ("passed", "failed", "skipped")
INFO_FIELDS = (
    "kernel_release",
    "qemu",
    "libvirt",
    "model_profile",
    "harness_revision",
    "playbook_digest",
)
TIMEOUT = 10.0


def check_url(text: str) -> str:
    """The Pushgateway URL to push to: http(s)://HOST[:PORT][/PATH], or HOST:PORT (http).

    HarnessError (one line plus a hint) when it cannot be one."""
    hint = "e.g. --push http://pushgateway.example:9091 (or 127.0.0.1:9091)"
    url = text.strip()
    if "://" not in url:
        url = "http://" + url
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise HarnessError(f"push URL {text!r}: {exc}", hint=hint) from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise HarnessError(f"push URL {text!r}: expected http(s)://HOST[:PORT]", hint=hint)
    if parts.query or parts.fragment:
        raise HarnessError(f"push URL {text!r}: no query or fragment allowed", hint=hint)
    del port  # parsed only to validate it
    return url.rstrip("/")


def _g(name: str, doc: str, labels: tuple[str, ...] = ()) -> GaugeMetricFamily:
    return GaugeMetricFamily(PREFIX + name, doc, labels=list(labels))


def families(night: Night, run: Mapping[str, Any]) -> list[GaugeMetricFamily]:
    """Every metric family of a run's push (pure: unit tested without a Pushgateway)."""
    prov = night.provenance
    info = _g("run_info", "the run: id, backend, accelerator and its provenance",
              ("run_id", "backend", "accelerator", *INFO_FIELDS))  # fmt: skip
    info.add_metric(
        [night.run_id, night.backend, str(run.get("accelerator") or ""),
         *(str(prov.get(k) or "") for k in INFO_FIELDS)], 1.0)  # fmt: skip
    verdict = _g("verdict", "1 for the run's verdict (passed, failed, error)", ("status",))
    for s in STATUSES:
        verdict.add_metric([s], 1.0 if night.status == s else 0.0)
    out = [info, verdict]
    if isinstance(night.exit_status, int):
        out.append(_one("exit_status", "exit status of ksmh run", night.exit_status))
    if night.duration_seconds is not None:
        out.append(_one("duration_seconds", "wall time of the run", night.duration_seconds))
    for key, name in (("started", "started"), ("finished", "finished")):
        when = parse_started(run.get(key))
        if when is not None:
            out.append(_one(f"{name}_timestamp_seconds", f"when the run {name}", when.timestamp()))
    exp = _g("expectations", "expectations of the run by verdict", ("status",))
    for s in EXPECTATION_STATUSES:
        exp.add_metric([s], float(night.expectations.get(s, 0)))
    out.append(exp)
    saved = _g("saved_bytes", "saved bytes at the end of the run", ("source",))
    for source, v in night.saved_bytes.items():
        saved.add_metric([source], v)
    out.append(saved)
    out += _phase_families(night)
    out += _sweep_families(night)
    if night.boot_median is not None and night.boot_max is not None:
        out.append(_one("guest_boot_seconds", "median guest boot time", night.boot_median))
        out.append(_one("guest_boot_max_seconds", "slowest guest boot time", night.boot_max))
    return [f for f in out if f.samples]


def _one(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(PREFIX + name, doc, value=float(value))


def _phase_families(night: Night) -> list[GaugeMetricFamily]:
    pages = _g("phase_pages", "KSM page counters at the end of a phase",
               ("phase", "source", "counter"))  # fmt: skip
    scans = _g("phase_full_scans", "full scans at the end of a phase", ("phase", "source"))
    saved = _g("phase_saved_bytes", "saved bytes at the end of a phase", ("phase", "source"))
    profit = _g("phase_general_profit_bytes", "general_profit at the end of a phase",
                ("phase", "source"))  # fmt: skip
    delta = _g("kernel_minus_model_pages", "kernel minus model at the end of a phase",
               ("phase", "counter"))  # fmt: skip
    for phase, ends in night.phase_end.items():
        for source, end in ends.items():
            for counter in DELTA_COUNTERS:
                if counter in end:
                    pages.add_metric([phase, source, counter], end[counter])
            for fam, key in ((scans, "full_scans"), (saved, "saved_bytes"),
                             (profit, "general_profit")):  # fmt: skip
                if key in end:
                    fam.add_metric([phase, source], end[key])
    for (phase, counter), v in night.kernel_minus_model.items():
        delta.add_metric([phase, counter], v)
    return [pages, scans, saved, profit, delta]


def _sweep_families(night: Night) -> list[GaugeMetricFamily]:
    labels = ("phase", "tunable", "value")
    secs = _g("sweep_converge_seconds", "seconds to converge at a sweep value", labels)
    cpu = _g("sweep_ksmd_cpu_seconds", "ksmd CPU seconds to converge at a sweep value", labels)
    ok = _g("sweep_converged", "1 when the sweep value converged in time", labels)
    for p in night.sweeps:
        key = [p.phase, p.tunable, str(p.value)]
        ok.add_metric(key, 1.0 if p.converged else 0.0)
        if p.seconds is not None:
            secs.add_metric(key, p.seconds)
        if p.ksmd_cpu_seconds is not None:
            cpu.add_metric(key, p.ksmd_cpu_seconds)
    waits = _g("wait_converge_seconds", "seconds a converged wait took", ("phase", "line"))
    for w in night.waits:
        if w.seconds is not None:
            waits.add_metric([w.phase, str(w.line)], w.seconds)
    return [secs, cpu, ok, waits]


class _Fixed(Collector):
    def __init__(self, fams: list[GaugeMetricFamily]) -> None:
        self.fams = fams

    def collect(self) -> Iterator[Metric]:
        yield from self.fams


@dataclass(frozen=True)
class PushOutcome:
    ok: bool
    line: str  # what to print: one line
    record: dict[str, Any]


def _reason(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        body = exc.read().decode(errors="replace").strip().splitlines()
        return f"HTTP {exc.code} {exc.reason}" + (f": {body[0][:200]}" if body else "")
    if isinstance(exc, urllib.error.URLError):
        return str(exc.reason)
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def push_run(
    directory: Path, url: str, host: str | None = None, timeout: float = TIMEOUT
) -> PushOutcome:
    """Push the run in `directory` (its run.json) and record the outcome there.

    `host` overrides the run's own host name in the grouping key (a fleet run pushes each
    host under its inventory name). Never raises for a push that fails."""
    path = Path(directory) / RUN_FILE
    try:
        run = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        line = f"ksmh: push skipped: cannot read {path}: {exc}"
        return PushOutcome(False, line, {"ok": False, "error": str(exc)})
    night = summarize(run, str(directory))
    grouping = {"playbook": night.playbook, "host": host or night.host}
    fams = families(night, run)
    series = sum(len(f.samples) for f in fams)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed(fams))
    record: dict[str, Any] = {
        "url": url,
        "job": JOB,
        "grouping_key": grouping,
        "pushed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "series": series,
    }
    where = ", ".join(f"{k}={v}" for k, v in grouping.items())
    try:
        push_to_gateway(url, job=JOB, registry=registry, grouping_key=grouping, timeout=timeout)
    except Exception as exc:  # any failure of the push is reported, never raised
        reason = _reason(exc)
        record.update(ok=False, error=reason)
        line = f"ksmh: push to {url} failed: {reason} (the run's verdict stands)"
    else:
        record.update(ok=True, error=None)
        line = f"pushed {series} series to {url} (job {JOB}, {where})"
    run["push"] = record
    try:
        tmp = path.with_name(f".{path.name}.push.tmp")
        tmp.write_text(json.dumps(run, indent=2, default=str) + "\n")
        os.replace(tmp, path)
    except OSError as exc:
        line += f"; could not record it in {path}: {exc.strerror or exc}"
    return PushOutcome(bool(record["ok"]), line, record)


def push_results(directory: Path, url: str, host: str | None = None) -> bool:
    """Push one results directory; print one line (stderr when it failed, prefixed with
    `host` when given: a fleet's host pushed under its inventory name). Never raises."""
    prefix = f"{host}: " if host else ""
    if not (directory / "run.json").exists():
        print(f"{prefix}ksmh: push to {url} skipped: the run wrote no results", file=sys.stderr)
        return False
    outcome = push_run(directory, url, host=host)
    print(prefix + outcome.line, file=sys.stdout if outcome.ok else sys.stderr)
    return outcome.ok
