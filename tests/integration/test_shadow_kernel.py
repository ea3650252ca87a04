"""Shadow capture of live child processes against the real kernel's KSM: counters identical.

Three children each hold 1000 pages: 500 of 0x5a, 250 whose content depends only on the page
index (identical across children, unique within one), 250 never touched (4 of them read, which
maps the zero page: KSM ignores it, and so must the capture).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from subprocess import Popen

import numpy as np
import pytest

from harness.ksm.sysfs import SysfsBackend
from harness.run import PIPE, spawn
from harness.shadow import PAGE, Shadow, mergeable_vmas

CHILD = """
import mmap, sys
n = 1000
buf = mmap.mmap(-1, n * 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
buf.madvise(mmap.MADV_NOHUGEPAGE)
buf.write(b"\\x5a" * (500 * 4096))
for i in range(250):
    buf.write(i.to_bytes(8, "little") * 512)
_ = buf[-4 * 4096:]
buf.madvise(mmap.MADV_MERGEABLE)
print("ready", flush=True)
sys.stdin.read()
"""
COMPARED = (
    "pages_shared",
    "pages_sharing",
    "pages_unshared",
    "pages_volatile",
    "stable_node_chains",
    "stable_node_dups",
    "ksm_zero_pages",
)


@pytest.fixture
def children() -> Iterator[list[Popen[bytes]]]:
    procs: list[Popen[bytes]] = []
    yield procs
    for p in procs:
        p.kill()
        p.wait(10)


def present_pages(pid: int) -> int:
    (vma,) = mergeable_vmas(pid)
    fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY)
    try:
        raw = os.pread(fd, vma.pages * 8, vma.start // PAGE * 8)
    finally:
        os.close(fd)
    return int(np.count_nonzero(np.frombuffer(raw, "<u8") >> np.uint64(63)))


@pytest.mark.ksm_kernel
def test_shadow_matches_the_kernel(ksm: SysfsBackend, children: list[Popen[bytes]]) -> None:
    from ksm_model import Kernel

    ksm.write_tunables(run=2, force=True)
    ksm.apply({"pages_to_scan": 5000, "sleep_millisecs": 10, "max_page_sharing": 256,
               "smart_scan": 1, "use_zero_pages": 0, "run": 0})  # fmt: skip
    for _ in range(3):
        p = spawn([sys.executable, "-c", CHILD], stdin=PIPE, stdout=PIPE)
        children.append(p)
        assert p.stdout is not None and p.stdout.readline() == b"ready\n"
    model = Kernel(profile="host")
    knobs = ksm.read_tunables()
    for name in ("pages_to_scan", "max_page_sharing", "smart_scan", "use_zero_pages"):
        model.sysfs.write(name, str(getattr(knobs, name)))
    shadow = Shadow(model)
    before = [present_pages(p.pid) for p in children]
    caps = shadow.capture({p.pid: f"c{i}" for i, p in enumerate(children)})
    # The capture faulted nothing in: the 4 zero-page reads are present, the rest is not.
    assert [present_pages(p.pid) for p in children] == before == [754, 754, 754]
    assert [c.present for c in caps] == [750, 750, 750]
    stats = shadow.replay(caps)
    assert (stats.pages_written, stats.pages_vanished) == (2250, 0)

    start = ksm.read_counters().full_scans or 0
    ksm.write_tunables(run=1)
    model.sysfs.write("run", "1")
    for step in (2, 1, 2):
        ksm.wait_full_scans(step, 60)
        sample = ksm.frozen_sample()
        scans = (sample.counters.full_scans or 0) - start
        shadow.step(scans)
        kernel = sample.counters.as_dict()
        got = model.counters()
        assert {n: got.get(n) for n in COMPARED} == {n: kernel[n] for n in COMPARED}, scans
        for p in children:
            twin = shadow.model_pid(p.pid)
            assert twin.ksm_stat()["ksm_merging_pages"] == ksm.ksm_stat(p.pid).merging_pages
    # 250 groups of 3 identical pages plus 1500 x 0x5a in chains of 256 (6 dups).
    assert (kernel["pages_shared"], kernel["pages_sharing"]) == (256, 1994)


CHILD_THP = """
import ctypes, mmap, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long)
libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
H, n = 2 << 20, 1200
raw = libc.mmap(None, n * 4096 + H, 3, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
a = (raw + H - 1) & ~(H - 1)
libc.madvise(a, n * 4096, 14)  # MADV_HUGEPAGE: two huge pages, then 176 small pages
buf = memoryview((ctypes.c_char * (n * 4096)).from_address(a)).cast("B")
for i in range(n):
    if i < 300 or 512 <= i < 700:
        buf[i * 4096:(i + 1) * 4096] = b"\\x5a" * 4096
    elif 900 <= i < 1000 or i >= 1100:
        buf[i * 4096:(i + 1) * 4096] = i.to_bytes(8, "little") * 512
    else:
        buf[i * 4096] = 0  # a zero-filled page (faulted in; in a THP it is already there)
libc.madvise(a, n * 4096, 12)
print("ready", flush=True)
sys.stdin.read()
"""


@pytest.mark.ksm_kernel
def test_shadow_passes_the_thp_layout(ksm: SysfsBackend, children: list[Popen[bytes]]) -> None:
    # Three processes with two huge pages each (0x5a, zero-filled tails, pages identical
    # across processes) and small pages after them. The capture must see the huge pages
    # (and their zero-filled subpages), the model must fault huge pages in the same
    # blocks, and the counters must agree while KSM splits them.
    from ksm_model import Kernel
    from ksm_model.hostprobe import probe

    from harness.thp import khugepaged_pinned

    host = probe()
    if host.thp == "never":
        pytest.skip("transparent huge pages are disabled on this host")
    ksm.write_tunables(run=2, force=True)
    ksm.apply({"pages_to_scan": 5000, "sleep_millisecs": 10, "max_page_sharing": 256,
               "smart_scan": 1, "use_zero_pages": 0, "run": 0})  # fmt: skip
    with khugepaged_pinned():
        for _ in range(3):
            p = spawn([sys.executable, "-c", CHILD_THP], stdin=PIPE, stdout=PIPE)
            children.append(p)
            assert p.stdout is not None and p.stdout.readline() == b"ready\n"
        model = Kernel(profile="host", **host.kernel_args())
        knobs = ksm.read_tunables()
        for name in ("pages_to_scan", "max_page_sharing", "smart_scan", "use_zero_pages"):
            model.sysfs.write(name, str(getattr(knobs, name)))
        shadow = Shadow(model)
        caps = shadow.capture({p.pid: f"c{i}" for i, p in enumerate(children)})
        if any(len(v.huge) != 2 for c in caps for v in c.vmas):
            pytest.skip("the kernel did not give the children huge pages (memory fragmented?)")
        assert [c.present for c in caps] == [1200, 1200, 1200]  # zero subpages included
        shadow.replay(caps)
        for p in children:
            assert shadow.model_pid(p.pid).anon_huge_bytes() == 4 << 20
        start = ksm.read_counters().full_scans or 0
        ksm.write_tunables(run=1)
        model.sysfs.write("run", "1")
        for step in (2, 1, 2):
            ksm.wait_full_scans(step, 60)
            # Paused (one batch is one full scan here) while the counters and every child's
            # ksm_stat are read: after scan 2 one page per huge page pair still changes.
            ksm.write_tunables(run=0)
            try:
                counters = ksm.read_counters()
                stats = [ksm.ksm_stat(p.pid) for p in children]
            finally:
                ksm.write_tunables(run=1)
            scans = (counters.full_scans or 0) - start
            shadow.step(scans)
            kernel = counters.as_dict()
            got = model.counters()
            assert {n: got.get(n) for n in COMPARED} == {n: kernel[n] for n in COMPARED}, scans
            for p, stat in zip(children, stats, strict=True):
                twin = shadow.model_pid(p.pid).ksm_stat()
                assert (twin["ksm_merging_pages"], twin["ksm_rmap_items"]) == (
                    stat.merging_pages,
                    stat.rmap_items,
                ), scans
