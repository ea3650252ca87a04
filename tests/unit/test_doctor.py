"""`ksmh doctor` on fake trees: what the machine cannot produce (VFIO pins, a second NUMA node,
no KSM, more merged memory than RAM) and the pure parts (labels, README, exporter, report).

The fake host is a /sys/kernel/mm/ksm tree, a /proc tree and THP/node trees in tmp_path;
content keys are off (they need real page tables; tests/integration covers them).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from harness.cli import main
from harness.doctor.catalog import CATALOG, KINDS, Severity
from harness.doctor.diagnosis import Diagnosis, diagnose
from harness.doctor.exposure import Exposure, matrix
from harness.doctor.facts import Options
from harness.doctor.findings import FAMILIES
from harness.doctor.groups import group_names, parse_label
from harness.doctor.readme import README, current, section
from harness.errors import HarnessError
from harness.exporter import ExportTarget, KsmCollector
from harness.ksm.sysfs import SysfsBackend

FIXTURES = Path(__file__).parents[1] / "fixtures"
MG_VMA = """7f0000000000-7f0008000000 rw-p 00000000 00:00 0
Rss:              131072 kB
AnonHugePages:         0 kB
VmFlags: rd wr mr mw me ac mg
"""


class FakeHost:
    """A KSM tree, a proc tree with processes, and THP/NUMA trees, all under tmp_path."""

    def __init__(self, tmp: Path) -> None:
        self.ksm = tmp / "ksm"
        shutil.copytree(FIXTURES / "sysfs" / "linux-6.18", self.ksm)
        self.proc = tmp / "proc"
        self.proc.mkdir()
        (self.proc / "meminfo").write_text("MemTotal: 24000000 kB\nMemAvailable: 20000000 kB\n")
        self.thp = tmp / "thp"
        self.thp.mkdir()
        (self.thp / "enabled").write_text("always [madvise] never\n")
        self.nodes = tmp / "node"
        (self.nodes / "node0").mkdir(parents=True)
        self.set(run=1, pages_to_scan=100, sleep_millisecs=20, pages_sharing=0, pages_shared=0,
                 general_profit=0, merge_across_nodes=1)  # fmt: skip

    def set(self, **values: object) -> None:
        for k, v in values.items():
            (self.ksm / k).write_text(f"{v}\n")

    def process(self, pid: int, comm: str, smaps: str = MG_VMA, **files: str) -> int:
        d = self.proc / str(pid)
        (d / "fd").mkdir(parents=True)
        (d / "comm").write_text(comm + "\n")
        (d / "cmdline").write_bytes(files.pop("cmdline", comm).replace(" ", "\0").encode())
        (d / "stat").write_text(f"{pid} ({comm}) S 1 " + " ".join(["0"] * 18) + " 12345 0\n")
        (d / "smaps").write_text(smaps)
        mergeable = "yes" if " mg" in smaps else "no"
        (d / "ksm_stat").write_text(
            files.pop("ksm_stat", f"ksm_rmap_items 0\nksm_zero_pages 0\nksm_merging_pages 0\n"
                      f"ksm_process_profit 0\nksm_merge_any: no\nksm_mergeable: {mergeable}\n")
        )  # fmt: skip
        (d / "status").write_text(files.pop("status", "VmPin:\t0 kB\nVmLck:\t0 kB\n"))
        for name, text in files.items():
            (d / name).write_text(text)
        return pid

    def fd(self, pid: int, n: int, target: str) -> None:
        os.symlink(target, self.proc / str(pid) / "fd" / str(n))

    def doctor(self, pids: list[int] | None = None, **opts: object) -> Diagnosis:
        targets = {p: f"p{p}" for p in (pids or [])}
        return diagnose(
            targets,
            "pids" if pids else "all",
            Options(window=0, content=False, **opts),  # type: ignore[arg-type]
            ksm_root=self.ksm,
            proc=self.proc,
            thp_root=self.thp,
            node_root=self.nodes,
        )


@pytest.fixture
def host(tmp_path: Path) -> FakeHost:
    return FakeHost(tmp_path)


def kinds(d: Diagnosis) -> list[str]:
    return [f.kind for f in d.findings]


def evidence(d: Diagnosis, kind: str) -> list[tuple[str, str]]:
    (f,) = d.of_kind(kind)
    return [(e.file, e.value) for e in f.evidence]


def test_ksm_absent(host: FakeHost) -> None:
    shutil.rmtree(host.ksm)
    d = host.doctor()
    assert kinds(d) == ["ksm-absent"]
    assert evidence(d, "ksm-absent") == [(str(host.ksm / "run"), "missing")]
    assert d.exit_status == 1


def test_nothing_wrong_exits_0(host: FakeHost) -> None:
    host.process(100, "worker")
    d = host.doctor([100])
    assert d.findings == [] and d.exit_status == 0


def test_unmerging_and_unmerge_memory(host: FakeHost) -> None:
    host.process(100, "worker")
    host.set(run=2, pages_sharing=6_000_000)  # 22.9 GiB of merged pages, 19 GiB available
    d = host.doctor([100])
    assert kinds(d) == ["unmerge-memory", "ksm-unmerging"]  # critical first
    assert evidence(d, "unmerge-memory") == [
        (str(host.ksm / "pages_sharing"), "6000000"),
        ("/proc/meminfo", "MemAvailable: 20000000 kB"),
    ]
    (f,) = d.of_kind("unmerge-memory")
    assert f.severity is Severity.CRITICAL
    assert f.data == {"need": 6_000_000 * 4096, "available": 20_000_000 * 1024}


def test_vfio_pinned_guest(host: FakeHost) -> None:
    """A fake: no VFIO device here. VFIO accounts its pins in VmLck and holds a group fd."""
    pid = host.process(100, "qemu-system-x86", status="VmPin:\t0 kB\nVmLck:\t4194304 kB\n")
    host.fd(pid, 3, "/dev/vfio/vfio")  # the container: not itself a device
    host.fd(pid, 17, "/dev/vfio/42")
    d = host.doctor([pid])
    assert kinds(d) == ["pinned-pages"]
    assert evidence(d, "pinned-pages") == [
        (f"/proc/{pid}/status", "VmPin: 0 kB"),
        (f"/proc/{pid}/status", "VmLck: 4194304 kB"),
        (f"/proc/{pid}/fd/17", "/dev/vfio/42"),
    ]
    assert "VFIO device" in d.findings[0].message


def test_second_numa_node_merging_across(host: FakeHost) -> None:
    (host.nodes / "node1").mkdir()
    host.process(100, "worker")
    d = host.doctor([100])
    assert kinds(d) == ["numa-cross-node"]
    assert evidence(d, "numa-cross-node") == [
        (str(host.ksm / "merge_across_nodes"), "1"),
        ("/sys/devices/system/node", "node0 node1"),
    ]
    assert d.exit_status == 0  # info only


def test_second_numa_node_split(host: FakeHost) -> None:
    (host.nodes / "node1").mkdir()
    host.set(merge_across_nodes=0)
    numa = "7f0000000000 default anon=32768 dirty=32768 N0=20000 N1=12768 kernelpagesize_kB=4\n"
    pid = host.process(100, "worker", numa_maps=numa)
    d = host.doctor([pid])
    assert kinds(d) == ["numa-split"]
    ev = evidence(d, "numa-split")
    assert ev[-1] == (f"/proc/{pid}/numa_maps", "mergeable VMAs: N0=20000 N1=12768")
    assert d.findings[0].data == {"nodes": {0: 20000, 1: 12768}}


def test_known_tuner_by_name_and_by_open_file(host: FakeHost) -> None:
    host.process(100, "worker")
    host.process(200, "ksmtuned", smaps="", cmdline="/bin/bash /usr/sbin/ksmtuned")
    agent = host.process(300, "node-agent", smaps="")
    host.fd(agent, 5, str(host.ksm / "run"))
    d = host.doctor([100])
    tuners = {f.pid: [(e.file, e.value) for e in f.evidence] for f in d.of_kind("known-tuner")}
    assert tuners == {
        200: [("/proc/200/cmdline", "/bin/bash /usr/sbin/ksmtuned")],
        300: [("/proc/300/fd/5", str(host.ksm / "run"))],
    }


def test_slow_scan_arithmetic_and_zero_pages_to_scan(host: FakeHost) -> None:
    host.process(100, "worker")  # 32768 present mergeable pages (Rss 128 MiB)
    host.set(pages_to_scan=1, sleep_millisecs=20)
    (f,) = host.doctor([100], max_scan_seconds=60).of_kind("slow-full-scan")
    assert f.data == {"seconds": round(32768 * 0.02 + 32768 / 300_000, 1), "pages": 32768}
    assert f.fix == "ksmh set pages_to_scan=100 (one full scan in ~60 s)"
    host.set(pages_to_scan=0)
    d = host.doctor([100])
    assert kinds(d) == ["pages-to-scan-zero", "slow-full-scan"]
    assert "never ends" in d.of_kind("slow-full-scan")[0].message


def test_negative_process_profit_without_negative_general_profit(host: FakeHost) -> None:
    stat = ("ksm_rmap_items 4096\nksm_zero_pages 0\nksm_merging_pages 0\n"
            "ksm_process_profit -262144\nksm_merge_any: no\nksm_mergeable: yes\n")  # fmt: skip
    pid = host.process(100, "worker", ksm_stat=stat)
    host.set(general_profit=1 << 20)
    d = host.doctor([pid])
    assert kinds(d) == ["negative-profit"]
    assert d.findings[0].subject == f"pid {pid} (p{pid})"
    assert evidence(d, "negative-profit") == [
        (f"/proc/{pid}/ksm_stat", "ksm_process_profit -262144")
    ]


def test_every_kind_has_a_family_and_the_readme_is_current() -> None:
    assert {k.family for k in CATALOG} == set(FAMILIES)
    assert len(KINDS) == len(CATALOG)
    text = section()
    for k in CATALOG:
        assert f"(`{k.id}`, {k.severity})" in text
    assert current(README.read_text()) == text, "run: python -m harness.doctor.readme"


def test_readme_check_fails_on_drift(tmp_path: Path) -> None:
    from harness.doctor.readme import main as readme_main

    stale = tmp_path / "README.md"
    stale.write_text(
        README.read_text().replace("(`ksm-stopped`, warning)", "(`ksm-stopped`, info)")
    )
    assert readme_main(["--check", str(stale)]) == 1
    assert readme_main([str(stale)]) == 0
    assert readme_main(["--check", str(stale)]) == 0 and stale.read_text() == README.read_text()


def test_labels_and_groups() -> None:
    lb = parse_label("0-2,web:tenant=acme")
    assert (lb.numbers, lb.names, lb.key, lb.value) == (frozenset({0, 1, 2}), frozenset({"web"}),
                                                        "tenant", "acme")  # fmt: skip
    procs = {100: "g0", 101: "g1", 102: "web", 103: "g3"}
    index = {100: 0, 101: 5, 102: 9, 103: 3}
    assert group_names(procs, [lb], "tenant", index) == {
        100: "acme",
        101: "g1",
        102: "acme",
        103: "g3",
    }
    for bad, why in (("tenant=acme", "TARGETS:KEY=VALUE"), ("0:host=a", "reserved"),
                     ("0:9x=a", "Prometheus label"), ("3-1:t=a", "bad range")):  # fmt: skip
        with pytest.raises(HarnessError, match=why):
            parse_label(bad)
    with pytest.raises(HarnessError, match="no --label gives"):
        group_names(procs, [lb], "rack")


def test_matrix_counts_distinct_shared_frames() -> None:
    import numpy as np

    pfns = {1: np.array([10, 11, 12], np.uint64), 2: np.array([11, 12, 13], np.uint64),
            3: np.array([13], np.uint64)}  # fmt: skip
    e = matrix(pfns, {1: "a", 2: "b", 3: "a"})
    assert e.groups == ("a", "b") and e.pages == ((4, 3), (3, 3))
    assert e.pairs() == [("a", "b", 3)]


def test_exporter_cross_group_series(tmp_path: Path) -> None:
    backend = SysfsBackend(root=FIXTURES / "sysfs" / "linux-6.18", proc=FIXTURES / "proc")
    e = Exposure(("acme", "globex", "initech"), ((5, 3, 0), (3, 4, 1), (0, 1, 2)), {})
    calls: list[int] = []

    def sharing() -> Exposure:
        calls.append(1)
        if len(calls) > 1:
            raise HarnessError("cannot read /proc/kpageflags")
        return e

    reg = CollectorRegistry()
    reg.register(KsmCollector([ExportTarget(backend, host="h", sharing=sharing)]))
    text = generate_latest(reg).decode()
    assert 'ksm_cross_group_shared_pages{a="acme",b="globex",host="h",source="kernel"} 3.0' in text
    assert 'ksm_cross_group_shared_pages{a="acme",b="initech",host="h",source="kernel"} 0.0' in text
    assert (
        'ksm_cross_group_shared_pages{a="globex",b="initech",host="h",source="kernel"} 1.0' in text
    )
    assert text.count("ksm_cross_group_shared_pages{") == 3
    text = generate_latest(reg).decode()  # the probe fails: no series, one read error
    assert "ksm_cross_group_shared_pages{" not in text
    assert 'ksm_exporter_read_errors_total{host="h",source="kernel"} 1.0' in text


def test_report_section() -> None:
    from harness.report.markdown import render_markdown
    from harness.report.results import Results

    run = {"run_id": "r1", "phases": [], "sharing_exposure": {
        "groups": ["g0", "g1"], "pages": [[7, 5], [5, 6]], "phase": "fill"}}  # fmt: skip
    text = render_markdown(Results(run=run), {})
    assert "## Sharing exposure" in text
    assert "| | g0 | g1 |\n|---|---|---|\n| g0 | 7 | 5 |\n| g1 | 5 | 6 |" in text
    assert "at the end of phase fill" in text


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["doctor", "--window", "nan"], "--window nan: must be 0..3600"),
        (["doctor", "--label", "acme"], "expected TARGETS:KEY=VALUE"),
        (["doctor", "--group-by", "tenant", "--pid", "1"], "no --label gives tenant"),
        (["doctor", "--pid", "999999999"], "--pid 999999999: no such process"),
        (["doctor", "--min-vma", "1MB"], "MB is a decimal unit"),
        (["export", "--group-by", "tenant"], "--label and --group-by need --sharing"),
        (["export", "--sharing", "--sharing-interval", "0"], "--sharing-interval 0: must be"),
    ],
)
def test_cli_refuses_bad_input(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("ksmh: error: ") and message in err and "hint:" in err
