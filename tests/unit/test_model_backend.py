"""ModelBackend: the KsmBackend protocol over ksm_model, exact values (spec section 15)."""

from __future__ import annotations

import pytest
from ksm_model import MADV_MERGEABLE, Kernel

from harness.errors import HarnessError, KsmBusy, KsmWriteRefused
from harness.ksm.model import ModelBackend
from harness.ksm.types import Counters, KsmStat, Tunables

PS = 4096


def example1(k: Kernel, n: int = 100) -> list[int]:
    """Spec example 1: 3 processes x n pages of 'a', registered in order; returns the pids."""
    pids = []
    for j in range(3):
        p = k.spawn(name=f"P{j + 1}")
        a = p.mmap(n * PS)
        p.fill(a, n * PS, ord("a"))
        p.madvise(a, n * PS, MADV_MERGEABLE)
        pids.append(p.pid)
    return pids


def test_source_and_defaults() -> None:
    b = ModelBackend()
    assert (b.source, b.page_size) == ("model", 4096)
    assert b.read_tunables() == Tunables(
        run=0,
        pages_to_scan=100,
        sleep_millisecs=20,
        merge_across_nodes=1,
        use_zero_pages=0,
        max_page_sharing=256,
        stable_node_chains_prune_millisecs=2000,
        smart_scan=1,
        advisor_mode="none",
        advisor_max_cpu=70,
        advisor_min_pages_to_scan=500,
        advisor_max_pages_to_scan=30000,
        advisor_target_scan_time=200,
    )
    assert b.read_counters() == Counters(
        pages_shared=0,
        pages_sharing=0,
        pages_unshared=0,
        pages_volatile=0,
        pages_scanned=0,
        pages_skipped=0,
        full_scans=0,
        stable_node_chains=0,
        stable_node_dups=0,
        ksm_zero_pages=0,
        general_profit=0,
    )


def test_wait_full_scans_in_virtual_time_and_counters() -> None:
    k = Kernel()
    pids = example1(k)
    b = ModelBackend(k)
    b.write_tunables(run=1)
    assert b.wait_full_scans(2, timeout=5.0) == 2
    # 300 pages / 100 per batch = 4 batches per scan (the last one only ends the scan), each
    # followed by a 20 ms sleep: 5 jiffies at HZ 250, which the timer wheel ends at the tick
    # after them, so batches start 24 ms apart. Scan 2 ends at 168.01 ms, seen by the next
    # 10 ms poll, at 170.51 ms.
    assert k.now == pytest.approx(0.17051, abs=1e-12)
    assert b.read_counters() == Counters(
        pages_shared=2,
        pages_sharing=298,
        pages_unshared=0,
        pages_volatile=0,
        pages_scanned=600,
        pages_skipped=0,
        full_scans=2,
        stable_node_chains=1,
        stable_node_dups=2,
        ksm_zero_pages=0,
        general_profit=1201408,
    )
    assert b.ksm_stat(pids[0]) == KsmStat(
        pid=pids[0],
        rmap_items=100,
        zero_pages=0,
        merging_pages=100,
        process_profit=403200,
        merge_any=False,
        mergeable=True,
    )


def test_wait_full_scans_timeout_when_stopped() -> None:
    k = Kernel()
    example1(k, 2)
    b = ModelBackend(k)
    with pytest.raises(HarnessError, match="0 of 1 full scans"):
        b.wait_full_scans(1, timeout=0.5)  # run=0: ksmd never scans
    assert k.now == pytest.approx(0.5, abs=0.011)


def test_ebusy_becomes_ksmbusy_and_saved_restores() -> None:
    k = Kernel()
    example1(k, 3)
    b = ModelBackend(k)
    with b.saved() as before:
        assert before.max_page_sharing == 256
        b.write_tunables(max_page_sharing=2, sleep_millisecs=5)
        b.write_tunables(run=1)
        b.wait_full_scans(2, timeout=5.0)
        c = b.read_counters()
        # K=9, M=2 (spec example 3): shared 4, sharing 4, unshared 1, chains 1, dups 4.
        assert (c.pages_shared, c.pages_sharing, c.pages_unshared) == (4, 4, 1)
        with pytest.raises(KsmBusy) as exc:
            b.write_tunables(max_page_sharing=3)
        assert exc.value.errno == 16
        with pytest.raises(KsmBusy):
            b.write_tunables(merge_across_nodes=0)
    # Restore needed run=2 (EBUSY) to put max_page_sharing back; run is back to 0.
    t = b.read_tunables()
    assert (t.max_page_sharing, t.sleep_millisecs, t.run) == (256, 20, 0)
    c = b.read_counters()
    assert (c.pages_shared, c.pages_sharing, c.full_scans, c.stable_node_dups) == (0, 0, 0, 0)


def test_frozen_sample_pauses_and_restores_run() -> None:
    k = Kernel()
    example1(k, 10)
    b = ModelBackend(k)
    b.write_tunables(run=1)
    b.wait_full_scans(2, timeout=5.0)
    s = b.frozen_sample()
    assert s.tunables.run == 1
    assert (s.counters.pages_shared, s.counters.pages_sharing) == (1, 29)
    assert s.time == k.now
    assert k.run == 1


def test_write_errors() -> None:
    b = ModelBackend()
    b.write_tunables(advisor_mode="scan-time")
    assert b.read_tunables().pages_to_scan == 500
    with pytest.raises(KsmWriteRefused, match="advisor_mode is scan-time"):
        b.write_tunables(pages_to_scan=1000)
    b.write_tunables(advisor_mode="none")
    assert b.read_tunables().pages_to_scan == 100
    with pytest.raises(KsmWriteRefused):
        b.write_tunables(run=3)  # refused by validation, nothing written
    assert b.read_tunables().run == 0


def test_profile_61_files_absent() -> None:
    b = ModelBackend(Kernel(profile="6.1"))
    c = b.read_counters()
    assert (c.pages_scanned, c.pages_skipped, c.ksm_zero_pages, c.general_profit) == (
        None,
        None,
        None,
        None,
    )
    assert c.pages_shared == 0
    t = b.read_tunables()
    assert (t.smart_scan, t.advisor_mode, t.max_page_sharing) == (None, None, 256)
    with pytest.raises(KsmWriteRefused, match="no such KSM file"):
        b.write_tunables(smart_scan=0)


def test_ksm_stat_unknown_and_61_pid() -> None:
    k = Kernel(profile="6.1")
    p = k.spawn(name="x")
    b = ModelBackend(k)
    assert b.ksm_stat(p.pid) == KsmStat(pid=p.pid, rmap_items=0)
    p.exit()
    with pytest.raises(HarnessError, match="no model process"):
        b.ksm_stat(p.pid)


def test_restore_after_advisor_reset_pages_to_scan() -> None:
    # The model resets pages_to_scan on an advisor_mode change exactly as 6.18 does (to the
    # advisor minimum, 500, then back to 100). Before the mode switch pages_to_scan is 500,
    # so it looks unchanged while scan-time is on; restore must still write it back.
    from harness.ksm.model import ModelBackend

    b = ModelBackend()
    b.write_tunables(pages_to_scan=500)
    with b.saved():
        b.write_tunables(advisor_mode="scan-time")
        assert b.read_tunables().pages_to_scan == 500
    t = b.read_tunables()
    assert (t.advisor_mode, t.pages_to_scan) == ("none", 500)
