"""harness.procfs on fake /proc trees: the one place /proc is parsed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from harness import procfs
from harness.errors import HarnessError, KsmUnavailable

STAT_618 = "ksm_rmap_items 0\nksm_zero_pages 0\nksm_merging_pages 0\nksm_process_profit 0\n"
MG_SMAPS = """\
7f0000000000-7f0000004000 rw-p 00000000 00:00 0
Rss:                  16 kB
AnonHugePages:         0 kB
KSM:                   8 kB
VmFlags: rd wr mr mw me ac mg
7f0000004000-7f0000005000 r--p 00000000 00:00 0 /usr/lib/libc.so
VmFlags: rd mr mw me
"""


def write_proc(root: Path, pid: int, comm: str, stat: str | None, smaps: str = "") -> None:
    d = root / str(pid)
    d.mkdir()
    (d / "comm").write_text(comm + "\n")
    (d / "cmdline").write_bytes(comm.encode() + b"\0--flag\0")
    (d / "stat").write_text(
        f"{pid} ({comm}) S 1 1 1 0 -1 0 0 0 0 0 7 3 0 0 20 0 1 0 {pid * 100} 0\n"
    )
    if stat is not None:
        (d / "ksm_stat").write_text(stat)
    if smaps:
        (d / "smaps").write_text(smaps)


def test_ksm_users_one_rule_for_every_kernel(tmp_path: Path) -> None:
    registered = "ksm_rmap_items 0\nksm_merging_pages 0\nksm_merge_any: no\nksm_mergeable: yes\n"
    idle = "ksm_rmap_items 0\nksm_merging_pages 0\nksm_merge_any: no\nksm_mergeable: no\n"
    write_proc(tmp_path, 10, "qemu-system-x86", registered)
    write_proc(tmp_path, 11, "bash", idle)
    write_proc(tmp_path, 12, "python3", registered)  # one of ours
    write_proc(tmp_path, 13, "old", "ksm_rmap_items 5\nksm_merging_pages 2\n")  # 6.1-style
    write_proc(tmp_path, 14, "kthreadd", "")  # no mm: prints nothing
    write_proc(tmp_path, 15, "madviser", STAT_618, MG_SMAPS)  # 6.6-6.13: no mergeable line
    write_proc(tmp_path, 16, "plain", STAT_618, MG_SMAPS.replace(" mg", ""))
    (tmp_path / "self").mkdir()
    found = procfs.ksm_users(tmp_path, exclude={12})
    assert [(u.pid, u.comm, u.reason) for u in found] == [
        (10, "qemu-system-x86", "ksm_mergeable: yes"),
        (13, "old", "ksm_rmap_items 5"),
        (15, "madviser", "VM_MERGEABLE mapping"),
    ]
    assert found[0].describe() == "pid 10 (qemu-system-x86 --flag; ksm_mergeable: yes)"
    assert procfs.describe_users(found[1:2]) == "pid 13 (old --flag; ksm_rmap_items 5)"


def test_smaps_keeps_flags_and_counters(tmp_path: Path) -> None:
    write_proc(tmp_path, 20, "q", STAT_618, MG_SMAPS)
    mg, lib = procfs.smaps(20, tmp_path)
    assert (mg.start, mg.end, mg.pages, mg.mergeable) == (0x7F0000000000, 0x7F0000004000, 4, True)
    assert (mg.rss_kib, mg.ksm_kib, mg.anon_huge_kib) == (16, 8, 0)
    assert (lib.name, lib.mergeable, lib.rss_kib) == ("/usr/lib/libc.so", False, 0)
    with pytest.raises(HarnessError, match="no process 21"):
        procfs.smaps(21, tmp_path)


def test_ksm_stat_formats(tmp_path: Path) -> None:
    text = "ksm_rmap_items 7\nksm_zero_pages 1\nksm_merging_pages 3\nksm_process_profit -64\n"
    s = procfs.parse_ksm_stat(1, text + "ksm_merge_any: no\nksm_mergeable: yes\n")
    assert (s.rmap_items, s.zero_pages, s.merging_pages, s.process_profit) == (7, 1, 3, -64)
    assert (s.merge_any, s.mergeable) == (False, True)
    # A number with thousands of digits is not a count: ignored, not parsed.
    assert procfs.parse_ksm_stat(1, "ksm_rmap_items " + "9" * 5000).rmap_items is None
    write_proc(tmp_path, 30, "old", None)
    (tmp_path / "30" / "ksm_merging_pages").write_text("12\n")
    assert procfs.ksm_stat(30, tmp_path).merging_pages == 12
    write_proc(tmp_path, 31, "ancient", None)
    with pytest.raises(KsmUnavailable, match="no per-process KSM stats for pid 31"):
        procfs.ksm_stat(31, tmp_path)
    with pytest.raises(HarnessError, match="no process with pid 32"):
        procfs.ksm_stat(32, tmp_path)


def test_meminfo_in_bytes(tmp_path: Path) -> None:
    (tmp_path / "meminfo").write_text("MemTotal: 100 kB\nMemAvailable: 40 kB\nHugePages_Total: 3\n")
    assert procfs.meminfo(tmp_path) == {
        "MemTotal": 102400,
        "MemAvailable": 40960,
        "HugePages_Total": 3,
    }
    assert procfs.mem_available(tmp_path) == 40960
    assert procfs.mem_available(tmp_path / "nothing") is None


def test_identity_liveness_and_cpu(tmp_path: Path) -> None:
    write_proc(tmp_path, 40, "ksmd", None)
    assert procfs.start_time(40, tmp_path) == 4000
    assert procfs.pid_alive(40, tmp_path)
    assert procfs.pid_alive(40, tmp_path, started=4000)
    assert not procfs.pid_alive(40, tmp_path, started=4001)  # the pid was reused
    assert not procfs.pid_alive(41, tmp_path)
    (tmp_path / "40" / "stat").write_text(
        "40 (ksmd) Z 1 1 1 0 -1 0 0 0 0 0 7 3 0 0 20 0 1 0 4000\n"
    )
    assert not procfs.pid_alive(40, tmp_path)  # a zombie holds nothing
    assert procfs.ksmd_pid(tmp_path) == 40
    assert procfs.cpu_seconds(40, tmp_path) == 10 / os.sysconf("SC_CLK_TCK")
    assert procfs.cmdline(40, tmp_path) == "ksmd --flag"
    assert procfs.pid_alive(os.getpid())
    assert procfs.pid_alive(os.getpid(), started=procfs.start_time(os.getpid()))
