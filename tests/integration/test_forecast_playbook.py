"""playbooks/forecast.yaml end to end: `ksmh calibrate`, then `ksmh run` forecasts a fleet
with KSM off, turns KSM on with the recommended knobs and measures.

The playbook's own checks hold the forecast to the issue's figures (savings within 1% of
measured, time to 95% of them within 20%, ksmd CPU to get there within 25%); this test reads
them back from run.json and report.md and prints the real figures.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from harness.run import run

# About 3.5 minutes: calibration (~90 s), then a 4-guest run. Its time-to-95% check wants a
# host as quiet as the calibration's (other tests run one at a time here).
pytestmark = [pytest.mark.ksm_kernel, pytest.mark.qemu]
PLAYBOOK = Path(__file__).resolve().parents[2] / "playbooks" / "forecast.yaml"


def cpu_share(result: dict[str, Any]) -> float:
    """ksmd's CPU share a forecast judges a knob set by: the larger of the share while
    reaching the target and the steady one (harness.twin.forecast KnobResult.cpu_share)."""
    shares = [result["steady_cpu_share"] or 0.0]
    if result["seconds_to_target"]:
        shares.append(result["cpu_seconds_to_target"] / result["seconds_to_target"])
    return max(shares)


def test_forecast_against_measured(tmp_path: Path) -> None:
    env = {**os.environ, "KSM_HARNESS_CALIBRATION_DIR": str(tmp_path / "calibration")}
    ksmh = [sys.executable, "-m", "harness.cli"]
    # Both commands take the host KSM lock themselves and restore every knob.
    cal = run([*ksmh, "calibrate", "--json"], env=env, timeout=900)
    costs = json.loads(cal.stdout)["costs"]
    assert costs["first"] > 0 and costs["merged"] > 0
    out = tmp_path / "results"
    r = run([*ksmh, "run", str(PLAYBOOK), "--out", str(out), "--export", "off"],
            env=env, timeout=1800, check=False)  # fmt: skip
    (run_dir,) = out.iterdir()
    data = json.loads((run_dir / "run.json").read_text())
    phase = next(p for p in data["phases"] if p["name"] == "forecast")
    (rec,) = phase["forecasts"]
    forecast, applied = rec["forecast"], rec["applied"]
    print(json.dumps({k: applied[k] for k in ("forecast", "measured", "error")}, indent=1))
    assert forecast["calibration"] is not None  # calibrated, not the rough defaults
    # The recommendation: of the knob sets whose forecast saves 95% within 60 s with ksmd under
    # 20% of a CPU, the one with the least steady ksmd CPU, then the fastest: here it was
    # pages_to_scan=400 (24.7 s to 95% forecast, 24.0 s measured; 2.27 s ksmd CPU vs 2.11 s).
    fits = sorted(
        (c for c in forecast["results"]
         if c["converged"] and c["seconds_to_target"] <= forecast["within_seconds"]
         and cpu_share(c) <= forecast["cpu_share_budget"]),
        key=lambda c: (c["steady_cpu_share"] or 0.0, c["seconds_to_target"]),
    )  # fmt: skip
    assert fits and forecast["recommended"] == fits[0]["name"], forecast["results"]
    err = applied["error"]
    assert abs(err["saved_bytes"]) <= 0.01
    assert abs(err["seconds_to_target"]) <= 0.20
    assert abs(err["cpu_seconds_to_target"]) <= 0.25
    assert {c["status"] for c in applied["checks"].values()} == {"passed"}
    assert applied["measured"]["converged"] is True
    assert r.returncode == 0, r.stderr[-2000:]
    report = (run_dir / "report.md").read_text()
    assert f"Forecast against measured (KSM turned on with `{fits[0]['name']}" in report
    assert "| saved |" in report and "within 25%" in report
