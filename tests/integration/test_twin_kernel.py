"""The live twin (harness.twin.live) against the real kernel, with child processes that come
and go: at every sync the model's counters equal the kernel's exactly.

ksmd makes one batch per full scan (pages_to_scan above the memory) and then sleeps 400 ms,
so the counters the twin reads right after a scan ends are that scan's end state, and the
model, which made the same full scans over a capture of the same memory, must agree to the
page. The twin reads only: it never pauses ksmd or writes a knob (the test checks that too).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from subprocess import Popen

import pytest

from harness import procfs
from harness.ksm.sysfs import SysfsBackend
from harness.run import PIPE, spawn
from harness.twin.live import DELTA_COUNTERS, Twin

# Pages: `ident` identical (chains past 256), `common` shared by all children, the rest unique.
CHILD = r"""
import mmap, sys
n, ident, common, salt = map(int, sys.argv[1:5])
buf = mmap.mmap(-1, n * 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
buf.madvise(mmap.MADV_NOHUGEPAGE)
w = memoryview(buf).cast("Q")
for i in range(n):
    if i < ident:
        w[i * 512] = 7
    elif i < ident + common:
        w[i * 512] = 1000 + i
    else:
        w[i * 512] = i
        w[i * 512 + 1] = salt
buf.madvise(mmap.MADV_MERGEABLE)
print("ready", flush=True)
sys.stdin.readline()
"""
KNOBS = {
    "pages_to_scan": 50000,
    "sleep_millisecs": 400,
    "smart_scan": 1,
    "use_zero_pages": 0,
    "max_page_sharing": 256,
}


@pytest.fixture
def children() -> Iterator[list[Popen[bytes]]]:
    procs: list[Popen[bytes]] = []
    yield procs
    for p in procs:
        p.kill()
        p.wait(10)


def start(procs: list[Popen[bytes]], salt: int) -> Popen[bytes]:
    p = spawn([sys.executable, "-c", CHILD, "3000", "1200", "800", str(salt)],
              stdin=PIPE, stdout=PIPE)  # fmt: skip
    procs.append(p)
    assert p.stdout is not None and p.stdout.readline() == b"ready\n"
    return p


def syncs(twin: Twin, n: int, timeout: float = 60.0) -> list[dict[str, int]]:
    """Step the twin until it synced n times; the kernel-minus-model deltas of each sync."""
    out = []
    deadline = time.monotonic() + timeout
    while len(out) < n:
        assert time.monotonic() < deadline, f"only {len(out)} of {n} syncs in {timeout} s"
        if twin.step():
            _stats, models = twin.snapshot()
            out.append(models[0][1])
        time.sleep(0.02)
    return out


@pytest.mark.ksm_kernel
def test_twin_equals_the_kernel_as_processes_come_and_go(
    ksm: SysfsBackend, children: list[Popen[bytes]]
) -> None:
    ksm.write_tunables(run=2, force=True)
    ksm.apply({**KNOBS, "run": 0})
    start(children, 1)
    start(children, 2)
    twin = Twin(ksm, poll=0.02, cpu_budget=1.0)
    assert twin.step()  # the first look syncs at once (KSM off: no scan to make)
    knobs = ksm.read_tunables()
    ksm.write_tunables(run=1)
    zero = dict.fromkeys(DELTA_COUNTERS, 0)  # every counter the kernel has, model - kernel
    # Scans 1..4 with two children: equal after every scan, merged after the second. 2400
    # identical pages make 10 dups of a chain (max_page_sharing 256); 800 pairs; 2000 unique.
    assert syncs(twin, 4) == [zero] * 4
    kernel = twin.last_kernel()
    assert (kernel["pages_shared"], kernel["pages_sharing"]) == (10 + 800, 2390 + 800)
    assert (kernel["stable_node_chains"], kernel["stable_node_dups"]) == (1, 10)
    # A third child comes: the model registers it as ksmd does and merges it alike.
    start(children, 3)
    assert syncs(twin, 4) == [zero] * 4
    kernel = twin.last_kernel()
    assert (kernel["pages_shared"], kernel["pages_sharing"]) == (15 + 800, 3585 + 1600)
    # One goes: its pages leave the kernel's counters at its slot's next scan, and the model's.
    gone = children.pop(0)
    gone.kill()
    gone.wait(10)
    assert syncs(twin, 3) == [zero] * 3
    assert twin.last_kernel()["pages_sharing"] < 3585 + 1600
    stats, _ = twin.snapshot()
    assert stats.errors == 0 and stats.captured_processes == 2
    assert stats.scans_skipped == 0
    # A twin runs for months: it keeps no per-scan history (the runner's sides do, and drain it).
    assert [m.side.drain_scans() for m in twin.models] == [[]]
    # Monitoring does not disturb: no knob was written, ksmd was never paused.
    assert ksm.read_tunables() == type(knobs)(**{**knobs.as_dict(), "run": 1})


def huge_bytes(procs: list[Popen[bytes]], twin: Twin | None = None) -> list[int]:
    """Bytes of huge pages in each process's mergeable memory: the kernel's (smaps
    AnonHugePages), or with `twin` its model's."""
    if twin is not None:
        return [twin.main.side.shadow.model_pid(p.pid).anon_huge_bytes() for p in procs]
    return [sum(v.anon_huge_kib for v in procfs.smaps(p.pid) if v.mergeable) << 10 for p in procs]


@pytest.mark.ksm_kernel
def test_twin_equals_the_kernel_with_huge_pages(
    ksm: SysfsBackend, children: list[Popen[bytes]]
) -> None:
    """Children with two transparent huge pages each (0x5a, zero-filled tails, pages identical
    across children): the twin's capture must keep the THP layout and the zero-filled
    subpages, or its model neither visits them nor splits the huge pages as ksmd does."""
    from ksm_model.hostprobe import probe

    from harness.thp import khugepaged_pinned
    from tests.integration.test_shadow_kernel import CHILD_THP

    if probe().thp == "never":
        pytest.skip("transparent huge pages are disabled on this host")
    ksm.write_tunables(run=2, force=True)
    ksm.apply({**KNOBS, "run": 0})
    with khugepaged_pinned():
        for _ in range(3):
            p = spawn([sys.executable, "-c", CHILD_THP], stdin=PIPE, stdout=PIPE)
            children.append(p)
            assert p.stdout is not None and p.stdout.readline() == b"ready\n"
        if huge_bytes(children) != [4 << 20] * 3:
            pytest.skip("the kernel did not give the children huge pages (memory fragmented?)")
        twin = Twin(ksm, poll=0.02, cpu_budget=1.0)
        assert twin.step()
        assert huge_bytes(children, twin) == [4 << 20] * 3  # the capture kept the layout
        assert twin.snapshot()[0].captured_pages == 3 * 1200  # and the zero-filled subpages
        ksm.write_tunables(run=1)
        zero = dict.fromkeys(DELTA_COUNTERS, 0)
        assert syncs(twin, 5) == [zero] * 5
        # KSM split huge pages to merge their subpages, the kernel's and the model's alike.
        real, model = huge_bytes(children), huge_bytes(children, twin)
    assert model == real and sum(real) < 3 * (4 << 20), (model, real)
    assert twin.last_kernel()["pages_sharing"] > 0
    stats, _ = twin.snapshot()
    assert stats.errors == 0 and stats.scans_skipped == 0
