"""promtool accepts the generated config and rules, and its rule unit tests pin the alerts' logic.

`promtool test rules` evaluates the production settings (15m/30m for-durations) over synthetic
series in simulated time, so the thresholds and durations are checked exactly and in seconds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from harness.monitoring.config import ALERT_FILE, RECORDING_FILE, write_config
from harness.monitoring.rules import RuleSettings
from harness.remote.inventory import load_inventory
from harness.run import run

pytestmark = pytest.mark.prometheus

EXAMPLE = Path(__file__).resolve().parents[2] / "playbooks" / "inventory.example.yaml"


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("moncfg")
    write_config(load_inventory(EXAMPLE), out)
    return out


def test_promtool_check_config_and_rules(generated: Path) -> None:
    r = run(["promtool", "check", "config", generated / "prometheus.yml"])
    assert "SUCCESS: 2 rule files found" in r.stdout
    r = run(["promtool", "check", "rules", generated / RECORDING_FILE, generated / ALERT_FILE])
    assert "SUCCESS: 12 rules found" in r.stdout
    assert "SUCCESS: 8 rules found" in r.stdout


def test_promtool_accepts_short_test_settings(tmp_path: Path) -> None:
    settings = RuleSettings(rate_window="5s", stall_window="4s", interval="1s").with_for("2s")
    write_config(load_inventory(EXAMPLE), tmp_path, settings)
    run(["promtool", "check", "config", tmp_path / "prometheus.yml"])
    text = (tmp_path / ALERT_FILE).read_text()
    assert text.count("for: 2s") == 8 and "interval: 1s" in text


def _series(host: str, values: dict[str, str], **extra: str) -> list[dict[str, str]]:
    labels = {"source": "kernel", "host": host, "instance": f"{host}:9712", "job": "ksm", **extra}
    sel = ",".join(f'{k}="{v}"' for k, v in labels.items())
    return [{"series": f"{name}{{{sel}}}", "values": v} for name, v in values.items()]


def _labels(host: str, **extra: str) -> dict[str, str]:
    return {
        "severity": "warning",
        "source": "kernel",
        "host": host,
        "instance": f"{host}:9712",
        "job": "ksm",
        **extra,
    }


def _delta(counter: str, host: str, name: str = "ksm_model_delta", twin: bool = False) -> str:
    source = ',source="model"' if twin else ""
    return f'{name}{{counter="{counter}",host="{host}",instance="r:1",job="ksm"{source}}}'


def _rule_tests() -> dict[str, Any]:
    flat = {
        "ksm_run": "1x40",
        "ksm_full_scans_total": "5x40",
        "ksm_pages_shared": "100x40",
        "ksm_pages_sharing": "1000x40",
        "ksm_pages_unshared": "0x40",
        "ksm_pages_volatile": "0x40",
    }
    series = [
        # Moving for 10 minutes, then flat: a ksmd that stopped making progress at 10m.
        *_series("stuck", {**flat, "ksm_full_scans_total": "0+1x10 10+0x30"}),
        *_series("healthy", {**flat, "ksm_full_scans_total": "0+1x40"}),
        # run=1 but nothing registered: ksmd sleeps, full_scans is flat, that is no stall.
        *_series("idle", {**flat, "ksm_pages_shared": "0x40", "ksm_pages_sharing": "0x40"}),
        *_series(
            "wasteful",
            {
                **flat,
                "ksm_full_scans_total": "0+1x40",
                "ksm_pages_sharing": "100x40",
                "ksm_pages_unshared": "2000x40",
            },
        ),
        *_series("off", {"ksm_run": "0x40"}, ksm_expected="true"),
        *_series("optional", {"ksm_run": "0x40"}, ksm_expected="false"),
        {"series": _delta("pages_sharing", "exact"), "values": "16x40"},
        {"series": _delta("pages_shared", "off_by_17"), "values": "-17x40"},
        # The live twin: off by 10% (and 1000 pages) from 6m on; a twin 40 pages (40%) off
        # stays quiet (below the pages threshold), and so does the runner's exact alert.
        {"series": _delta("pages_sharing", "twin", twin=True), "values": "0x5 1000x35"},
        {
            "series": _delta("pages_sharing", "twin", "ksm_model_delta_ratio", True),
            "values": "0x5 0.1x35",
        },
        {"series": _delta("pages_shared", "small", twin=True), "values": "40x40"},
        {
            "series": _delta("pages_shared", "small", "ksm_model_delta_ratio", True),
            "values": "0.4x40",
        },
        # general_profit below 0 from 11m on, to the end (45m).
        *_series("costly", {"ksm_general_profit_bytes": "1000x10 -4096x35"}),
    ]
    stalled = {
        "exp_labels": _labels("stuck"),
        "exp_annotations": {
            "summary": "ksmd makes no progress on stuck",
            "description": "run=1 and pages to scan, but full_scans did not move in 10m.",
        },
    }
    wasted = {
        "exp_labels": _labels("wasteful"),
        "exp_annotations": {
            "summary": "KSM scans mostly unmergeable pages on wasteful",
            "description": "pages_unshared / pages_sharing is 20.0, above 10: ksmd spends its "
            "effort on pages that never merge.",
        },
    }
    off = {
        "exp_labels": _labels("off", ksm_expected="true"),
        "exp_annotations": {
            "summary": "KSM is not merging on off",
            "description": "The inventory labels this host ksm_expected=true but run is 0.",
        },
    }
    delta = {
        "exp_labels": {
            "severity": "warning",
            "counter": "pages_shared",
            "host": "off_by_17",
            "instance": "r:1",
            "job": "ksm",
        },
        "exp_annotations": {
            "summary": "The KSM model disagrees with the kernel on off_by_17",
            "description": "pages_shared differs by 17 pages, beyond the tolerance of 16.",
        },
    }
    diverged = {
        "exp_labels": {
            "severity": "warning",
            "counter": "pages_sharing",
            "host": "twin",
            "instance": "r:1",
            "job": "ksm",
            "source": "model",
        },
        "exp_annotations": {
            "summary": "The live KSM twin diverges from the kernel on twin",
            "description": "pages_sharing: kernel and model differ by 10% of the kernel's value "
            "(more than 0.05 and 256 pages) for 15m: the model no longer explains this host "
            "(a kernel change, a missed run=2, or a bug to report).",
        },
    }
    costly = {
        "exp_labels": _labels("costly"),
        "exp_annotations": {
            "summary": "KSM costs more memory than it saves on costly",
            "description": "general_profit is -4kiB: the rmap items of pages that never "
            "merge outweigh the merged pages. Narrow MADV_MERGEABLE, or turn KSM off here.",
        },
    }
    return {
        "rule_files": [],  # filled in by the test
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": series,
                "alert_rule_test": [
                    # Flat from 10m: increase() over 10m is 0 from 20m, for: 15m -> fires at 35m.
                    {"eval_time": "34m", "alertname": "KsmdStalled", "exp_alerts": []},
                    {"eval_time": "35m", "alertname": "KsmdStalled", "exp_alerts": [stalled]},
                    {"eval_time": "29m", "alertname": "KsmWastedEffort", "exp_alerts": []},
                    {"eval_time": "30m", "alertname": "KsmWastedEffort", "exp_alerts": [wasted]},
                    {"eval_time": "9m", "alertname": "KsmOffWhereExpected", "exp_alerts": []},
                    {"eval_time": "10m", "alertname": "KsmOffWhereExpected", "exp_alerts": [off]},
                    {"eval_time": "10m", "alertname": "KsmModelDelta", "exp_alerts": [delta]},
                    {"eval_time": "10m", "alertname": "KsmVolatilePagesHigh", "exp_alerts": []},
                    # Off from 6m ("0x5": 0 at 0m..5m), for: 15m -> fires at 21m, not at 20m.
                    {"eval_time": "20m", "alertname": "KsmModelDivergence", "exp_alerts": []},
                    {
                        "eval_time": "21m",
                        "alertname": "KsmModelDivergence",
                        "exp_alerts": [diverged],
                    },
                    # Negative from 11m, for: 30m -> fires at 41m, not at 40m.
                    {"eval_time": "40m", "alertname": "KsmGeneralProfitNegative", "exp_alerts": []},
                    {
                        "eval_time": "41m",
                        "alertname": "KsmGeneralProfitNegative",
                        "exp_alerts": [costly],
                    },
                ],
                "promql_expr_test": [
                    {
                        "expr": 'host:ksm_sharing_ratio:ratio{host="stuck"}',
                        "eval_time": "1m",
                        "exp_samples": [
                            {
                                "labels": 'host:ksm_sharing_ratio:ratio{host="stuck",'
                                'instance="stuck:9712",job="ksm",source="kernel"}',
                                "value": 10,
                            }
                        ],
                    }
                ],
            }
        ],
    }


def test_promtool_rule_unit_tests(generated: Path) -> None:
    doc = _rule_tests()
    doc["rule_files"] = [str(generated / RECORDING_FILE), str(generated / ALERT_FILE)]
    path = generated / "ksm_rules_test.yml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    r = run(["promtool", "test", "rules", path], check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout
