"""report.md's forecast section: every knob set forecast, and forecast against measured."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from harness.console import plural


def _v(x: Any, unit: str = "") -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.3g}{unit}"
    return f"{x}{unit}"


def _mib(x: Any) -> str:
    return "-" if x is None else f"{x / 2**20:.1f} MiB"


def _pct(x: Any) -> str:
    return "-" if x is None else f"{100 * x:+.1f}%"


def forecast_lines(rec: Mapping[str, Any]) -> list[str]:
    """Markdown for one forecast step's record (harness.playbook.forecast_step)."""
    f = rec["forecast"]
    share = f"{100 * f['target_share']:g}%"
    cal = f.get("calibration")
    out = [
        "",
        f"Forecast (line {rec.get('line')}): {plural(f['captured_pages'], 'page')} captured "
        f"from {plural(len(f['targets']), 'guest')}; "
        + (f"calibration of {cal['measured']}" if cal else "not calibrated (rough times)"),
        "",
        f"| knobs | saved | general_profit | full scans to {share} | s to {share} "
        f"| ksmd CPU s to {share} | steady ksmd CPU |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in f["results"]:
        mark = " (recommended)" if r["name"] == f.get("recommended") else ""
        steady = r.get("steady_cpu_share")
        out.append(
            f"| `{r['name']}`{mark} | {_mib(r['saved_bytes'])} | {_mib(r['general_profit'])} | "
            f"{_v(r['full_scans_to_target'])} | {_v(r['seconds_to_target'])} | "
            f"{_v(r['cpu_seconds_to_target'])} | "
            + ("-" if steady is None else f"{100 * steady:.2f}%")
            + " |"
        )
    if not f.get("recommended"):
        out.append(f"\nNo recommendation: {f.get('no_recommendation')}")
    applied = rec.get("applied")
    if applied:
        fc, ms, err = applied["forecast"], applied["measured"], applied["error"]
        checks = applied.get("checks", {})
        out += [
            "",
            f"Forecast against measured (KSM turned on with `{f.get('recommended')}`):",
            "",
            "| figure | forecast | measured | error | check |",
            "|---|---|---|---|---|",
        ]
        for key, text, fmt in (
            ("saved_bytes", "saved", _mib),
            ("seconds_to_target", f"seconds to {share}", _v),
            ("cpu_seconds_to_target", f"ksmd CPU seconds to {share}", _v),
            ("full_scans_to_target", f"full scans to {share}", _v),
            ("general_profit", "general_profit", _mib),
        ):
            c = checks.get(key)
            check = "" if c is None else f"{c['status']} (within {100 * c['tolerance']:g}%)"
            out.append(
                f"| {text} | {fmt(fc.get(key))} | {fmt(ms.get(key))} | {_pct(err.get(key))} "
                f"| {check} |"
            )
    return out
