"""`ksmh doctor` against real processes and the real KSM (root, the host lock held).

Each test builds the situation a finding is about with real child processes
(tests/integration/doctor_proc.py) and real knobs, then asserts the exact finding and its
evidence. The `ksm` fixture holds the host lock and restores every knob afterwards.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from subprocess import Popen

import pytest

from harness.doctor.catalog import Finding
from harness.doctor.diagnosis import Diagnosis, diagnose
from harness.doctor.exposure import SharingProbe
from harness.doctor.facts import Options
from harness.doctor.groups import parse_label
from harness.ksm.sysfs import SysfsBackend
from harness.procfs import comm
from harness.run import PIPE, run, spawn

WORKER = Path(__file__).with_name("doctor_proc.py")
pytestmark = pytest.mark.ksm_kernel

Start = Callable[..., int]


@pytest.fixture
def start() -> Iterator[Start]:
    """start('--pages', '2048', ...) -> pid of a running doctor_proc; killed after the test."""
    procs: list[Popen[bytes]] = []

    def go(*args: str) -> int:
        p = spawn([sys.executable, str(WORKER), *args], stdin=PIPE, stdout=PIPE)
        procs.append(p)
        assert p.stdout is not None
        line = p.stdout.readline().decode()
        assert line.startswith("ready "), f"worker did not start: {line!r}"
        return int(line.split()[1])

    yield go
    for p in procs:
        p.kill()
        p.wait(10)


def doctor(pids: list[int], window: float = 0.2, **opts: object) -> Diagnosis:
    names = {pid: f"w{pid}" for pid in pids}
    return diagnose(names, "pids", Options(window=window, **opts))  # type: ignore[arg-type]


def only(d: Diagnosis, kind: str, pid: int | None = None) -> Finding:
    found = [f for f in d.of_kind(kind) if pid is None or f.pid == pid]
    assert len(found) == 1, f"{kind} for {pid}: {[f.message for f in d.findings]}"
    return found[0]


def ev(f: Finding) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for e in f.evidence:
        out.setdefault(e.file, []).append(e.value)
    return out


def test_shared_buffer_with_madv_mergeable(ksm: SysfsBackend, start: Start) -> None:
    """madvise(MADV_MERGEABLE) on MAP_SHARED succeeds; KSM ignores it; the doctor says so."""
    pid = start("--shared", "--mergeable", "--pages", "2048", "--fill", "byte:0x5a")
    d = doctor([pid])
    f = only(d, "shared-mapping", pid)
    assert f.data["would_merge"] == 2048 and f.data["present"] == 2048 and f.data["zero"] == 0
    assert "sh" in f.data["flags"] and "mg" not in f.data["flags"]
    smaps = ev(f)[f"/proc/{pid}/smaps"][0]
    assert smaps.startswith(f"{f.data['start']:x}-{f.data['end']:x} /dev/zero (deleted) VmFlags:")
    assert ev(f)[f"/proc/{pid}/mem"] == [
        "2048 of 2048 present pages have a duplicate (content keys)"
    ]
    assert "MAP_PRIVATE|MAP_ANONYMOUS" in f.fix
    assert d.analysis.summaries[pid].scanned_pages == 0  # KSM scans none of it
    assert d.exit_status == 1


def test_ksm_stopped(ksm: SysfsBackend, start: Start) -> None:
    ksm.write_tunables(run=0)
    pid = start("--mergeable", "--pages", "512")
    d = doctor([pid])
    f = only(d, "ksm-stopped")
    assert [(e.file, e.value) for e in f.evidence] == [("/sys/kernel/mm/ksm/run", "0")]
    assert f.fix == "ksmh set run=1"
    assert f.data["mergeable_pages"] >= 512 and f.data["users"] >= 1
    s = d.analysis.summaries[pid]
    assert (s.scanned_pages, s.could_merge) == (512, 512)
    ksm.write_tunables(run=2, force=True)
    f = only(doctor([pid]), "ksm-unmerging")
    assert [(e.file, e.value) for e in f.evidence] == [
        ("/sys/kernel/mm/ksm/run", "2"),
        ("/sys/kernel/mm/ksm/pages_sharing", "0"),
    ]


def test_advisor_owns_pages_to_scan(ksm: SysfsBackend, start: Start) -> None:
    """The kernel's advisor rewrites pages_to_scan itself: an info finding, never a writer."""
    ksm.write_tunables(run=2, force=True)
    ksm.write_tunables(advisor_mode="scan-time", sleep_millisecs=10, run=1)
    start("--mergeable", "--pages", "16384", "--fill", "random")
    d = doctor([], window=1.0)
    f = only(d, "advisor-active")
    e = ev(f)
    assert e["/sys/kernel/mm/ksm/advisor_mode"] == ["none [scan-time]"]
    target = (ksm.root / "advisor_target_scan_time").read_text().strip()
    assert e["/sys/kernel/mm/ksm/advisor_target_scan_time"] == [target]
    assert f.severity.name == "INFO"
    assert not [x for x in d.of_kind("knob-writer") if "pages_to_scan" in x.data["files"]]


def test_pages_to_scan_1_over_1_gib(ksm: SysfsBackend, start: Start) -> None:
    ksm.write_tunables(run=2, force=True)
    ksm.write_tunables(pages_to_scan=1, sleep_millisecs=20, advisor_mode="none", run=1)
    pages = 262144  # 1 GiB
    pid = start("--mergeable", "--pages", str(pages), "--fill", "byte:0x11")
    d = doctor([pid], content=False)
    f = only(d, "slow-full-scan")
    n = f.data["pages"]
    assert n >= pages  # every process KSM scans is in the scan; ours is 1 GiB of it
    assert f.data["seconds"] == pytest.approx(n * 0.020 + n / 300_000, abs=0.1)
    e = ev(f)
    assert e["/sys/kernel/mm/ksm/pages_to_scan"] == ["1"]
    assert e["/sys/kernel/mm/ksm/sleep_millisecs"] == ["20"]
    assert f"pid {pid} ({comm(pid)}) {pages:,}" in e["/proc/*/smaps"][0]
    assert f.fix.startswith("ksmh set pages_to_scan=")
    suggested = int(f.fix.split("=")[1].split()[0])
    assert suggested * 60 >= n * 0.020  # its scan fits in the 60 s target


def test_foreign_process(ksm: SysfsBackend, start: Start) -> None:
    ours = start("--mergeable", "--pages", "256")
    other = start("--mergeable", "--pages", "768", "--fill", "byte:0x33")
    d = doctor([ours])
    f = only(d, "foreign-ksm-user", other)
    assert f.subject == f"pid {other} ({comm(other)})"
    assert ev(f)[f"/proc/{other}/ksm_stat"] == ["ksm_mergeable: yes"]
    assert ev(f)[f"/proc/{other}/smaps"] == ["768 present pages in mergeable VMAs"]
    assert not [x for x in d.of_kind("foreign-ksm-user") if x.pid == ours]


def test_negative_general_profit(
    ksm: SysfsBackend, start: Start, wait_full_scans: Callable[..., int]
) -> None:
    ksm.write_tunables(run=2, force=True)
    ksm.write_tunables(pages_to_scan=5000, sleep_millisecs=10, advisor_mode="none", run=1)
    pid = start("--mergeable", "--pages", "8192", "--fill", "random")
    wait_full_scans(2)
    ksm.write_tunables(run=0)  # freeze the counters the doctor reads
    profit = ksm.read_counters().general_profit
    assert profit is not None and profit < 0
    d = doctor([pid])
    f = only(d, "negative-profit")
    assert f.subject == "host" and f.data["general_profit"] == profit
    e = ev(f)
    assert e["/sys/kernel/mm/ksm/general_profit"] == [str(profit)]
    stat = ksm.ksm_stat(pid)
    assert stat.rmap_items == 8192 and stat.merging_pages == 0
    assert e[f"/proc/{pid}/ksm_stat"] == [f"ksm_process_profit {stat.process_profit}"]


def test_tuner_rewriting_pages_to_scan(ksm: SysfsBackend, start: Start) -> None:
    ksm.write_tunables(advisor_mode="none", pages_to_scan=100)
    tuner = start("--tune", "/sys/kernel/mm/ksm/pages_to_scan=100,200", "--period", "0.05")
    d = doctor([], window=1.0)
    f = only(d, "knob-writer", tuner)
    e = ev(f)
    (written,) = e["/sys/kernel/mm/ksm/pages_to_scan"]
    words = written.split()
    assert words[0] == "written" and int(words[1]) >= 5  # every 50 ms for 1 s
    seen = written.split("values seen: ")[1].split(", ")
    assert set(seen) == {"100", "200"} and len(seen) >= 3
    assert f"by pid {tuner};" in written
    assert e[f"/proc/{tuner}/cmdline"] == [
        f"{sys.executable} {WORKER} --tune /sys/kernel/mm/ksm/pages_to_scan=100,200 --period 0.05"
    ]
    assert f.data["files"] == ["pages_to_scan"]


def test_volatile_process(ksm: SysfsBackend, start: Start) -> None:
    pid = start("--mergeable", "--pages", "1024", "--fill", "random", "--volatile")
    d = doctor([pid], window=1.0)
    f = only(d, "volatile-process", pid)
    sampled, changed = f.data["sampled"], f.data["changed"]
    assert sampled >= 1000 and changed >= 0.9 * sampled
    assert ev(f)[f"/proc/{pid}/mem"][0].startswith(f"{changed} of {sampled} sampled mergeable")


def test_quiet_process_is_not_volatile_and_merges(
    ksm: SysfsBackend, start: Start, wait_full_scans: Callable[..., int]
) -> None:
    """The healthy case: duplicates that KSM merged. Nothing about this process needs action;
    the sharing matrix counts the KSM pages both workers map."""
    ksm.write_tunables(run=2, force=True)
    ksm.write_tunables(pages_to_scan=5000, sleep_millisecs=10, advisor_mode="none", run=1)
    a = start("--mergeable", "--pages", "300", "--fill", "index:7")
    b = start("--mergeable", "--pages", "300", "--fill", "index:7")
    c = start("--mergeable", "--pages", "300", "--fill", "index:8")
    wait_full_scans(2)
    d = diagnose(
        {a: "a", b: "b", c: "c"},
        "pids",
        Options(window=0.2),
        group_of={a: "acme", b: "globex", c: "acme"},
    )
    for pid in (a, b, c):
        assert not [f for f in d.findings if f.pid == pid], [f.message for f in d.findings]
    s = d.analysis.summaries
    assert (s[a].scanned_pages, s[a].could_merge, s[a].merged) == (300, 300, 300)
    assert (s[c].could_merge, s[c].merged) == (0, 0)
    e = d.analysis.exposure
    assert e is not None and e.groups == ("acme", "globex")
    assert e.pages == ((300, 300), (300, 300))  # c merged nothing: only a's pages, shared with b
    assert e.members == {"acme": (min(a, c), max(a, c)), "globex": (b,)}
    # The exporter's probe measures the same over every process KSM scans.
    probe = SharingProbe(
        labels=[parse_label(f"{a},{c}:tenant=acme"), parse_label(f"{b}:tenant=globex")],
        group_by="tenant",
    )
    pairs = {(x, y): n for x, y, n in probe().pairs()}
    assert pairs[("acme", "globex")] == 300
    assert probe() is probe()  # cached for the interval


def test_io_uring_fixed_buffer_is_pinned(
    ksm: SysfsBackend, start: Start, wait_full_scans: Callable[..., int]
) -> None:
    """Real pins: an io_uring fixed buffer (VmPin) next to an identical unpinned one."""
    ksm.write_tunables(run=2, force=True)
    ksm.write_tunables(pages_to_scan=5000, sleep_millisecs=10, advisor_mode="none", run=1)
    pinned = start("--mergeable", "--pages", "1024", "--fill", "index:3", "--uring")
    free = start("--mergeable", "--pages", "1024", "--fill", "index:3")
    wait_full_scans(2)
    d = doctor([pinned, free])
    f = only(d, "pinned-pages", pinned)
    e = ev(f)
    assert e[f"/proc/{pinned}/status"] == ["VmPin: 4096 kB"]
    assert list(e[k] for k in e if "/fd/" in k) == [["anon_inode:[io_uring]"]]
    assert ksm.ksm_stat(pinned).merging_pages == 0  # KSM could not write-protect them
    assert "1,024 pages with duplicates are not merged" in f.message
    assert not [x for x in d.of_kind("pinned-pages") if x.pid == free]


def test_thp_in_mergeable_memory(ksm: SysfsBackend, start: Start) -> None:
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip()
    if "[never]" in thp:
        pytest.skip("THP is off on this host")
    ksm.write_tunables(run=0)
    pid = start("--mergeable", "--pages", "4096", "--fill", "byte:0", "--thp", "on")
    d = doctor([pid])
    f = only(d, "thp-cost", pid)
    e = ev(f)
    assert e["/sys/kernel/mm/transparent_hugepage/enabled"] == [thp]
    huge_kib = int(e[f"/proc/{pid}/smaps"][0].split()[1])
    assert huge_kib >= 2048 and huge_kib % 2048 == 0
    assert e["/proc/kpageflags"] == [f"{huge_kib // 4} zero-filled KPF_THP subpages"]


def test_cli_json_and_exit_status(ksm: SysfsBackend, start: Start) -> None:
    pid = start("--shared", "--mergeable", "--pages", "512")
    out = run(
        [sys.executable, "-m", "harness.cli", "doctor", "--pid", str(pid), "--json",
         "--window", "0"],
        check=False,
        env={**os.environ},
    )  # fmt: skip
    assert out.returncode == 1, out.stderr
    doc = json.loads(out.stdout)
    kinds = [(f["kind"], f["pid"]) for f in doc["findings"]]
    assert ("shared-mapping", pid) in kinds
    assert doc["exit_status"] == 1 and doc["processes"][0]["pid"] == pid


def test_without_root_one_line_and_the_rest(ksm: SysfsBackend, start: Start) -> None:
    """As nobody: one line says what could not be checked; knob changes are still seen."""
    if not Path("/usr/bin/setpriv").exists():
        pytest.skip("setpriv (util-linux) not installed")
    ksm.write_tunables(advisor_mode="none", pages_to_scan=100)
    worker = start("--mergeable", "--pages", "256")
    start("--tune", "/sys/kernel/mm/ksm/pages_to_scan=100,200", "--period", "0.05")
    out = run(
        ["/usr/bin/setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--",
         sys.executable, "-m", "harness.cli", "doctor", "--pid", str(worker), "--window", "1"],
        check=False,
        timeout=60,
    )  # fmt: skip
    assert out.returncode == 1, out.stderr
    lines = out.stdout.splitlines()
    assert [x for x in lines if x.startswith("not checked:")] == [
        "not checked: not root: other users' processes (1 examined), page contents "
        "(would-merge counts, volatility), page frames (THP, KSM pages, the sharing matrix) "
        "and knob writers were not checked"
    ]
    assert (
        "[warning] knob-writer: pages_to_scan changed during the 1.0 s window: the writer "
        "could not be named (not root: no fanotify)"
    ) in lines
    (values,) = [x for x in lines if "evidence: /sys/kernel/mm/ksm/pages_to_scan" in x]
    assert set(values.split("values seen: ")[1].split(", ")) == {"100", "200"}
