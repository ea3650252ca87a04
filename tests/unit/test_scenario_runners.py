"""Runner logic without a kernel or the real model: the model runner drives a recording fake
through the documented API (wrapped by the one model adapter, ModelBackend)."""

from __future__ import annotations

import errno
import types
from typing import Any, ClassVar

import pytest

from harness.scenario import model_runner
from harness.scenario.errors import ModelUnavailable
from harness.scenario.kernel_runner import BIG_PAGES_TO_SCAN, refusal
from harness.scenario.spec import Scenario


class FakeSysfs:
    def __init__(self, log: list[str]) -> None:
        self.log = log
        self.files = {
            "run": "0",
            "full_scans": "0",
            "pages_scanned": "500",
            "pages_shared": "0",
            "max_page_sharing": "256",
            # Tunables the runner writes: a knob the kernel lacks is not written at all.
            "pages_to_scan": "100",
            "sleep_millisecs": "20",
            "use_zero_pages": "0",
            "smart_scan": "1",
            "stable_node_chains_prune_millisecs": "2000",
        }

    def read(self, name: str) -> str:
        if name not in self.files:
            raise FileNotFoundError(errno.ENOENT, name)
        return self.files[name] + "\n"

    def write(self, name: str, value: str) -> None:
        assert isinstance(value, str)
        self.log.append(f"sysfs {name}={value}")
        if name == "max_page_sharing" and self.files["pages_shared"] != "0":
            raise OSError(errno.EBUSY, "busy")
        if name == "run" and value == "2":
            self.files.update(full_scans="0", pages_shared="0")
        self.files[name] = value


class FakeProcess:
    def __init__(self, kernel: FakeKernel, name: str) -> None:
        self.k, self.name, self.pid = kernel, name, 100 + len(kernel.procs)
        kernel.procs.append(self)

    def mmap(self, length: int, node: int = 0, align: int = 0) -> int:
        self.k.log.append(f"{self.name} mmap {length}" + (f" align {align:#x}" if align else ""))
        return 0x200000

    def write(self, addr: int, data: bytes) -> None:
        self.k.log.append(f"{self.name} write {addr:#x} {len(data)} {data[:24]!r}")

    def fill(self, addr: int, length: int, byte: int) -> None:
        self.k.log.append(f"{self.name} fill {addr:#x} {length} {byte:#x}")

    def madvise(self, addr: int, length: int, advice: int) -> None:
        self.k.log.append(f"{self.name} madvise {addr:#x} {length} {advice}")

    def fork(self) -> FakeProcess:
        self.k.log.append(f"{self.name} fork")
        return FakeProcess(self.k, self.name + "'")

    def exit(self) -> None:
        self.k.log.append(f"{self.name} exit")

    def ksm_stat(self) -> dict[str, Any]:
        return {"ksm_rmap_items": self.pid, "ksm_mergeable": True}

    def anon_huge_bytes(self, addr: int | None = None, length: int | None = None) -> int:
        return 0x200000 if self.name == "h1" else 0


class FakeKernel:
    instances: ClassVar[list[FakeKernel]] = []

    def __init__(self, profile: str, numa_nodes: int, page_size: int, **kw: Any) -> None:
        self.args = (profile, numa_nodes, page_size, kw)
        self.page_size = page_size
        self.log: list[str] = []
        self.sysfs = FakeSysfs(self.log)
        self.procs: list[FakeProcess] = []
        FakeKernel.instances.append(self)

    def process(self, pid: int) -> FakeProcess:
        return next(p for p in self.procs if p.pid == pid)

    def spawn(self, name: str) -> FakeProcess:
        self.log.append(f"spawn {name}")
        return FakeProcess(self, name)

    def run_until(self, *, full_scans: int) -> None:
        assert self.sysfs.files["run"] == "1", "the runner must resume ksmd before scanning"
        self.log.append(f"run_until {full_scans}")
        f = self.sysfs.files
        f["pages_scanned"] = str(int(f["pages_scanned"]) + 10)
        f["full_scans"] = str(full_scans)
        f["pages_shared"] = "1"


@pytest.fixture
def fake_model(monkeypatch: pytest.MonkeyPatch) -> type[FakeKernel]:
    FakeKernel.instances.clear()
    mod = types.SimpleNamespace(
        Kernel=FakeKernel,
        MADV_MERGEABLE=12,
        MADV_UNMERGEABLE=13,
        MADV_DONTNEED=4,
        MADV_HUGEPAGE=14,
        MADV_NOHUGEPAGE=15,
    )
    monkeypatch.setattr(model_runner, "_import_model", lambda: mod)
    return FakeKernel


def test_model_runner_mirrors_the_kernel_sequence(fake_model: type[FakeKernel]) -> None:
    s = Scenario.from_mapping(
        {
            "scans": 3,
            "tunables": {"smart_scan": 0, "max_page_sharing": 3},
            "processes": [
                {"name": "p1", "contents": ["a*2", "u:5"]},
                {"name": "p2", "pages": 1, "fill": "zero"},
            ],
            "actions": [
                {"after": 1, "do": "write", "process": "p2", "page": 0, "content": "u:6"},
                {"after": 1, "do": "fork", "process": "p1", "child": "c1"},
                {"after": 2, "do": "set", "tunable": "max_page_sharing", "value": 2},
                {"after": 2, "do": "rerun"},
                {"after": 2, "do": "set", "tunable": "max_page_sharing", "value": 2},
                {"after": 2, "do": "unmergeable", "process": "c1"},
                {"after": 2, "do": "exit", "process": "p2"},
                {"after": 2, "do": "dontneed", "process": "p1", "start": 1, "count": 1},
                {"after": 2, "do": "spawn", "process": "n1", "pages": 2, "fill": "0x7f"},
                {
                    "after": 2,
                    "do": "spawn",
                    "process": "h1",
                    "pages": 512,
                    "fill": "a",
                    "thp": True,
                },
            ],
        }
    )
    series = model_runner.ModelRunner(profile="6.1", hz=100).run(s)
    k = fake_model.instances[0]
    assert k.args == ("6.1", 1, 4096, {"hz": 100})
    assert k.log == [
        "sysfs run=0",
        "sysfs run=2",
        "sysfs max_page_sharing=3",
        "sysfs use_zero_pages=0",
        "sysfs smart_scan=0",
        "sysfs stable_node_chains_prune_millisecs=3600000",
        f"sysfs pages_to_scan={BIG_PAGES_TO_SCAN}",
        "sysfs sleep_millisecs=300",
        "spawn p1",
        "p1 mmap 12288",
        "p1 madvise 0x200000 12288 15",  # MADV_NOHUGEPAGE before the first write
        "p1 fill 0x200000 8192 0x61",
        "p1 write 0x202000 4096 b'ksm-harness unique page '",
        "p1 madvise 0x200000 12288 12",
        "spawn p2",
        "p2 mmap 4096",
        "p2 madvise 0x200000 4096 15",
        "p2 fill 0x200000 4096 0x0",
        "p2 madvise 0x200000 4096 12",
        "sysfs run=1",
        "run_until 1",
        "sysfs run=0",
        "p2 write 0x200000 4096 b'ksm-harness unique page '",
        "p1 fork",
        "sysfs sleep_millisecs=301",  # the kernel runner's toggle: ends ksmd's sleep
        "sysfs run=1",
        "run_until 2",
        "sysfs run=0",
        "sysfs max_page_sharing=2",
        "sysfs run=2",
        "sysfs max_page_sharing=2",
        "p1' madvise 0x200000 12288 13",
        "p2 exit",
        "p1 madvise 0x201000 4096 4",
        "spawn n1",
        "n1 mmap 8192",
        "n1 madvise 0x200000 8192 15",
        "n1 fill 0x200000 8192 0x7f",
        "n1 madvise 0x200000 8192 12",
        "spawn h1",
        "h1 mmap 2097152 align 0x200000",  # a THP buffer starts on a 2 MiB boundary
        "h1 madvise 0x200000 2097152 14",  # MADV_HUGEPAGE
        "h1 fill 0x200000 2097152 0x61",
        "h1 madvise 0x200000 2097152 12",
        "sysfs sleep_millisecs=300",
        "sysfs run=1",
        "run_until 1",  # full_scans restarted at 0 after run=2
        "sysfs run=0",
    ]
    assert series.source == "model"
    assert [x.scan for x in series.samples] == [1, 2, 3]
    assert series.samples[1].outcomes == ("refused EBUSY",) + ("ok",) * 7
    assert series.samples[0].end.counters["pages_scanned"] == 10  # a delta from the start
    assert series.samples[2].end.counters["pages_scanned"] == 30
    assert series.samples[2].end.counters["full_scans"] == 1
    assert series.samples[2].end.counters["pages_sharing"] is None  # no such file in the fake
    assert list(series.samples[2].end.processes) == ["p1", "c1", "n1", "h1"]
    assert series.samples[2].end.processes["h1"]["anon_huge_kb"] == 2048
    assert list(series.samples[1].end.processes) == ["p1", "p2", "c1"]
    assert series.samples[2].after_actions is None
    assert series.samples[0].end.processes["p1"]["ksm_zero_pages"] is None


def test_model_missing_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        model_runner.importlib, "import_module", lambda name: types.ModuleType(name)
    )
    with pytest.raises(ModelUnavailable, match="ksm_model has no Kernel"):
        model_runner.ModelRunner()


def test_refusal_text() -> None:
    assert refusal(errno.EBUSY) == "refused EBUSY"
    assert refusal(None) == "refused (no errno)"


def test_knobs_the_kernel_lacks_are_not_written_and_refused_with_enoent() -> None:
    # The real model with the 6.1 profile (no smart_scan file): the scenario's smart_scan is
    # left out before run=1, and a `set` of it is refused with ENOENT, which is also what the
    # kernel runner reports for a kernel without the file (BackendBase: errno ENOENT).
    from harness.scenario.kernel_runner import runner_tunables

    s = Scenario.from_mapping(
        {
            "scans": 2,
            "tunables": {"smart_scan": 0, "use_zero_pages": 1},
            "processes": [{"name": "p1", "pages": 4, "fill": "a"}],
            "actions": [{"after": 1, "do": "set", "tunable": "smart_scan", "value": 1}],
        }
    )
    values = runner_tunables(s, 100, 300, True, False, frozenset({"smart_scan"}))
    assert "smart_scan" not in values and values["use_zero_pages"] == 1
    series = model_runner.run_on_model(s, profile="6.1")
    assert series.at(1).outcomes == ("refused ENOENT",)
    assert series.at(2).end.counters["pages_skipped"] is None
    assert series.at(2).end.counters["pages_sharing"] == 3


def test_the_backend_refuses_an_absent_knob_with_enoent(tmp_path: Any) -> None:
    from harness.errors import KsmWriteRefused
    from harness.ksm.sysfs import SysfsBackend

    root = tmp_path / "ksm"
    root.mkdir()
    for name in ("run", "pages_to_scan", "sleep_millisecs", "pages_shared"):
        (root / name).write_text("0\n")
    with pytest.raises(KsmWriteRefused) as exc:
        SysfsBackend(root, tmp_path).write_tunables(smart_scan=1)
    assert refusal(exc.value.errno) == "refused ENOENT"
