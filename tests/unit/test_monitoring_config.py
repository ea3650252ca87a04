"""Pure monitoring builders: file_sd targets, prometheus.yml, rules, dashboard, shipped files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from harness.monitoring.config import file_sd_targets, prometheus_config, render
from harness.monitoring.dashboard import dashboard, queries
from harness.monitoring.rules import RuleSettings, alert_rules, recording_rules
from harness.remote.inventory import load_inventory

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "playbooks" / "inventory.example.yaml"


def test_file_sd_targets_carry_host_and_inventory_labels() -> None:
    a = {"host": "kvm-a", "rack": "r1", "ksm_expected": "true"}
    b = {"host": "kvm-b", "rack": "r2", "ksm_expected": "false"}
    assert file_sd_targets(load_inventory(EXAMPLE)) == [
        {"targets": ["192.0.2.11:9712"], "labels": a},
        {"targets": ["192.0.2.12:9712"], "labels": b},
    ]


def test_prometheus_config_points_at_relative_rule_and_target_files() -> None:
    assert prometheus_config() == {
        "global": {"scrape_interval": "15s", "evaluation_interval": "15s"},
        "rule_files": ["rules/ksm_recording_rules.yml", "rules/ksm_alert_rules.yml"],
        "scrape_configs": [
            {
                "job_name": "ksm",
                "honor_labels": False,
                "file_sd_configs": [{"files": ["targets/ksm.json"], "refresh_interval": "1m"}],
            }
        ],
    }


def test_recording_rules_cover_the_issue_figures() -> None:
    rules = recording_rules()["groups"][0]["rules"]
    by_name = {}
    for r in rules:
        by_name.setdefault(r["record"], []).append(r)
    assert set(by_name) == {
        "host:ksm_saved_bytes:sum",
        "fleet:ksm_saved_bytes:sum",
        "host:ksm_sharing_ratio:ratio",
        "host:ksm_waste_ratio:ratio",
        "host:ksm_volatile_share:ratio",
        "host:ksm_full_scans:rate",
        "host:ksm_pages_scanned:rate",
        "host:ksm_model_delta:abs",
        "host:ksm_model_minus_kernel:pages",
        "host:ksm_ksmd_cpu:ratio",
    }
    assert by_name["host:ksm_ksmd_cpu:ratio"][0]["expr"] == "rate(ksm_ksmd_cpu_seconds_total[5m])"
    assert by_name["host:ksm_full_scans:rate"][0]["expr"] == "rate(ksm_full_scans_total[5m])"
    assert [r["labels"]["counter"] for r in by_name["host:ksm_model_minus_kernel:pages"]] == [
        "pages_shared",
        "pages_sharing",
        "pages_unshared",
    ]


def test_alert_rules_and_for_override() -> None:
    alerts = alert_rules()["groups"][0]["rules"]
    assert [(a["alert"], a["for"]) for a in alerts] == [
        ("KsmdStalled", "15m"),
        ("KsmWastedEffort", "30m"),
        ("KsmVolatilePagesHigh", "30m"),
        ("KsmModelDelta", "5m"),
        ("KsmModelDivergence", "15m"),
        ("KsmGeneralProfitNegative", "30m"),
        ("KsmOffWhereExpected", "10m"),
        ("KsmExporterDown", "5m"),
    ]
    short = alert_rules(RuleSettings(stall_window="4s", model_tolerance=3).with_for("2s"))
    group = short["groups"][0]
    assert {a["for"] for a in group["rules"]} == {"2s"}
    assert 'increase(ksm_full_scans_total{source="kernel"}[4s]) == 0' in group["rules"][0]["expr"]
    assert group["rules"][3]["expr"] == 'host:ksm_model_delta:abs{source=""} > 3'
    assert group["rules"][4]["expr"] == (
        'abs(ksm_model_delta_ratio{source="model"}) > 0.05'
        ' and abs(ksm_model_delta{source="model"}) > 256'
    )
    assert group["rules"][5]["expr"] == 'ksm_general_profit_bytes{source="kernel"} < 0'
    assert "interval" not in group
    assert alert_rules(RuleSettings(interval="1s"))["groups"][0]["interval"] == "1s"


def test_dashboard_has_the_six_sections_and_valid_layout() -> None:
    model = json.loads(json.dumps(dashboard()))  # survives a JSON round trip
    rows = [p["title"] for p in model["panels"] if p["type"] == "row"]
    assert rows == [
        "Fleet overview",
        "Per host",
        "Per guest",
        "Kernel vs model",
        "Live twin: kernel vs model vs what-if",
        "Nightly",
    ]
    panels = [p for p in model["panels"] if p["type"] != "row"]
    assert len(panels) >= 6
    ids = [p["id"] for p in model["panels"]]
    assert len(ids) == len(set(ids))
    cells = set()
    for p in panels:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps another panel"
                cells.add((x, y))
        assert [t["refId"] for t in p["targets"]] == [chr(65 + i) for i in range(len(p["targets"]))]
    exprs = [e for _, e in queries(model)]
    assert any("ksm_process_merging_pages" in e for e in exprs)  # per guest
    assert any("ksm_model_delta" in e for e in exprs)  # kernel vs model
    # the live twin: what-ifs by source, chains, ksmd CPU measured and estimated, twin health
    for series in ("ksm_saved_bytes", "ksm_stable_node_dups", "host:ksm_ksmd_cpu:ratio",
                   "ksm_twin_capture_seconds", "ksm_twin_lag_full_scans",
                   "ksm_twin_captured_pages", 'ksm_model_delta{source="model"'):  # fmt: skip
        assert any(series in e for e in exprs), series
    assert all('host=~"$host"' in e for e in exprs if "ALERTS" not in e)
    names = [v["name"] for v in model["templating"]["list"]]
    assert names == ["datasource", "host", "playbook"]
    # The nightly row reads only what `ksmh run --push` pushed, filtered by playbook and host.
    nightly = [e for _, e in queries(model, rows=("Nightly",))]
    assert len(nightly) == 8
    assert all('job="ksm_nightly", playbook=~"$playbook", host=~"$host"' in e for e in nightly)
    assert not any("$playbook" in e for _, e in queries(model, rows=("Fleet overview",)))
    assert len(queries(model)) == len(nightly) + len(
        queries(
            model,
            rows=(
                "Fleet overview",
                "Per host",
                "Per guest",
                "Kernel vs model",
                "Live twin: kernel vs model vs what-if",
            ),
        )
    )


def test_prometheus_config_scrapes_a_pushgateway_only_when_asked() -> None:
    assert [j["job_name"] for j in prometheus_config()["scrape_configs"]] == ["ksm"]
    jobs = prometheus_config(pushgateway="127.0.0.1:9091")["scrape_configs"]
    assert jobs[1] == {
        "job_name": "ksm_nightly",
        "honor_labels": True,  # keep the pushed job/playbook/host labels
        "static_configs": [{"targets": ["127.0.0.1:9091"]}],
    }
    assert jobs[0]["job_name"] == "ksm"


def test_shipped_monitoring_files_are_the_generator_output() -> None:
    """monitoring/ holds the example inventory's config; regenerate it when this fails:
    ksmh monitoring config playbooks/inventory.example.yaml --out monitoring"""
    for rel, text in render(load_inventory(EXAMPLE)).items():
        assert (ROOT / "monitoring" / rel).read_text() == text, rel
        if rel.endswith(".yml"):
            yaml.safe_load(text)


def test_cli_writes_every_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from harness.cli import main

    code = main(["monitoring", "config", str(EXAMPLE), "--out", str(tmp_path), "--for", "2s"])
    out = capsys.readouterr().out.splitlines()
    assert code == 0
    assert out[:5] == [
        str(tmp_path / rel)
        for rel in (
            "prometheus.yml",
            "targets/ksm.json",
            "rules/ksm_recording_rules.yml",
            "rules/ksm_alert_rules.yml",
            "grafana/ksm-dashboard.json",
        )
    ]
    alerts = yaml.safe_load((tmp_path / "rules/ksm_alert_rules.yml").read_text())
    assert {a["for"] for a in alerts["groups"][0]["rules"]} == {"2s"}
    json.loads((tmp_path / "grafana/ksm-dashboard.json").read_text())


def test_cli_rejects_a_bad_duration_and_a_bad_inventory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from harness.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["monitoring", "config", str(EXAMPLE), "--out", str(tmp_path), "--for", "2 min"])
    assert exc.value.code == 2
    assert "not a Prometheus duration: '2 min'" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("hosts:\n  a: {address: h, user: u, key_file: /k, port: 0}\n")
    assert main(["monitoring", "config", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"ksmh: error: {bad}:2: hosts.a.port: 0 is out of range 1..65535"
    assert not (tmp_path / "o").exists()


def test_cli_pushgateway_option(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from harness.cli import main

    out = tmp_path / "o"
    assert main(["monitoring", "config", str(EXAMPLE), "--out", str(out),
                 "--pushgateway", "127.0.0.1:9091"]) == 0  # fmt: skip
    cfg = yaml.safe_load((out / "prometheus.yml").read_text())
    assert cfg["scrape_configs"][1]["static_configs"] == [{"targets": ["127.0.0.1:9091"]}]
    for bad in ("http://127.0.0.1:9091", "127.0.0.1", "host:70000"):
        with pytest.raises(SystemExit) as exc:
            main(["monitoring", "config", str(EXAMPLE), "--out", str(out), "--pushgateway", bad])
        assert exc.value.code == 2
        assert f"expected HOST:PORT, got {bad!r}" in capsys.readouterr().err
