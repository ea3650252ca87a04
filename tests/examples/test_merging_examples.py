"""An example KSM suite, written as a user of the ksm-harness pytest plugin would write one.

Run it with `pytest tests/examples` on a host with KSM (root) and QEMU; add `--ksm-accel=kvm`
on a KVM host. Nothing here imports test helpers: fixtures come from the installed plugin.
"""

from __future__ import annotations

import pytest

from harness.shadow import Shadow


@pytest.mark.ksm_kernel
def test_three_processes_merge_within_two_full_scans_as_the_model_predicts(
    ksm_scenario, assert_counters
):
    kernel, _model, comparison = ksm_scenario(
        {
            "name": "three-identical",
            "scans": 3,
            "processes": [{"name": f"p{i}", "contents": ["a*100"]} for i in (1, 2, 3)],
        }
    )
    assert comparison.ok, comparison.report()
    # 300 identical pages, max_page_sharing 256: two KSM pages in one chain after 2 scans.
    assert_counters(kernel.at(2).end.counters, pages_shared=2, pages_sharing=298)


@pytest.mark.ksm_kernel
@pytest.mark.fleet
def test_three_guests_with_identical_memory_merge_as_the_model_predicts(
    ksm, guest_fleet, wait_full_scans, ksm_model
):
    ksm.write_tunables(run=2, force=True)  # start from nothing merged
    ksm.write_tunables(pages_to_scan=5000, sleep_millisecs=10)
    fleet = guest_fleet(count=3, memory_mib=160)
    fleet.fill("a", "16M", "byte:0x5a").raise_if_failed()

    # What the model expects of exactly this memory, captured before ksmd runs.
    shadow = Shadow(ksm_model)
    pids = {pid: name for name, pid in fleet.pids().items()}
    shadow.replay(shadow.capture(pids))
    ksm_model.sysfs.write("run", "1")
    shadow.step(2)

    ksm.write_tunables(run=1)
    wait_full_scans(2, timeout=120)
    sample = ksm.frozen_sample()

    for pid in pids:  # every guest's 16 MiB (4096 pages) is merged
        assert ksm.ksm_stat(pid).merging_pages >= 4096
    predicted = int(ksm_model.sysfs.read("pages_sharing"))
    assert sample.counters.pages_sharing >= 2 * 4096
    # Guests keep running (their kernels touch memory), so allow 2% between model and kernel.
    assert abs(sample.counters.pages_sharing - predicted) <= 0.02 * predicted
    assert fleet.verify("a").ok
