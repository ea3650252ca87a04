"""`ksmh export --twin` beside the real kernel with real guests, scraped by a real Prometheus.

Guests are booted with `ksmh fleet up --no-thp` (see Fleets.up), filled with identical and
mixed memory through `ksmh fleet exec`, KSM is turned on, and Prometheus scrapes the exporter
every second. A what-if twin at max_page_sharing 16 beside a kernel at 256 shows the chain
counts that the kernel then produces when it really runs at 16; after each convergence the
twin's pages_shared and pages_sharing are within 1% of the kernel's, also after a guest boots
and after one stops while it runs. tests/integration/test_twin_kernel.py checks the live twin
against the real kernel to the page, with and without huge pages.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from subprocess import Popen
from typing import Any

import pytest

from harness.ksm.sysfs import SysfsBackend
from harness.run import run, spawn
from tests.integration.conftest import free_port
from tests.integration.prom import Prometheus, prometheus, wait_http

pytestmark = [pytest.mark.ksm_kernel, pytest.mark.qemu, pytest.mark.prometheus]

CONFIG = """
global:
  scrape_interval: 1s
scrape_configs:
  - job_name: ksm
    static_configs:
      - targets: ["127.0.0.1:{port}"]
"""
KNOBS = {"pages_to_scan": 4000, "sleep_millisecs": 20, "smart_scan": 1, "use_zero_pages": 0}


def ksmh(*args: str, timeout: float = 600) -> str:
    """The ksmh CLI of this checkout, in a subprocess; its stdout."""
    return run([sys.executable, "-m", "harness.cli", *args], timeout=timeout).stdout


class Fleets:
    """`ksmh fleet up` runs of one test, always brought down."""

    def __init__(self) -> None:
        self.runs: list[str] = []

    def up(self, count: int) -> str:
        # --no-thp: the what-if at 16 ran beside the kernel at 256 from the start, the kernel at
        # 16 then starts from memory the run at 256 split. With huge pages the end state
        # depends on that history (seen: 9 chains against 10, 2,613 dups against 2,620), so
        # the comparison is made on small pages. tests/integration/test_twin_kernel.py and
        # the forecast playbook hold the twin's capture and model to the kernel with THP.
        out = ksmh("fleet", "up", "--count", str(count), "--memory", "256", "--accel", "tcg",
                   "--no-thp")  # fmt: skip
        m = re.search(r"^run id: (\S+)$", out, re.M)
        assert m, out
        self.runs.append(m.group(1))
        return m.group(1)

    def fill(self, run_id: str, own_pages: bool = True) -> None:
        """48 MiB of 0x5a, then 32 MiB of which half is common to all guests, 10% zeros and
        the rest the guest's own (by its index in its fleet). Without `own_pages` that rest is
        zeros too: see _come_and_go."""
        ksmh("fleet", "exec", "--run", run_id, "--", "fill", "a", "48M", "byte:0x5a")
        mix = "mix:7:common=50,zero=" + ("10" if own_pages else "50")
        ksmh("fleet", "exec", "--run", run_id, "--", "fill", "b", "32M", mix)

    def down(self, run_id: str) -> None:
        ksmh("fleet", "down", "--run", run_id)
        self.runs.remove(run_id)


@pytest.fixture
def fleets() -> Iterator[Fleets]:
    f = Fleets()
    yield f
    for r in list(f.runs):
        f.down(r)


@pytest.fixture
def exporter(tmp_path: Path) -> Iterator[Callable[..., tuple[int, Popen[bytes]]]]:
    procs: list[Popen[bytes]] = []

    def start(*extra: str) -> tuple[int, Popen[bytes]]:
        port = free_port()
        log = (tmp_path / f"exporter-{port}.log").open("wb")
        p = spawn(
            [sys.executable, "-m", "harness.cli", "export", "--twin", "--twin-cpu", "30%",
             "--listen", f"127.0.0.1:{port}", "--host", "twin-test", *extra],
            stdout=log,
            stderr=log,
        )  # fmt: skip
        procs.append(p)
        wait_http(f"http://127.0.0.1:{port}/metrics", p, 30)
        return port, p

    yield start
    for p in procs:
        p.terminate()
        p.wait(30)


def values(prom: Prometheus, metric: str) -> dict[str, float]:
    """source -> value of one series per source."""
    return {r["metric"]["source"]: float(r["value"][1]) for r in prom.query(metric)}


def converged(prom: Prometheus, timeout: float = 300.0, minimum: float = 1000) -> dict[str, Any]:
    """Until the kernel's pages_shared and pages_sharing hold still for 4.5 s and the model
    is within 1% of both; returns the last values by counter and source."""
    deadline = time.monotonic() + timeout
    history: list[tuple[float, float]] = []
    last: dict[str, Any] = {}
    while time.monotonic() < deadline:
        last = {c: values(prom, f"ksm_pages_{c}") for c in ("shared", "sharing")}
        k = last["shared"].get("kernel"), last["sharing"].get("kernel")
        if None not in k and k[1] is not None and k[1] >= minimum:
            history.append((k[0] or 0.0, k[1]))
            steady = len(history) >= 4 and len(set(history[-4:])) == 1
            close = all(
                abs(last[c].get("model", -1e9) - last[c]["kernel"]) <= 0.01 * last[c]["kernel"]
                for c in ("shared", "sharing")
            )
            if steady and close:
                return last
        time.sleep(1.5)
    raise AssertionError(f"twin and kernel did not converge within {timeout} s: {last}")


def _come_and_go(prom: Prometheus, fleets: Fleets, at_16: dict[str, Any]) -> dict[str, Any]:
    """A guest boots while the twin runs, then stops: the twin converges each time.

    The new guest is index 0 of its own fleet, so its own pages would equal those of the
    first fleet's g00: 3,277 pairs of pages that only these two guests hold. With smart_scan
    such a pair merges only in a scan that visits both, and the old page, long unmerged, is
    visited every 9th scan: whether the new page's first visits meet it depends on the scan in
    which ksmd first saw it. A twin that skipped scans (CPU budget) or captured mid-fill puts
    it on another schedule: kernel and twin disagreed on all 3,277 pairs in 4 of 5 runs here
    (either way round; 5% of pages_shared in two, 20% in two): a limit of a twin fed by
    captures at scan ends (README, "Monitoring with a twin"). So the new guest holds no pages
    of its own: all that merges of it merges into the stable tree, whichever scan sees it
    first."""
    second = fleets.up(1)
    fleets.fill(second, own_pages=False)
    with_four = converged(prom, minimum=at_16["sharing"]["kernel"] + 12000)
    fleets.down(second)
    after = converged(prom)
    print(f"twin vs kernel: 3 guests {at_16}, 4 guests {with_four}, 3 again {after}")
    assert after["sharing"]["kernel"] < with_four["sharing"]["kernel"] - 12000
    return after


# ~90 s: three guests boot, a what-if and two convergences at 256 and 16, a fourth guest boots
# and converges, one stops and the twin converges again.
def test_twin_and_what_if_track_the_kernel_while_guests_come_and_go(
    ksm: SysfsBackend, fleets: Fleets, exporter: Callable[..., tuple[int, Popen[bytes]]],
    tmp_path: Path,
) -> None:  # fmt: skip
    """One fleet, one exporter, one Prometheus (test time): the what-if at 16 against the
    kernel at 256, then the kernel really at 16, then a guest boots and one stops."""
    ksm.write_tunables(run=2, force=True)
    ksm.apply({**KNOBS, "max_page_sharing": 256, "run": 0})
    first = fleets.up(3)
    port, proc = exporter("--what-if", "mps16:max_page_sharing=16")
    names = ("pages_shared", "pages_sharing", "stable_node_chains", "stable_node_dups")
    w = "what-if:mps16"
    with prometheus(CONFIG.format(port=port), tmp_path / "prom") as prom:

        def at(source: str) -> dict[str, float]:
            return {n: values(prom, f"ksm_{n}").get(source, -1.0) for n in names}

        fleets.fill(first)
        ksm.write_tunables(run=1)
        before = converged(prom)
        # 3 guests x 12288 identical pages: at least 36864 - 144 dups merged.
        assert before["sharing"]["kernel"] >= 36864 - 144
        deadline = time.monotonic() + 300
        seen: list[dict[str, float]] = []
        # The what-if runs on its own clock within its CPU budget: wait until it has merged
        # and then holds still.
        while len(seen) < 3 or seen[-1] != seen[-3] or seen[-1]["pages_sharing"] <= 0:
            assert time.monotonic() < deadline, seen
            seen.append(at(w))
            time.sleep(2)
        what_if, kernel_256 = seen[-1], at("kernel")
        assert what_if["stable_node_dups"] > 4 * kernel_256["stable_node_dups"]  # 16 vs 256
        # Now the kernel itself at 16: unmerge, set it, merge again (the twin follows).
        ksm.write_tunables(run=2, force=True)
        ksm.write_tunables(max_page_sharing=16)
        ksm.write_tunables(run=1)
        at_16 = converged(prom)
        kernel_16 = at("kernel")
        print(f"what-if at 16: {what_if}; kernel at 256: {kernel_256}; kernel at 16: {kernel_16}")
        assert kernel_16["stable_node_chains"] == what_if["stable_node_chains"]
        for n in ("stable_node_dups", "pages_shared", "pages_sharing"):
            assert abs(kernel_16[n] - what_if[n]) <= 0.01 * kernel_16[n], (n, kernel_16, what_if)
        after = _come_and_go(prom, fleets, at_16)
        # The twin's own series.
        for name in ("ksm_twin_capture_seconds", "ksm_twin_lag_full_scans",
                     "ksm_twin_captured_pages", "ksm_twin_captures_total"):  # fmt: skip
            rows = prom.query(f'{name}{{host="twin-test"}}')
            assert len(rows) == 1, name
        assert float(prom.query("ksm_twin_captured_pages")[0]["value"][1]) > 3 * 12288
        delta = prom.query('ksm_model_delta{source="model", counter="pages_sharing"}')
        assert abs(float(delta[0]["value"][1])) <= 0.01 * after["sharing"]["kernel"]
        cpu = values(prom, "ksm_ksmd_cpu_seconds_total")
        assert cpu["kernel"] > 0 and cpu["model"] > 0 and cpu[w] > 0
    assert proc.poll() is None  # the exporter is still serving
