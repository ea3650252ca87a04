"""SysfsBackend against fake sysfs/proc trees (tests/fixtures)."""

from __future__ import annotations

import errno
import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from harness.errors import (
    KsmBusy,
    KsmPermissionDenied,
    KsmReadError,
    KsmUnavailable,
    KsmWriteRefused,
    ScanTimeout,
    UnmergeGuard,
)
from harness.ksm.sysfs import SysfsBackend
from harness.ksm.types import Counters, derive
from tests.conftest import snapshot

Make = Callable[[str], SysfsBackend]


def test_reads_every_counter_of_a_6_18_kernel(fake_backend: Make) -> None:
    c = fake_backend("linux-6.18").read_counters()
    assert c == Counters(
        pages_shared=2,
        pages_sharing=298,
        pages_unshared=7,
        pages_volatile=5,
        pages_scanned=5100,
        pages_skipped=40,
        full_scans=17,
        stable_node_chains=1,
        stable_node_dups=2,
        ksm_zero_pages=3,
        general_profit=1201408,
    )


def test_reads_tunables_and_parses_advisor_mode(fake_backend: Make) -> None:
    t = fake_backend("linux-6.18").read_tunables()
    assert t.present() == {
        "run": 1,
        "pages_to_scan": 100,
        "sleep_millisecs": 20,
        "merge_across_nodes": 1,
        "use_zero_pages": 0,
        "max_page_sharing": 256,
        "stable_node_chains_prune_millisecs": 2000,
        "smart_scan": 1,
        "advisor_mode": "none",
        "advisor_max_cpu": 70,
        "advisor_min_pages_to_scan": 500,
        "advisor_max_pages_to_scan": 30000,
        "advisor_target_scan_time": 200,
    }


def test_old_kernel_files_are_absent_not_errors(fake_backend: Make) -> None:
    b = fake_backend("linux-5.14")
    c = b.read_counters()
    t = b.read_tunables()
    assert (c.pages_scanned, c.pages_skipped, c.ksm_zero_pages, c.general_profit) == (None,) * 4
    assert (t.smart_scan, t.advisor_mode, t.advisor_max_cpu) == (None, None, None)
    assert c.pages_sharing == 90 and t.max_page_sharing == 256


def test_old_kernel_refuses_a_knob_it_does_not_have(fake_backend: Make) -> None:
    b = fake_backend("linux-5.14")
    before = snapshot(b.root)
    with pytest.raises(KsmWriteRefused, match="smart_scan: this kernel has no such KSM file"):
        b.write_tunables(pages_to_scan=500, smart_scan=0)
    assert snapshot(b.root) == before


def test_negative_general_profit(fake_backend: Make) -> None:
    assert fake_backend("negative-profit").read_counters().general_profit == -19200


def test_unreadable_file_is_a_clear_error(fake_backend: Make) -> None:
    b = fake_backend("unreadable")
    with pytest.raises(KsmReadError, match="cannot read KSM file pages_volatile"):
        b.read_counters()
    assert b.read_field("pages_sharing") == 298


def test_missing_ksm_directory(tmp_path: Path) -> None:
    with pytest.raises(KsmUnavailable, match="no KSM at"):
        SysfsBackend(root=tmp_path)


def test_derived_figures() -> None:
    d = derive(Counters(pages_shared=2, pages_sharing=298, pages_unshared=149, ksm_zero_pages=2))
    assert d.saved_bytes == 300 * 4096
    assert d.sharing_ratio == 149.0
    assert d.waste_ratio == 0.5
    empty = derive(Counters(pages_shared=0, pages_sharing=0, pages_unshared=0))
    assert (empty.saved_bytes, empty.sharing_ratio, empty.waste_ratio) == (0, None, None)


def test_write_in_safe_order_and_skip_unchanged(fake_backend: Make) -> None:
    b = fake_backend("linux-6.18")
    (b.root / "pages_shared").write_text("0\n")  # max_page_sharing can change only then
    writes: list[tuple[str, str]] = []
    real = b._write
    b._write = lambda n, t: (writes.append((n, t)), real(n, t))[1]  # type: ignore[method-assign]
    b.write_tunables(run=1, sleep_millisecs=10, advisor_mode="none", max_page_sharing="300")
    # run is always written (last); advisor_mode is unchanged so it is not rewritten.
    assert writes == [("max_page_sharing", "300"), ("sleep_millisecs", "10"), ("run", "1")]
    assert b.read_tunables().max_page_sharing == 300


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"run": 3}, "run: 3 is out of range 0..2"),
        ({"pages_to_scan": 2**32}, "pages_to_scan: 4294967296 is out of range 0..4294967295"),
        ({"max_page_sharing": 1}, "max_page_sharing: 1 is out of range 2..2147483647"),
        ({"smart_scan": "maybe"}, "smart_scan: 'maybe' is not a boolean"),
        ({"advisor_mode": "fast"}, "advisor_mode: 'fast' is not an advisor mode"),
        ({"advisor_target_scan_time": 0}, "advisor_target_scan_time: 0 is out of range"),
        ({"sleep_millisecs": "x"}, "sleep_millisecs: 'x' is not an integer"),
        ({"pages_to_scan": 10, "bogus": 1}, "unknown KSM tunable 'bogus'"),
    ],
)
def test_invalid_values_change_nothing(
    fake_backend: Make, values: dict[str, object], message: str
) -> None:
    b = fake_backend("linux-6.18")
    before = snapshot(b.root)
    with pytest.raises(KsmWriteRefused) as info:
        b.write_tunables(**values)
    assert message in str(info.value)
    assert snapshot(b.root) == before


def test_booleans_accept_kernel_spellings(fake_backend: Make) -> None:
    b = fake_backend("linux-6.18")
    b.write_tunables(use_zero_pages="on", smart_scan="n")
    assert (b.read_tunables().use_zero_pages, b.read_tunables().smart_scan) == (1, 0)


class RefusingBackend(SysfsBackend):
    """A kernel that answers every write of `name` with `code`.

    A fake on purpose: EACCES as root and a kernel EBUSY on a fake tree cannot be produced for
    real (the real EBUSY and non-root cases are in tests/integration/test_ksm_kernel.py).
    """

    def __init__(self, root: Path, proc: Path, name: str, code: int) -> None:
        super().__init__(root=root, proc=proc)
        self.refuse = (name, code)

    def _write(self, name: str, text: str) -> None:
        if name == self.refuse[0]:
            raise OSError(self.refuse[1], os.strerror(self.refuse[1]))
        super()._write(name, text)


@pytest.mark.parametrize(
    ("name", "value", "code", "cls", "hint"),
    [
        ("max_page_sharing", 10, errno.EBUSY, KsmBusy, "ksmh set run=2"),
        ("merge_across_nodes", 0, errno.EBUSY, KsmBusy, "ksmh set run=2"),
        ("run", 1, errno.EACCES, KsmPermissionDenied, "root"),
        ("run", 1, errno.EPERM, KsmPermissionDenied, "root"),
    ],
)
def test_kernel_refusals_become_specific_errors(
    fake_tree: Callable[[str], tuple[Path, Path]],
    name: str,
    value: int,
    code: int,
    cls: type[Exception],
    hint: str,
) -> None:
    root, proc = fake_tree("linux-6.18")
    b = RefusingBackend(root, proc, name, code)
    before = snapshot(root)
    with pytest.raises(cls) as info:
        b.write_tunables(**{name: value})
    assert hint in (info.value.hint or "")  # type: ignore[attr-defined]
    assert snapshot(root) == before


def test_pages_to_scan_under_scan_time_advisor(
    fake_tree: Callable[[str], tuple[Path, Path]],
) -> None:
    root, proc = fake_tree("linux-6.18")
    (root / "advisor_mode").write_text("none [scan-time]\n")
    b = RefusingBackend(root, proc, "pages_to_scan", errno.EINVAL)
    with pytest.raises(KsmWriteRefused, match="while advisor_mode is scan-time") as info:
        b.write_tunables(pages_to_scan=5000)
    assert "advisor_mode=none" in (info.value.hint or "")


def test_unmerge_guard_refuses_when_memory_is_short(fake_backend: Make) -> None:
    # Fixture: pages_sharing 298 (1.16 MiB) against MemAvailable 1000 kB.
    b = fake_backend("linux-6.18")
    before = snapshot(b.root)
    with pytest.raises(UnmergeGuard, match=r"298 sharing pages.*MemAvailable is 0 MiB"):
        b.write_tunables(run=2)
    assert snapshot(b.root) == before
    b.write_tunables(run=2, force=True)
    assert b.read_tunables().run == 2


def test_saved_restores_on_exception(fake_backend: Make) -> None:
    b = fake_backend("linux-6.18")
    before = snapshot(b.root)
    with pytest.raises(RuntimeError), b.saved():
        b.write_tunables(pages_to_scan=9999, sleep_millisecs=0, smart_scan=0, run=0)
        raise RuntimeError("boom")
    assert snapshot(b.root) == before


def test_saved_restores_on_sigterm(fake_backend: Make) -> None:
    b = fake_backend("linux-6.18")
    before = snapshot(b.root)
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt), b.saved():
        b.write_tunables(pages_to_scan=1234, advisor_max_cpu=5)
        os.kill(os.getpid(), signal.SIGTERM)
    assert snapshot(b.root) == before
    assert signal.getsignal(signal.SIGTERM) == previous


def test_frozen_sample_pauses_and_restores_run(fake_backend: Make) -> None:
    b = fake_backend("linux-6.18")
    writes: list[tuple[str, str]] = []
    real = b._write
    b._write = lambda n, t: (writes.append((n, t)), real(n, t))[1]  # type: ignore[method-assign]
    sample = b.frozen_sample()
    assert writes == [("run", "0"), ("run", "1")]
    assert sample.counters.pages_sharing == 298 and sample.tunables.run == 1


def test_wait_full_scans_times_out_with_figures(fake_backend: Make) -> None:
    b = fake_backend("linux-6.18")
    with pytest.raises(ScanTimeout, match=r"ksmd made 0 of 2 full scans in 0\.05 s"):
        b.wait_full_scans(2, timeout=0.05)


def test_ksm_stat_and_old_kernel_fallback(fake_backend: Make) -> None:
    b = fake_backend("linux-6.18")
    s = b.ksm_stat(4242)
    assert (s.rmap_items, s.zero_pages, s.merging_pages, s.process_profit) == (100, 0, 100, 403200)
    assert (s.merge_any, s.mergeable) == (False, True)
    old = b.ksm_stat(4343)
    assert old.merging_pages == 57 and old.rmap_items is None


def refusing(b: SysfsBackend, name: str, code: int) -> list[tuple[str, str]]:
    """Make the fake kernel refuse every write of `name` with `code`; returns the write log."""
    writes: list[tuple[str, str]] = []
    real = b._write

    def write(n: str, t: str) -> None:
        writes.append((n, t))
        if n == name:
            raise OSError(code, os.strerror(code))
        real(n, t)

    b._write = write  # type: ignore[method-assign]
    return writes


def test_set_is_all_or_nothing_against_the_advisor(fake_backend: Make) -> None:
    b = fake_backend("linux-6.18")
    (b.root / "advisor_mode").write_text("none [scan-time]\n")
    before = snapshot(b.root)
    with pytest.raises(KsmWriteRefused, match="pages_to_scan: the kernel refuses it while"):
        b.write_tunables(sleep_millisecs=5, pages_to_scan=700)
    assert snapshot(b.root) == before
    # Switching the advisor off in the same set makes pages_to_scan writable again.
    b.write_tunables(advisor_mode="none", pages_to_scan=700)
    assert b.read_tunables().pages_to_scan == 700


def test_set_is_all_or_nothing_while_pages_are_merged(fake_backend: Make) -> None:
    b = fake_backend("linux-6.18")  # pages_shared 2
    before = snapshot(b.root)
    with pytest.raises(KsmBusy, match=r"max_page_sharing: .*pages are merged \(pages_shared 2\)"):
        b.write_tunables(sleep_millisecs=5, max_page_sharing=16)
    assert snapshot(b.root) == before
    b.write_tunables(sleep_millisecs=5, max_page_sharing=256)  # unchanged: no EBUSY possible


def test_a_refusal_we_could_not_foresee_undoes_what_was_written(fake_backend: Make) -> None:
    b = fake_backend("linux-6.18")
    before = snapshot(b.root)
    writes = refusing(b, "sleep_millisecs", errno.EINVAL)
    with pytest.raises(KsmWriteRefused, match=r"sleep_millisecs=5: the kernel refused it \(EINVAL"):
        b.write_tunables(smart_scan=0, pages_to_scan=300, sleep_millisecs=5)
    assert writes[:3] == [("smart_scan", "0"), ("pages_to_scan", "300"), ("sleep_millisecs", "5")]
    assert snapshot(b.root) == before


def test_restore_goes_on_past_a_refused_write_and_writes_run_last(fake_backend: Make) -> None:
    b = fake_backend("linux-6.18")
    saved = b.read_tunables()
    for name, value in (("run", "0"), ("pages_to_scan", "9"), ("smart_scan", "0")):
        (b.root / name).write_text(value + "\n")
    (b.root / "sleep_millisecs").write_text("7\n")
    writes = refusing(b, "pages_to_scan", errno.EINVAL)
    problems = b.restore(saved)
    assert problems == ["pages_to_scan: not restored to 100 (pages_to_scan=100: the kernel "
                        "refused it (EINVAL))"]  # fmt: skip
    assert writes == [
        ("smart_scan", "1"),
        ("pages_to_scan", "100"),
        ("sleep_millisecs", "20"),
        ("run", "1"),
    ]
    now = b.read_tunables()
    assert (now.smart_scan, now.sleep_millisecs, now.run, now.pages_to_scan) == (1, 20, 1, 9)


def test_restore_unmerges_for_busy_knobs_then_restores_run(fake_backend: Make) -> None:
    b = fake_backend("linux-6.18")
    saved = b.read_tunables()
    (b.root / "max_page_sharing").write_text("16\n")
    writes: list[tuple[str, str]] = []
    real = b._write

    def write(n: str, t: str) -> None:
        writes.append((n, t))
        if n == "max_page_sharing" and (b.root / "run").read_text().strip() != "2":
            raise OSError(errno.EBUSY, "busy")
        real(n, t)

    b._write = write  # type: ignore[method-assign]
    assert b.restore(saved) == []
    assert writes == [
        ("max_page_sharing", "256"),
        ("run", "2"),
        ("max_page_sharing", "256"),
        ("run", "1"),
    ]


def test_saved_reports_what_it_could_not_restore(fake_backend: Make) -> None:
    from harness.errors import RestoreIncomplete

    b = fake_backend("linux-6.18")
    with pytest.raises(RestoreIncomplete, match=r"KSM knobs not restored: smart_scan"), b.saved():
        (b.root / "smart_scan").write_text("0\n")
        refusing(b, "smart_scan", errno.EPERM)
