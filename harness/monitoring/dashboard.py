"""A Grafana dashboard for KSM, built as data: fleet overview, per host, per guest, kernel vs
model, the live twin (kernel vs model vs what-if twins, from `ksmh export --twin`) and
nightly runs.

Panels query the recorded series of harness.monitoring.rules where there is one, so the
dashboard and the alerts agree. `$host` is a multi-value template variable (All = `.*`);
`$datasource` picks the Prometheus data source, so the JSON imports anywhere unchanged. The
Nightly row reads what `ksmh run --push` left in a Pushgateway (job ksm_nightly, grouped by
playbook and host; `$playbook` filters it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

H = 'host=~"$host"'
KH = f'source="kernel", {H}'
MH = f'source="model", {H}'
NH = f'job="ksm_nightly", playbook=~"$playbook", {H}'
NIGHTLY = "{{playbook}} {{host}}"


@dataclass(frozen=True)
class Panel:
    """One panel: title, type, unit, queries as (expr, legend)."""

    title: str
    kind: str  # "stat" | "timeseries"
    unit: str
    queries: tuple[tuple[str, str], ...]
    description: str = ""


# (row title, panels): the layout, top to bottom.
LAYOUT: tuple[tuple[str, tuple[Panel, ...]], ...] = (
    (
        "Fleet overview",
        (
            Panel(
                "Memory saved by KSM (fleet)",
                "stat",
                "bytes",
                ((f"sum(host:ksm_saved_bytes:sum{{{KH}}})", "saved"),),
                "(pages_sharing + ksm_zero_pages) x page size, summed over the selected hosts.",
            ),
            Panel(
                "Hosts with ksmd merging",
                "stat",
                "none",
                ((f"sum(ksm_run{{{KH}}} == bool 1)", "hosts"),),
            ),
            Panel(
                "Firing KSM alerts",
                "stat",
                "none",
                (('sum(ALERTS{alertstate="firing", alertname=~"Ksm.*"}) or vector(0)', "alerts"),),
            ),
            Panel(
                "Memory saved per host",
                "timeseries",
                "bytes",
                ((f"host:ksm_saved_bytes:sum{{{KH}}}", "{{host}}"),),
            ),
        ),
    ),
    (
        "Per host",
        (
            Panel(
                "Sharing ratio (pages_sharing / pages_shared)",
                "timeseries",
                "none",
                ((f"host:ksm_sharing_ratio:ratio{{{KH}}}", "{{host}}"),),
            ),
            Panel(
                "Waste ratio (pages_unshared / pages_sharing)",
                "timeseries",
                "none",
                ((f"host:ksm_waste_ratio:ratio{{{KH}}}", "{{host}}"),),
                "High: ksmd keeps checking pages that never merge.",
            ),
            Panel(
                "Volatile share of tracked pages",
                "timeseries",
                "percentunit",
                ((f"host:ksm_volatile_share:ratio{{{KH}}}", "{{host}}"),),
            ),
            Panel(
                "ksmd progress",
                "timeseries",
                "ops",
                (
                    (f"host:ksm_full_scans:rate{{{KH}}}", "{{host}} full scans/s"),
                    (f"host:ksm_pages_scanned:rate{{{KH}}}", "{{host}} pages scanned/s"),
                ),
            ),
            Panel(
                "General profit (saved minus metadata)",
                "timeseries",
                "bytes",
                ((f"ksm_general_profit_bytes{{{KH}}}", "{{host}}"),),
            ),
        ),
    ),
    (
        "Per guest",
        (
            Panel(
                "Merged pages per guest process",
                "timeseries",
                "none",
                ((f"ksm_process_merging_pages{{{H}}}", "{{host}} {{name}} ({{pid}})"),),
            ),
            Panel(
                "KSM profit per guest process",
                "timeseries",
                "bytes",
                ((f"ksm_process_profit_bytes{{{H}}}", "{{host}} {{name}} ({{pid}})"),),
            ),
        ),
    ),
    (
        "Kernel vs model",
        (
            Panel(
                "pages_sharing: kernel and model",
                "timeseries",
                "none",
                ((f"ksm_pages_sharing{{{H}}}", "{{host}} {{source}}"),),
            ),
            Panel(
                "Memory saved: kernel and model",
                "timeseries",
                "bytes",
                ((f"host:ksm_saved_bytes:sum{{{H}}}", "{{host}} {{source}}"),),
            ),
            Panel(
                "Model delta per counter (runner)",
                "timeseries",
                "none",
                ((f"ksm_model_delta{{{H}}}", "{{host}} {{counter}}"),),
                "model - kernel, reported by the playbook runner; alert beyond tolerance.",
            ),
            Panel(
                "Model minus kernel (exporter sources)",
                "timeseries",
                "none",
                ((f"host:ksm_model_minus_kernel:pages{{{H}}}", "{{host}} {{counter}}"),),
            ),
        ),
    ),
    (
        "Live twin: kernel vs model vs what-if",
        (
            Panel(
                "Twin delta, kernel - model",
                "stat",
                "none",
                ((f'max(abs(ksm_model_delta{{{MH}, counter="pages_sharing"}}))', "pages"),),
                "Largest |kernel - model| of pages_sharing over the selected hosts at the "
                "twin's last sync.",
            ),
            Panel(
                "Twin CPU, share of one core",
                "stat",
                "percentunit",
                ((f"max(rate(ksm_twin_cpu_seconds_total{{{H}}}[5m]))", "twin"),),
                "The twin's own CPU (capture, replay, model scans): it keeps under its budget.",
            ),
            Panel(
                "Twin lag (full scans)",
                "stat",
                "none",
                ((f"max(ksm_twin_lag_full_scans{{{H}}})", "lag"),),
                "Full scans the kernel made since the twin's last sync.",
            ),
            Panel(
                "Twin capture time",
                "stat",
                "s",
                ((f"max(ksm_twin_capture_seconds{{{H}}})", "capture"),),
            ),
            Panel(
                "Memory saved: kernel, twin and what-if twins",
                "timeseries",
                "bytes",
                ((f"ksm_saved_bytes{{{H}}}", "{{host}} {{source}}"),),
                "source=kernel is measured, model is the live twin, what-if:NAME a twin with "
                "other knobs over the same memory: what the host would save with them.",
            ),
            Panel(
                "pages_shared and pages_sharing by source",
                "timeseries",
                "none",
                (
                    (f"ksm_pages_shared{{{H}}}", "{{host}} {{source}} shared"),
                    (f"ksm_pages_sharing{{{H}}}", "{{host}} {{source}} sharing"),
                ),
            ),
            Panel(
                "Chains and dups by source (max_page_sharing what-ifs)",
                "timeseries",
                "none",
                (
                    (f"ksm_stable_node_chains{{{H}}}", "{{host}} {{source}} chains"),
                    (f"ksm_stable_node_dups{{{H}}}", "{{host}} {{source}} dups"),
                ),
            ),
            Panel(
                "General profit by source",
                "timeseries",
                "bytes",
                ((f"ksm_general_profit_bytes{{{H}}}", "{{host}} {{source}}"),),
                "Saved minus KSM's metadata; the KsmGeneralProfitNegative alert fires below 0.",
            ),
            Panel(
                "ksmd CPU, share of one core: measured and estimated",
                "timeseries",
                "percentunit",
                ((f"host:ksm_ksmd_cpu:ratio{{{H}}}", "{{host}} {{source}}"),),
                "rate(ksm_ksmd_cpu_seconds_total): the kernel's from /proc/<ksmd>/schedstat, "
                "the models' from `ksmh calibrate`'s cost per page visit.",
            ),
            Panel(
                "Live twin delta per counter (kernel - model)",
                "timeseries",
                "none",
                ((f"ksm_model_delta{{{MH}}}", "{{host}} {{counter}}"),),
                "At each sync; KsmModelDivergence fires when it stays above its share.",
            ),
            Panel(
                "Twin: capture seconds and lag",
                "timeseries",
                "none",
                (
                    (f"ksm_twin_capture_seconds{{{H}}}", "{{host}} capture s"),
                    (f"ksm_twin_lag_full_scans{{{H}}}", "{{host}} lag (scans)"),
                    (f"ksm_twin_capture_every_full_scans{{{H}}}", "{{host}} every N scans"),
                ),
            ),
            Panel(
                "Twin: pages captured and read",
                "timeseries",
                "none",
                (
                    (f"ksm_twin_captured_pages{{{H}}}", "{{host}} captured"),
                    (f"ksm_twin_read_pages{{{H}}}", "{{host}} read (not unchanged KSM pages)"),
                ),
            ),
        ),
    ),
    (
        "Nightly",
        (
            Panel(
                "Nightly runs not passing",
                "stat",
                "none",
                (
                    (
                        f'count(ksm_nightly_verdict{{status!="passed", {NH}}} == 1) or vector(0)',
                        "runs",
                    ),
                ),
                "Latest pushed run per playbook and host whose verdict is failed or error.",
            ),
            Panel(
                "Hours since the last nightly push",
                "stat",
                "h",
                ((f"(time() - max(push_time_seconds{{{NH}}})) / 3600", "hours"),),
            ),
            Panel(
                "Nightly run duration",
                "timeseries",
                "s",
                ((f"ksm_nightly_duration_seconds{{{NH}}}", NIGHTLY),),
            ),
            Panel(
                "Nightly saved bytes (end of run)",
                "timeseries",
                "bytes",
                ((f"ksm_nightly_saved_bytes{{{NH}}}", NIGHTLY + " {{source}}"),),
            ),
            Panel(
                "Nightly seconds to converge per sweep value",
                "timeseries",
                "s",
                (
                    (
                        f"ksm_nightly_sweep_converge_seconds{{{NH}}}",
                        NIGHTLY + " {{tunable}}={{value}}",
                    ),
                ),
            ),
            Panel(
                "Nightly ksmd CPU seconds per sweep value",
                "timeseries",
                "s",
                (
                    (
                        f"ksm_nightly_sweep_ksmd_cpu_seconds{{{NH}}}",
                        NIGHTLY + " {{tunable}}={{value}}",
                    ),
                ),
            ),
            Panel(
                "Nightly guest boot time (median)",
                "timeseries",
                "s",
                ((f"ksm_nightly_guest_boot_seconds{{{NH}}}", NIGHTLY),),
            ),
            Panel(
                "Nightly kernel - model per counter",
                "timeseries",
                "none",
                (
                    (
                        f"ksm_nightly_kernel_minus_model_pages{{{NH}}}",
                        NIGHTLY + " {{phase}} {{counter}}",
                    ),
                ),
            ),
        ),
    ),
)

DS = {"type": "prometheus", "uid": "${datasource}"}


def _panel(p: Panel, pid: int, x: int, y: int, w: int, h: int) -> dict[str, Any]:
    return {
        "id": pid,
        "type": p.kind,
        "title": p.title,
        "description": p.description,
        "datasource": DS,
        "gridPos": {"h": h, "w": w, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": p.unit}, "overrides": []},
        "options": {},
        "targets": [
            {"refId": chr(ord("A") + i), "datasource": DS, "expr": e, "legendFormat": legend}
            for i, (e, legend) in enumerate(p.queries)
        ],
    }


def dashboard(title: str = "KSM fleet") -> dict[str, Any]:
    """The dashboard JSON model (schemaVersion 39: Grafana 10/11)."""
    panels: list[dict[str, Any]] = []
    y = 0
    pid = 1
    for row_title, row_panels in LAYOUT:
        panels.append(
            {
                "id": pid,
                "type": "row",
                "title": row_title,
                "collapsed": False,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
                "panels": [],
            }
        )
        pid += 1
        y += 1
        # Stats are small (6 wide, 4 high); graphs take half the width.
        x = 0
        for p in row_panels:
            w, h = (6, 4) if p.kind == "stat" else (12, 8)
            if x + w > 24:
                x = 0
                y += 8
            panels.append(_panel(p, pid, x, y, w, h))
            pid += 1
            x += w
        y += 8
    return {
        "title": title,
        "uid": "ksm-fleet",
        "tags": ["ksm", "ksm-harness"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "type": "datasource",
                    "query": "prometheus",
                    "label": "Prometheus",
                },
                {
                    "name": "host",
                    "type": "query",
                    "datasource": DS,
                    "query": {"query": "label_values(ksm_run, host)", "refId": "hosts"},
                    "definition": "label_values(ksm_run, host)",
                    "refresh": 2,
                    "multi": True,
                    "includeAll": True,
                    "allValue": ".*",
                    "label": "Host",
                },
                {
                    "name": "playbook",
                    "type": "query",
                    "datasource": DS,
                    "query": {
                        "query": "label_values(ksm_nightly_verdict, playbook)",
                        "refId": "playbooks",
                    },
                    "definition": "label_values(ksm_nightly_verdict, playbook)",
                    "refresh": 2,
                    "multi": True,
                    "includeAll": True,
                    "allValue": ".*",
                    "label": "Playbook (nightly)",
                },
            ]
        },
        "annotations": {"list": []},
        "panels": panels,
    }


def queries(model: dict[str, Any], rows: tuple[str, ...] | None = None) -> list[tuple[str, str]]:
    """Every (panel title, expr) of a dashboard model, or those of the given rows only: what
    the tests run against Prometheus."""
    out = []
    row = ""
    for p in model["panels"]:
        if p.get("type") == "row":
            row = p["title"]
        elif rows is None or row in rows:
            out += [(p["title"], t["expr"]) for t in p.get("targets", [])]
    return out
