"""The files of a results directory, and the in-memory recorder the runner fills.

results/<run-id>/
  run.json      playbook, host facts, accelerator, tunables, per-phase kernel and model counters
                with deltas, every expectation's verdict, sweeps, shadow-capture statistics
  samples.csv   one row per (time, source): the KSM counters, saved bytes, MemAvailable
  guests.csv    one row per (time, source, guest): merging pages (from ksm_stat)
  scans.csv     one row per (source, full scan): the counters at the end of that scan; the
                model has one for every scan it made, the kernel where the run took frozen
                per-scan samples (`scan_samples: true`); `scan` counts from the run's start
  *.png, report.md   rendered from the three above
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.errors import HarnessError
from harness.ksm.types import COUNTER_NAMES, counters_from_mapping, derive
from harness.yamlfile import Source, read_text

SAMPLE_FIELDS = ("t", "phase", "source", *COUNTER_NAMES, "saved_bytes", "mem_available")
GUEST_FIELDS = ("t", "phase", "source", "guest", "merging_pages", "rmap_items")
SCAN_FIELDS = ("source", "scan", "t", "phase", *COUNTER_NAMES)
RUN_FILE = "run.json"
SAMPLES_FILE = "samples.csv"
GUESTS_FILE = "guests.csv"
SCANS_FILE = "scans.csv"


class ResultsError(HarnessError):
    """A results directory is missing or unreadable."""


@dataclass
class Results:
    """Everything a report is made from. `run` is the run.json document."""

    run: dict[str, Any]
    samples: list[dict[str, Any]] = field(default_factory=list)
    guests: list[dict[str, Any]] = field(default_factory=list)
    scans: list[dict[str, Any]] = field(default_factory=list)

    def add_sample(
        self, t: float, phase: str, source: str, values: Mapping[str, Any], mem: int | None
    ) -> None:
        counters = {name: values.get(name) for name in COUNTER_NAMES}
        row: dict[str, Any] = {"t": round(t, 3), "phase": phase, "source": source, **counters}
        row["saved_bytes"] = derive(counters_from_mapping(counters)).saved_bytes
        row["mem_available"] = mem
        self.samples.append(row)

    def add_guest(
        self, t: float, phase: str, source: str, guest: str, stat: Mapping[str, Any]
    ) -> None:
        """One guest's ksm_stat, in the record format (harness.record: kernel field names)."""
        self.guests.append(
            {
                "t": round(t, 3),
                "phase": phase,
                "source": source,
                "guest": guest,
                "merging_pages": stat.get("ksm_merging_pages"),
                "rmap_items": stat.get("ksm_rmap_items"),
            }
        )

    def add_scan(
        self, source: str, scan: int, counters: Mapping[str, Any], t: float | None, phase: str
    ) -> None:
        row = {"source": source, "scan": scan, "t": None if t is None else round(t, 3)}
        row.update(phase=phase, **{name: counters.get(name) for name in COUNTER_NAMES})
        self.scans.append(row)

    def scan_series(self, source: str, name: str) -> tuple[list[int], list[float]]:
        """One counter at the end of each recorded full scan of one side."""
        xs, ys = [], []
        for row in self.scans:
            if row["source"] == source and row.get(name) not in (None, ""):
                xs.append(int(row["scan"]))
                ys.append(float(row[name]))
        return xs, ys

    def series(self, source: str, name: str) -> tuple[list[float], list[float]]:
        xs, ys = [], []
        for row in self.samples:
            if row["source"] == source and row.get(name) not in (None, ""):
                xs.append(float(row["t"]))
                ys.append(float(row[name]))
        return xs, ys

    def sources(self) -> list[str]:
        return sorted({r["source"] for r in self.samples})


def _cell(v: Any) -> Any:
    return "" if v is None else v


def _parse(v: str) -> Any:
    if v == "":
        return None
    try:
        return int(v)
    except ValueError:
        try:
            return float(v)
        except ValueError:
            return v


def new_results_dir(out: Path, run_id: str) -> Path:
    """Create OUT/<run_id> (or <run_id>.2, .3, ...) exclusively: two runs never share one."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ResultsError(f"cannot create the results root {out}: {exc.strerror}") from None
    for n in range(1, 1000):
        path = out / (run_id if n == 1 else f"{run_id}.{n}")
        try:
            path.mkdir()
        except FileExistsError:
            continue
        except OSError as exc:
            raise ResultsError(f"cannot create {path}: {exc.strerror}") from None
        return path
    raise ResultsError(f"{out}: 999 results directories named {run_id} exist already")


def write_results(directory: Path, res: Results) -> None:
    """Write run.json, samples.csv and guests.csv (atomically each)."""
    directory.mkdir(parents=True, exist_ok=True)
    _atomic(
        directory / RUN_FILE, json.dumps(res.run, indent=2, sort_keys=False, default=str) + "\n"
    )
    for name, fields, rows in (
        (SAMPLES_FILE, SAMPLE_FIELDS, res.samples),
        (GUESTS_FILE, GUEST_FIELDS, res.guests),
        (SCANS_FILE, SCAN_FIELDS, res.scans),
    ):
        tmp = directory / f".{name}.tmp"
        with tmp.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            w.writeheader()
            for row in rows:
                w.writerow({k: _cell(row.get(k)) for k in fields})
        os.replace(tmp, directory / name)


def _atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


MAX_FILE = 256 * 2**20  # a day of 1 s samples of a big fleet is ~100 MiB of CSV
HINT = "pass a results/<run-id> directory written by `ksmh run`"


def read_results(directory: Path) -> Results:
    """Load a results directory written by write_results; ResultsError if it is not one."""
    directory = Path(directory)
    path = directory / RUN_FILE
    if not directory.is_dir():
        what = "not a directory" if directory.exists() else "no such directory"
        raise ResultsError(f"{directory}: {what}", hint=HINT)
    if not path.exists():
        raise ResultsError(f"{directory}: no {RUN_FILE} here", hint=HINT)
    src = Source(file=str(path), error_type=ResultsError, hint=HINT)
    try:
        run = json.loads(read_text(path, src, "results file", MAX_FILE))
    except (ValueError, RecursionError) as exc:
        raise ResultsError(
            f"{path}: not valid JSON: {' '.join(str(exc).split())[:200]}", hint=HINT
        ) from None
    check_run(path, run)
    res = Results(run=run)
    for name, target in (
        (SAMPLES_FILE, res.samples),
        (GUESTS_FILE, res.guests),
        (SCANS_FILE, res.scans),
    ):
        p = directory / name
        if p.exists():
            text = read_text(
                p, Source(file=str(p), error_type=ResultsError, hint=HINT), name, MAX_FILE
            )
            try:
                rows = list(csv.DictReader(io.StringIO(text, newline="")))
            except csv.Error as exc:
                raise ResultsError(f"{p}: not valid CSV: {exc}", hint=HINT) from None
            target.extend(
                {str(k): _parse(v) for k, v in row.items() if isinstance(v, str)} for row in rows
            )
    return res


def check_run(path: Path, run: Any) -> None:
    """The shape of run.json the report and compare read: refuse anything else in one line."""
    problem = None
    if not isinstance(run, dict):
        problem = f"expected a JSON object, got {type(run).__name__}"
    elif not isinstance(run.get("phases", []), list):
        problem = "phases: expected a list"
    else:
        for i, phase in enumerate(run.get("phases", [])):
            if not isinstance(phase, dict) or not isinstance(phase.get("name"), str):
                problem = f"phases[{i}]: expected an object with a name"
                break
        for key in ("verdict", "tunables", "host", "playbook"):
            if key in run and not isinstance(run[key], dict):
                problem = problem or f"{key}: expected an object"
    if problem:
        raise ResultsError(f"{path}: not a ksmh run record: {problem}", hint=HINT)
