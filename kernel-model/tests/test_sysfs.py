"""k.sysfs: the kernel's formats, accepted values and errors (measured on a 6.18 host)."""

from __future__ import annotations

import errno

import pytest
from ksm_model import MADV_MERGEABLE, Kernel

DEFAULTS = {
    "run": "0\n",
    "pages_to_scan": "100\n",
    "sleep_millisecs": "20\n",
    "merge_across_nodes": "1\n",
    "use_zero_pages": "0\n",
    "max_page_sharing": "256\n",
    "stable_node_chains_prune_millisecs": "2000\n",
    "smart_scan": "1\n",
    "advisor_mode": "[none] scan-time\n",
    "advisor_max_cpu": "70\n",
    "advisor_min_pages_to_scan": "500\n",
    "advisor_max_pages_to_scan": "30000\n",
    "advisor_target_scan_time": "200\n",
    "pages_shared": "0\n",
    "pages_sharing": "0\n",
    "pages_unshared": "0\n",
    "pages_volatile": "0\n",
    "pages_scanned": "0\n",
    "pages_skipped": "0\n",
    "full_scans": "0\n",
    "stable_node_chains": "0\n",
    "stable_node_dups": "0\n",
    "ksm_zero_pages": "0\n",
    "general_profit": "0\n",
}


def errno_of(k: Kernel, name: str, value: object) -> int | None:
    try:
        k.sysfs.write(name, value)
    except OSError as exc:
        return exc.errno
    return None


def test_default_reads() -> None:
    k = Kernel()
    assert set(k.sysfs.files()) == set(DEFAULTS)
    assert {n: k.sysfs.read(n) for n in DEFAULTS} == DEFAULTS


@pytest.mark.parametrize(
    ("name", "value", "err", "reads"),
    [
        ("run", "3", errno.EINVAL, "0\n"),
        ("run", "-1", errno.EINVAL, "0\n"),
        ("run", "x", errno.EINVAL, "0\n"),
        ("run", "4294967296", errno.EINVAL, "0\n"),
        ("run", "1\n", None, "1\n"),
        ("pages_to_scan", "0", None, "0\n"),
        ("pages_to_scan", "4294967295", None, "4294967295\n"),
        ("pages_to_scan", "4294967296", errno.EINVAL, "100\n"),
        ("sleep_millisecs", "+5", None, "5\n"),
        ("sleep_millisecs", "-0", errno.EINVAL, "20\n"),
        ("sleep_millisecs", "0x10", errno.EINVAL, "20\n"),
        ("sleep_millisecs", "010", None, "10\n"),
        ("sleep_millisecs", " 5", errno.EINVAL, "20\n"),
        ("sleep_millisecs", "5 ", errno.EINVAL, "20\n"),
        ("sleep_millisecs", "5\n\n", errno.EINVAL, "20\n"),
        ("sleep_millisecs", "", None, "20\n"),  # a zero-length write is a no-op
        ("max_page_sharing", "1", errno.EINVAL, "256\n"),
        ("max_page_sharing", "-5", errno.EINVAL, "256\n"),
        ("max_page_sharing", "2147483647", None, "2147483647\n"),
        ("max_page_sharing", "2147483648", errno.ERANGE, "256\n"),
        ("max_page_sharing", "+3", None, "3\n"),
        ("max_page_sharing", "0x4", errno.EINVAL, "256\n"),
        ("merge_across_nodes", "2", errno.EINVAL, "1\n"),
        ("merge_across_nodes", "18446744073709551616", errno.ERANGE, "1\n"),
        ("merge_across_nodes", "-1", errno.EINVAL, "1\n"),
        ("use_zero_pages", "2", errno.EINVAL, "0\n"),
        ("use_zero_pages", "y", None, "1\n"),
        ("smart_scan", "off", None, "0\n"),
        ("smart_scan", "of", None, "0\n"),
        ("smart_scan", "o", errno.EINVAL, "1\n"),
        ("smart_scan", "d", None, "0\n"),
        ("smart_scan", " 1", errno.EINVAL, "1\n"),
        ("stable_node_chains_prune_millisecs", "0", None, "0\n"),
        ("stable_node_chains_prune_millisecs", "4294967296", errno.EINVAL, "2000\n"),
        ("advisor_max_cpu", "4294967301", None, "5\n"),  # stored as unsigned int
        ("advisor_max_cpu", "18446744073709551616", errno.EINVAL, "70\n"),
        ("advisor_target_scan_time", "0", errno.EINVAL, "200\n"),
        ("advisor_target_scan_time", "18446744073709551615", None, "18446744073709551615\n"),
        ("advisor_mode", "scan-time\n\n", errno.EINVAL, "[none] scan-time\n"),
        ("advisor_mode", " none", errno.EINVAL, "[none] scan-time\n"),
        ("advisor_mode", "NONE", errno.EINVAL, "[none] scan-time\n"),
    ],
)
def test_write_values_and_errors(name: str, value: str, err: int | None, reads: str) -> None:
    k = Kernel()
    assert errno_of(k, name, value) == err
    assert k.sysfs.read(name) == reads


@pytest.mark.parametrize(
    ("value", "result"),
    [
        ("t", 1),
        ("T", 1),
        ("e", 1),
        ("yes", 1),
        ("on", 1),
        ("oN", 1),
        ("1abc", 1),
        ("10", 1),
        ("Y", 1),
        ("f", 0),
        ("no", 0),
        ("n\n", 0),
        ("0", 0),
        (True, 1),
        (False, 0),
    ],
)
def test_kstrtobool(value: object, result: int) -> None:
    k = Kernel()
    k.sysfs.write("smart_scan", "0" if result else "1")
    k.sysfs.write("smart_scan", value)
    assert k.sysfs.read("smart_scan") == f"{result}\n"


def test_read_only_and_unknown_files() -> None:
    k = Kernel()
    with pytest.raises(PermissionError) as exc:
        k.sysfs.write("pages_shared", "1")
    assert exc.value.errno == errno.EACCES
    with pytest.raises(FileNotFoundError):
        k.sysfs.read("no_such_file")
    with pytest.raises(FileNotFoundError):
        k.sysfs.write("no_such_file", "1")


def test_advisor_mode_switch_resets_pages_to_scan() -> None:
    k = Kernel()
    k.sysfs.write("advisor_min_pages_to_scan", "700")
    k.sysfs.write("advisor_mode", "scan-time\n")
    assert k.sysfs.read("advisor_mode") == "none [scan-time]\n"
    assert k.sysfs.read("pages_to_scan") == "700\n"
    assert errno_of(k, "pages_to_scan", "100") == errno.EINVAL
    assert errno_of(k, "pages_to_scan", "x") == errno.EINVAL
    k.sysfs.write("advisor_mode", "scan-time")  # same mode: nothing reset
    assert k.sysfs.read("pages_to_scan") == "700\n"
    k.sysfs.write("advisor_mode", "none")
    assert k.sysfs.read("pages_to_scan") == "100\n"


def test_max_page_sharing_ebusy_only_when_shared_and_different() -> None:
    k = Kernel()
    p = k.spawn(name="p")
    a = p.mmap(2 * 4096)
    p.fill(a, 2 * 4096, 7)
    p.madvise(a, 2 * 4096, MADV_MERGEABLE)
    k.sysfs.write("run", "1")
    k.run_until(full_scans=2)
    assert k.sysfs.read("pages_shared") == "1\n"
    assert errno_of(k, "max_page_sharing", "3") == errno.EBUSY
    assert errno_of(k, "max_page_sharing", "256") is None
    assert errno_of(k, "max_page_sharing", "1") == errno.EINVAL
    k.sysfs.write("run", "2")
    assert errno_of(k, "max_page_sharing", "3") is None


def test_advisor_scan_time_grows_pages_to_scan() -> None:
    # Section 11: with ksmd's CPU share at its 1% floor the per*10 bound dominates:
    # 500 -> 5000 -> 30000 (advisor_max_pages_to_scan). Scan 1: 3000 pages in 7 batches cost
    # 7*10us + 3000*5us = 15 ms of model CPU in < 1 s: scan_time 1, cpu_percent 1;
    # pages = max(500*100/20000*30/100, 500*10) = 5000. Scan 2: per = 5000 -> 50000 -> cap.
    k = Kernel()
    p = k.spawn(name="p")
    a = p.mmap(3000 * 4096)
    for i in range(3000):
        p.write(a + i * 4096, i.to_bytes(2, "little") + b"!")
    p.madvise(a, 3000 * 4096, MADV_MERGEABLE)
    k.sysfs.write("advisor_mode", "scan-time")
    k.sysfs.write("run", "1")
    seen = []
    for f in (1, 2, 3):
        k.run_until(full_scans=f)
        seen.append(int(k.sysfs.read("pages_to_scan")))
    assert seen == [5000, 30000, 30000]


def test_run2_while_idle_and_repeated() -> None:
    k = Kernel()
    k.sysfs.write("run", "2")
    k.sysfs.write("run", "2")
    assert k.sysfs.read("run") == "2\n"
    p = k.spawn(name="p")
    a = p.mmap(4096)
    p.fill(a, 4096, 1)
    p.madvise(a, 4096, MADV_MERGEABLE)  # during run=2 the slot goes to the list tail
    assert k.mm_list == [p]
    assert k.scan_pages(10) == 0  # ksmd does not scan while run=2
