"""Shadow capture on a fake /proc tree, and replay into a recording fake model."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from harness.procfs import KPF_THP, KPF_ZERO_PAGE, PM_FILE, PM_PRESENT
from harness.shadow import (
    ABSENT,
    PAGE,
    ProcessCapture,
    Shadow,
    ShadowError,
    Vma,
    VmaCapture,
    capture_process,
    model_page,
    page_key,
    parse_smaps,
    sharing_matrix,
)

SMAPS = """\
00010000-00016000 rw-p 00000000 00:00 0
Size:                 24 kB
VmFlags: rd wr mr mw me ac mg
00016000-00017000 r--p 00000000 08:01 1234                       /usr/lib/libc.so.6
Size:                  4 kB
VmFlags: rd mr mw me
00020000-00022000 rw-p 00000000 00:00 0                          [heap]
Size:                  8 kB
VmFlags: rd wr mr mw me ac hg
"""


def test_parse_smaps() -> None:
    vmas = parse_smaps(SMAPS)
    assert [(v.start, v.end, v.name) for v in vmas] == [
        (0x10000, 0x16000, ""),
        (0x16000, 0x17000, "/usr/lib/libc.so.6"),
        (0x20000, 0x22000, "[heap]"),
    ]
    assert "mg" in vmas[0].flags and vmas[0].pages == 6


def fake_proc(tmp_path: Path) -> Path:
    """pid 7: one mergeable VMA of 6 pages at 0x10000:
    0: 0x5a everywhere   1: unique   2: zero page PFN   3: not present
    4: a file page       5: zeros in a THP (kept: an anonymous page ksmd scans)
    pid 8: 0x5a in its first page only (another VMA layout)."""
    proc = tmp_path / "proc"
    d = proc / "7"
    d.mkdir(parents=True)
    (d / "smaps").write_text(SMAPS)
    (d / "stat").write_text("7 (qemu) S " + " ".join(["0"] * 18) + " 500 0 0\n")
    pages = [b"\x5a" * PAGE, os.urandom(PAGE), bytes(PAGE), b"?" * PAGE, b"f" * PAGE, bytes(PAGE)]
    mem = bytearray(0x16000)
    for i, p in enumerate(pages):
        mem[0x10000 + i * PAGE : 0x10000 + (i + 1) * PAGE] = p
    (d / "mem").write_bytes(bytes(mem))
    pfns = [100, 101, 1, 0, 103, 104]
    entries = [PM_PRESENT | pfn for pfn in pfns]
    entries[3] = 0  # not present
    entries[4] |= PM_FILE
    pagemap = bytearray(0x16 * 8)
    for i, e in enumerate(entries):
        pagemap[(0x10 + i) * 8 : (0x11 + i) * 8] = e.to_bytes(8, "little")
    (d / "pagemap").write_bytes(bytes(pagemap))
    flags = bytearray(8 * 105)
    flags[8:16] = KPF_ZERO_PAGE.to_bytes(8, "little")
    flags[104 * 8 : 105 * 8] = KPF_THP.to_bytes(8, "little")
    (proc / "kpageflags").write_bytes(bytes(flags))
    return proc


def test_capture_hashes_only_what_ksm_scans(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path)
    cap = capture_process(7, "g0", proc)
    assert (cap.pid, cap.name, cap.start) == (7, "g0", 500)
    (vc,) = cap.vmas
    keys = [vc.keys[i].ljust(16, b"\0") if vc.keys[i] != ABSENT else ABSENT for i in range(6)]
    assert keys[0] == page_key(b"\x5a" * PAGE)
    assert keys[1] not in (ABSENT, keys[0])
    assert keys[2:] == [ABSENT, ABSENT, ABSENT, page_key(bytes(PAGE))]
    assert cap.present == 3
    assert cap.bytes_read == 4 * PAGE  # pages 0, 1, 2 and 5 were read (3 and 4 were not)
    assert vc.huge == frozenset() and not cap.thp_disabled


def test_capture_of_a_missing_process(tmp_path: Path) -> None:
    with pytest.raises(ShadowError, match="no process 99 to capture"):
        capture_process(99, proc=fake_proc(tmp_path))


class FakeProcess:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.calls: list[tuple[Any, ...]] = []
        self.top = 0x7F0000000000

    def mmap(self, length: int, node: int = 0, align: int = 0) -> int:
        self.top = (self.top - length) // (align or 1) * (align or 1)
        self.calls.append(("mmap", length))
        return self.top

    def write(self, addr: int, data: bytes) -> None:
        # A content key is written as model_page() frames it: recorded as the key.
        key = next((k for k in (A, B) if model_page(k) == data), data)
        self.calls.append(("write", addr, len(data), key))

    def fill(self, addr: int, length: int, byte: int) -> None:
        self.calls.append(("fill", addr, length, byte))

    def madvise(self, addr: int, length: int, advice: int) -> None:
        self.calls.append(("madvise", addr, length, advice))

    def munmap(self, addr: int, length: int) -> None:
        self.calls.append(("munmap", addr, length))

    def exit(self) -> None:
        self.calls.append(("exit",))


class FakeKernel:
    def __init__(self) -> None:
        self.procs: list[FakeProcess] = []
        self.zero_pages = "0"

    def spawn(self, name: str) -> FakeProcess:
        self.procs.append(FakeProcess(len(self.procs) + 1))
        return self.procs[-1]

    @property
    def sysfs(self) -> FakeKernel:
        return self

    def read(self, name: str) -> str:
        assert name == "use_zero_pages"
        return self.zero_pages


def cap_of(pid: int, start: int, vmas: list[tuple[int, list[bytes]]]) -> ProcessCapture:
    out = []
    for addr, keys in vmas:
        arr = np.array(keys, dtype="S16")
        out.append(VmaCapture(Vma(addr, addr + len(keys) * PAGE, ("mg",)), arr))
    return ProcessCapture(pid=pid, name=f"p{pid}", start=start, vmas=out)


U = page_key(b"\x5a" * PAGE)
Z = page_key(bytes(PAGE))
A, B = page_key(b"a" + bytes(PAGE - 1)), page_key(b"b" + bytes(PAGE - 1))


BASE, HP = 0x7F0000000000, 0x200000  # the fake's mmap base, and 2 MiB


def test_replay_writes_changes_only() -> None:
    k = FakeKernel()
    sh = Shadow(k, madv_mergeable=12)
    first = cap_of(7, 1, [(0x200000, [U, U, U, A, ABSENT, Z]), (0x400000, [B])])
    stats = sh.replay([first])
    (p,) = k.procs
    hi, lo = BASE - HP, BASE - 2 * HP  # each twin VMA starts on a 2 MiB boundary, as in reality
    # The higher VMA is mapped first, so the model keeps the real ascending order.
    assert p.calls[:4] == [
        ("mmap", PAGE),
        ("madvise", hi, PAGE, 12),
        ("mmap", 6 * PAGE),
        ("madvise", lo, 6 * PAGE, 12),
    ]
    assert p.calls[4:] == [
        ("fill", lo, 3 * PAGE, 0x5A),  # a run of uniform pages is one fill
        ("write", lo + 3 * PAGE, PAGE, A),  # other content: its key (model_page)
        ("fill", lo + 5 * PAGE, PAGE, 0),
        ("write", hi, PAGE, B),
    ]
    assert (stats.pages_written, stats.pages_vanished) == (6, 0)
    p.calls.clear()
    second = cap_of(7, 1, [(0x200000, [U, B, U, A, A, ABSENT]), (0x400000, [ABSENT])])
    stats = sh.replay([second])
    assert p.calls == [
        ("write", lo + PAGE, PAGE, B),
        ("write", lo + 4 * PAGE, PAGE, A),
        ("madvise", lo + 5 * PAGE, PAGE, 4),  # zeros gone (use_zero_pages=0): DONTNEED
        ("madvise", hi, PAGE, 4),
    ]
    assert (stats.pages_written, stats.pages_vanished) == (2, 2)


def test_vanished_zero_page_is_kept_with_use_zero_pages() -> None:
    k = FakeKernel()
    k.zero_pages = "1"
    sh = Shadow(k, madv_mergeable=12)
    sh.replay([cap_of(7, 1, [(0x200000, [Z, A])])])
    (p,) = k.procs
    p.calls.clear()
    stats = sh.replay([cap_of(7, 1, [(0x200000, [ABSENT, ABSENT])])])
    # Page 0 was zeros: KSM put the zero page there, which the model did too. Page 1 went away.
    assert p.calls == [("madvise", BASE - HP + PAGE, PAGE, 4)]
    assert stats.pages_vanished == 1


def test_vma_gone_or_resized_is_unmapped_from_the_model() -> None:
    k = FakeKernel()
    sh = Shadow(k, madv_mergeable=12)
    sh.replay([cap_of(7, 1, [(0x200000, [A, ABSENT]), (0x400000, [B])])])
    (p,) = k.procs
    hi, lo, new = BASE - HP, BASE - 2 * HP, BASE - 3 * HP
    p.calls.clear()
    # The low VMA grew to 3 pages; the high one went away.
    stats = sh.replay([cap_of(7, 1, [(0x200000, [A, B, A])])])
    assert p.calls == [
        ("munmap", hi, PAGE),
        ("munmap", lo, 2 * PAGE),
        ("mmap", 3 * PAGE),
        ("madvise", new, 3 * PAGE, 12),
        ("write", new, PAGE, A),
        ("write", new + PAGE, PAGE, B),
        ("write", new + 2 * PAGE, PAGE, A),
    ]
    assert (stats.pages_written, stats.pages_vanished) == (3, 2)
    assert list(sh.twins[7].maps) == [0x200000]


class ThpProcess(FakeProcess):
    """A fake model process that can be told where huge page faults fail."""

    def thp_fault_fails(self, addr: int, length: int) -> None:
        self.calls.append(("thp_fault_fails", addr, length))

    def set_thp_disable(self, disable: bool) -> None:
        self.calls.append(("set_thp_disable", disable))


def test_replay_passes_the_thp_layout() -> None:
    k = FakeKernel()
    k.spawn = lambda name: k.procs.append(ThpProcess(1)) or k.procs[-1]  # type: ignore[method-assign]
    sh = Shadow(k, madv_mergeable=12)
    # A VMA starting 16 pages into a 2 MiB block, advised MADV_HUGEPAGE, 1040 pages: its
    # first block is partial, block 0x401 is a THP in the kernel, block 0x402 small pages.
    start = 0x401 * HP - 16 * PAGE
    keys = [A] * 16 + [Z] * 511 + [B] + [U] * 512
    cap = ProcessCapture(
        pid=7,
        name="g",
        start=1,
        vmas=[
            VmaCapture(
                Vma(start, start + len(keys) * PAGE, ("mg", "hg")),
                np.array(keys, dtype="S16"),
                huge=frozenset({0x401}),
            )
        ],
        thp_disabled=True,
    )
    sh.replay([cap])
    (p,) = k.procs
    base = BASE - 3 * HP  # 1040 + 496 pages, 2 MiB aligned; the first 496 pages cut off
    addr = base + HP - 16 * PAGE
    assert p.calls[:6] == [
        ("set_thp_disable", True),
        ("mmap", len(keys) * PAGE + (HP - 16 * PAGE)),
        ("munmap", base, HP - 16 * PAGE),
        ("madvise", addr, len(keys) * PAGE, 14),  # MADV_HUGEPAGE, as VmFlags hg says
        ("madvise", addr, len(keys) * PAGE, 12),
        ("thp_fault_fails", addr, 16 * PAGE),  # the partial block (never huge anyway)
    ]
    assert p.calls[6] == ("thp_fault_fails", addr + 528 * PAGE, 512 * PAGE)
    p.calls.clear()
    # The THP was split by KSM: its zero-filled subpages went to the zero page (6.12+). The
    # model's ksmd does that itself: no MADV_DONTNEED for them.
    later = [A] * 16 + [ABSENT] * 511 + [B] + [U] * 512
    cap.vmas[0].keys = np.array(later, dtype="S16")
    cap.vmas[0].huge = frozenset()
    stats = sh.replay([cap])
    assert p.calls == [] and stats.pages_vanished == 0


def test_registration_order_and_reap(tmp_path: Path) -> None:
    k = FakeKernel()
    sh = Shadow(k, proc=fake_proc(tmp_path), madv_mergeable=12)
    sh.replay([cap_of(9, 1, [(0x1000, [A])]), cap_of(8, 2, [(0x1000, [A])])])
    assert [sh.twins[pid].proc.pid for pid in (9, 8)] == [1, 2]
    assert sh.reap([8]) == [9]
    assert k.procs[0].calls[-1] == ("exit",)
    assert list(sh.twins) == [8]


def test_sharing_matrix() -> None:
    caps = [
        cap_of(1, 1, [(0x1000, [U, U, A, ABSENT])]),
        cap_of(2, 1, [(0x1000, [U, B])]),
        cap_of(3, 1, [(0x1000, [B, B, B])]),
    ]
    # Row p1: its 2 U pages occur twice inside p1 and also in p2. Row p2: its U page is in
    # p1, its B page in p3. Row p3: 3 B pages, repeated inside p3 and found in p2.
    assert sharing_matrix(caps).tolist() == [[2, 2, 0], [1, 0, 1], [0, 3, 3]]


def test_capture_finds_huge_pages_by_pfn_and_kpageflags(tmp_path: Path) -> None:
    # pid 9: a 2-block VMA at 2 MiB. Block 1 is one THP: PFNs 1024.. contiguous from an
    # aligned compound head, all KPF_THP. Block 2 has contiguous PFNs too (1536..) but they
    # are small pages (no KPF_THP): not huge. THP is disabled for the process.
    proc = tmp_path / "proc"
    d = proc / "9"
    d.mkdir(parents=True)
    (d / "smaps").write_text(
        "00200000-00600000 rw-p 00000000 00:00 0\nVmFlags: rd wr mr mw me ac hg mg\n"
    )
    (d / "stat").write_text("9 (w) S " + " ".join(["0"] * 18) + " 5 0 0\n")
    (d / "status").write_text("Name:\tw\nTHP_enabled:\t0\n")
    (d / "mem").write_bytes(bytes(0x600000))
    pagemap = bytearray(0x600 * 8)
    for i in range(1024):
        pagemap[(0x200 + i) * 8 : (0x201 + i) * 8] = (PM_PRESENT | (1024 + i)).to_bytes(8, "little")
    (d / "pagemap").write_bytes(bytes(pagemap))
    flags = np.zeros(4096, dtype="<u8")
    flags[1024:1536] = KPF_THP
    flags[1024] |= 1 << 15  # KPF_COMPOUND_HEAD
    (proc / "kpageflags").write_bytes(flags.tobytes())
    cap = capture_process(9, "w", proc)
    (vc,) = cap.vmas
    assert vc.huge == frozenset({1}) and cap.thp_disabled
    assert cap.present == 1024  # zero-filled pages of a THP or not, all are scanned
    # The twin's and the forecast's incremental capture sees the same layout.
    from harness.twin.capture import IncrementalCapture

    (inc,) = IncrementalCapture(proc).capture({9: "w"})
    assert inc.vmas[0].huge == frozenset({1}) and inc.present == 1024 and inc.thp_disabled


def test_a_zombie_is_skipped_not_a_crash(tmp_path: Path) -> None:
    """A guest's QEMU killed mid-run is a zombie until reaped: /proc/PID exists, pagemap
    gives ESRCH. The capture skips it (the next agent step reports the dead guest)."""
    import subprocess
    import sys
    import time

    from harness.procfs import Vma, pid_alive
    from harness.shadow import Shadow, ShadowError, capture_vmas

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 10
    while pid_alive(child.pid) and time.monotonic() < deadline:
        time.sleep(0.02)  # exited, not reaped: a zombie
    assert Path(f"/proc/{child.pid}").exists() and not pid_alive(child.pid)
    try:
        with pytest.raises(ShadowError, match=f"process {child.pid} exited during capture"):
            capture_vmas(child.pid, [Vma(0x10000, 0x11000, ("rd", "wr", "mg"))])

        class NoModel:
            def spawn(self, name: str) -> None:
                raise AssertionError("nothing to replay")

        assert Shadow(NoModel()).capture({child.pid: "gone"}) == []
    finally:
        child.wait()
