"""The guest-side scenario runner (agent + C worker, harness.kernels.guest) on the host's KSM.

The guest agent built natively in its stdio mode (as tests/unit/test_agent_protocol_fuzz.py
does) drives this host's real /sys/kernel/mm/ksm, with the C scenario worker next to it. The
same scenarios then run with the host runner and the Python worker: both series must be equal,
and equal to the model's, so the C port of worker.py and GuestRunner are checked against the
reference without booting a guest (the guest matrix test does the rest: test_kernel_matrix.py).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.guests.agent import AgentClient
from harness.kernels.guest import GuestKsm, GuestRunner
from harness.ksm.sysfs import SysfsBackend
from harness.scenario.compare import compare
from harness.scenario.examples import worked_examples
from harness.scenario.generate import generate
from harness.scenario.kernel_runner import KernelRunner
from harness.scenario.model_runner import run_on_model
from harness.scenario.spec import Scenario
from harness.scenario.workers import process_alive
from tests.stdio_agent import WORKER_SOURCE, PipeChannel, build, build_stdio_agent

pytestmark = [
    pytest.mark.ksm_kernel,
    pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc builds the agent and worker"),
]


@pytest.fixture(scope="module")
def binaries(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("agent")
    return build_stdio_agent(out), build(WORKER_SOURCE, out / "ksmh-worker")


@pytest.fixture
def kernel(ksm: Any) -> SysfsBackend:
    if not isinstance(ksm, SysfsBackend):
        pytest.skip("needs the real kernel backend")
    return ksm


@pytest.fixture
def guest_runner(binaries: tuple[Path, Path], kernel: SysfsBackend) -> Iterator[GuestRunner]:
    agent, worker = binaries
    proc = subprocess.Popen(
        [str(agent)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL, env={**os.environ, "KSMH_WORKER_BIN": str(worker)},
    )  # fmt: skip
    client = AgentClient(PipeChannel(proc), name="stdio-agent", default_timeout=30.0)
    client.wait_ready(10)
    try:
        yield GuestRunner(GuestKsm(client))
    finally:
        client.call("wkill")
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(10)


def long_lines() -> Scenario:
    """A map line longer than one agent request and a write of more pages than one word."""
    return Scenario.from_mapping(
        {
            "name": "long-lines",
            "scans": 4,
            "processes": [
                {"name": "p1", "contents": [f"u:{j}" for j in range(500)]},
                {"name": "p2", "contents": [f"u:{j}" for j in range(0, 1000, 2)]},
            ],
            "actions": [
                {"after": 2, "do": "write", "process": "p1", "pages": list(range(400)),
                 "content": "a"},
                {"after": 2, "do": "write", "process": "p2", "pages": list(range(0, 500, 3)),
                 "content": "a"},
            ],
        }
    )  # fmt: skip


def by_name(name: str) -> Scenario:
    return next(s for s in worked_examples() if s.name == name)


@pytest.mark.parametrize(
    "scenario",
    [
        pytest.param(by_name("example-1"), id="example-1"),
        pytest.param(by_name("example-9-n100"), id="fork"),
        pytest.param(by_name("example-10"), id="exit"),
        pytest.param(by_name("example-11"), id="spawn"),
        pytest.param(long_lines(), id="long-lines"),
        *(pytest.param(generate(seed), id=f"seed{seed}") for seed in (3, 9, 26)),
    ],
)
def test_c_worker_through_the_agent_equals_the_python_worker(
    guest_runner: GuestRunner, kernel: SysfsBackend, scenario: Scenario
) -> None:
    through_agent = guest_runner.run(scenario)
    reference = KernelRunner(kernel).run(scenario)
    same = compare(reference, through_agent)
    assert same.ok, same.report()
    model = compare(through_agent, run_on_model(scenario))
    assert model.ok, model.report()
    assert guest_runner.last_pids  # the agent started workers, and wkill left none
    assert not any(process_alive(p) for p in guest_runner.last_pids)
