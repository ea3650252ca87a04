"""The twin's series (harness.twin.collector) from a Twin over a fake sysfs tree: nothing is
registered with KSM there, so the model stays empty and the deltas are the kernel's values."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from harness.errors import HarnessError
from harness.ksm.sysfs import SysfsBackend
from harness.twin.collector import TwinCollector
from harness.twin.live import Twin, ratio


def scrape(twin: Twin) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(TwinCollector(twin, "h1"))
    out = {}
    for fam in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_series_after_one_sync(fake_tree: Callable[[str], tuple[Path, Path]]) -> None:
    root, proc = fake_tree("linux-6.18")
    backend = SysfsBackend(root=root, proc=proc)
    twin = Twin(backend, what_ifs=[("mps16", {"max_page_sharing": 16})], proc=proc)
    assert twin.main.side.published.source == "model"
    assert twin.models[1].side.published.source == "what-if:mps16"
    assert twin.models[1].side.knobs()["max_page_sharing"] == 256  # until the first sync
    assert twin.step()  # the first look syncs at once
    assert twin.models[1].side.knobs()["max_page_sharing"] == 16
    assert twin.main.side.knobs()["pages_to_scan"] == 100  # the kernel's knobs, mirrored
    m = scrape(twin)
    lab = (("counter", "pages_sharing"), ("host", "h1"), ("source", "model"))
    assert m[("ksm_model_delta", lab)] == 298  # the fake kernel's value, the model's 0
    assert m[("ksm_model_delta_ratio", lab)] == 1.0
    assert m[("ksm_model_delta", (("counter", "general_profit"), ("host", "h1"),
                                  ("source", "what-if:mps16")))] == 1201408  # fmt: skip
    assert not any(k[0] == "ksm_model_delta" and ("counter", "full_scans") in k[1] for k in m)
    h = (("host", "h1"),)
    assert m[("ksm_twin_captures_total", h)] == 1
    assert m[("ksm_twin_lag_full_scans", h)] == 0
    assert m[("ksm_twin_capture_every_full_scans", h)] == 1
    # The fake /proc's KSM user (4242) has no smaps: left out of the capture, and counted.
    assert m[("ksm_twin_captured_processes", h)] == 0
    assert m[("ksm_twin_errors_total", h)] == 1
    assert twin.snapshot()[0].last_error == "capture: no process 4242 to capture"
    # The fake kernel makes no scan: nothing more to sync.
    assert not twin.step()


def test_ratios_and_bad_settings(fake_tree: Callable[[str], tuple[Path, Path]]) -> None:
    assert ratio(0, 0) == 0.0 and ratio(5, 0) == 1.0 and ratio(-5, None) == -1.0
    assert ratio(10, 200) == 0.05 and ratio(-10, -200) == -0.05
    root, proc = fake_tree("linux-6.18")
    backend = SysfsBackend(root=root, proc=proc)
    with pytest.raises(HarnessError, match="--twin-every 0: must be 1 or more"):
        Twin(backend, every=0, proc=proc)
    with pytest.raises(HarnessError, match=r"CPU budget 1\.5: must be above 0, at most 1"):
        Twin(backend, cpu_budget=1.5, proc=proc)
