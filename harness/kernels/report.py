"""matrix.json and matrix.md of a kernel matrix run, and the comparison of two runs.

matrix.json: {"kernels": [{"release", "profile", "scenarios", "exact", "mismatches": [{
"scenario", "seed", "full_scans", "phase", "counter", "kernel", "model"} or {"scenario", "seed",
"error"}], "where", "seconds", "boot_seconds", "probed", "features", "error"}], "seeds",
"seed_start", "examples", "created"}.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.errors import HarnessError

if TYPE_CHECKING:
    from harness.kernels.matrix import KernelRow

MATRIX_JSON = "matrix.json"
MATRIX_MD = "matrix.md"


def write_matrix(out: Path, rows: list[KernelRow], meta: dict[str, Any]) -> Path:
    """Write DIR/matrix.json and DIR/matrix.md (atomically); returns the json path."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        doc = {"kernels": [r.as_json() for r in rows], **meta, "created": time.time()}
        for name, text in (
            (MATRIX_JSON, json.dumps(doc, indent=1) + "\n"),
            (MATRIX_MD, render(doc)),
        ):
            tmp = out / f".{name}.tmp"
            tmp.write_text(text)
            os.replace(tmp, out / name)
    except OSError as exc:
        raise HarnessError(f"cannot write the matrix to {out}: {exc.strerror or exc}") from None
    return out / MATRIX_JSON


def render(doc: dict[str, Any]) -> str:
    """matrix.md: one row per kernel, then every mismatch."""
    lines = [
        "# Kernel matrix: real KSM against ksm_model",
        "",
        f"{doc.get('examples', '?')} worked examples and {doc.get('seeds', '?')} random "
        f"scenarios (seeds {doc.get('seed_start', 0)}..) per kernel.",
        "",
        "| kernel | where | profile | scenarios | exact | seconds | boot |",
        "|---|---|---|---|---|---|---|",
    ]
    for k in doc["kernels"]:
        boot = "-" if k.get("boot_seconds") is None else f"{k['boot_seconds']:.1f}"
        exact = "ERROR" if k.get("error") else f"{k['exact']}"
        lines.append(
            f"| {k['release']} | {k.get('where', '-')} | {k['profile']} | {k['scenarios']} "
            f"| {exact} | {k.get('seconds', 0):.0f} | {boot} |"
        )
    for k in doc["kernels"]:
        if k.get("error"):
            lines += ["", f"## {k['release']}: not checked", "", k["error"]]
        if not k["mismatches"]:
            continue
        lines += ["", f"## {k['release']}: {len(k['mismatches'])} mismatches", ""]
        lines += ["| scenario | seed | F | phase | counter | kernel | model |"]
        lines += ["|---|---|---|---|---|---|---|"]
        for m in k["mismatches"]:
            if m.get("error"):
                lines.append(f"| {m['scenario']} | {_c(m['seed'])} | | error | {m['error']} | | |")
                continue
            lines.append(
                f"| {m['scenario']} | {_c(m['seed'])} | {m['full_scans']} | {m['phase']} "
                f"| {m['counter']} | {_c(m['kernel'])} | {_c(m['model'])} |"
            )
    return "\n".join(lines) + "\n"


def _c(v: object) -> str:
    return "-" if v is None else str(v)


def is_matrix(path: Path) -> bool:
    """A matrix.json, or a directory holding one."""
    return path.name == MATRIX_JSON or (path.is_dir() and (path / MATRIX_JSON).exists())


def read_matrix(path: Path) -> dict[str, Any]:
    file = path if path.name == MATRIX_JSON else path / MATRIX_JSON
    try:
        doc = json.loads(file.read_text())
    except OSError as exc:
        raise HarnessError(f"cannot read {file}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise HarnessError(f"{file} is not JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("kernels"), list):
        raise HarnessError(f"{file} is not a kernel matrix (no 'kernels' list)")
    for k in doc["kernels"]:
        if not isinstance(k, dict) or not {"release", "exact", "scenarios"} <= set(k):
            raise HarnessError(f"{file}: a kernel entry lacks release/scenarios/exact")
    return doc


def compare_matrices(a: dict[str, Any], b: dict[str, Any]) -> tuple[str, bool]:
    """Markdown of what changed from matrix A to matrix B, and whether B is worse (a kernel
    lost exact scenarios, gained a new mismatch or an error, or went missing)."""
    ka = {k["release"]: k for k in a["kernels"]}
    kb = {k["release"]: k for k in b["kernels"]}
    lines = [
        "# Kernel matrix: A -> B",
        "",
        "| kernel | profile | exact A | exact B | new mismatches | fixed |",
        "|---|---|---|---|---|---|",
    ]
    worse = False
    notes: list[str] = []
    for rel in [*ka, *(r for r in kb if r not in ka)]:
        x, y = ka.get(rel), kb.get(rel)
        if y is None:
            worse = True
            lines.append(f"| {rel} | {x['profile'] if x else '-'} | {_ratio(x)} | missing | | |")
            continue
        if x is None:
            lines.append(f"| {rel} | {y['profile']} | new | {_ratio(y)} | | |")
            continue
        sa = {_key(m) for m in x["mismatches"]}
        sb = {_key(m) for m in y["mismatches"]}
        new, fixed = sorted(sb - sa), sorted(sa - sb)
        if new or (y.get("error") and not x.get("error")) or _rate(y) < _rate(x):
            worse = True
        profile = (
            x["profile"] if x["profile"] == y["profile"] else f"{x['profile']} -> {y['profile']}"
        )
        lines.append(
            f"| {rel} | {profile} | {_ratio(x)} | {_ratio(y)} | {len(new)} | {len(fixed)} |"
        )
        notes += [f"- {rel}: new mismatch in {n}" for n in new]
        notes += [f"- {rel}: now exact: {f}" for f in fixed]
    if notes:
        lines += ["", *notes]
    return "\n".join(lines) + "\n", worse


def _key(m: dict[str, Any]) -> str:
    return str(m["scenario"])


def _ratio(k: dict[str, Any] | None) -> str:
    if k is None:
        return "-"
    return "ERROR" if k.get("error") else f"{k['exact']}/{k['scenarios']}"


def _rate(k: dict[str, Any]) -> float:
    return k["exact"] / k["scenarios"] if k["scenarios"] and not k.get("error") else 0.0
