"""Both wheels, installed into a fresh venv and run from another directory, do the real work.

Builds the ksm-harness and ksm-model wheels from this checkout, installs them into a new venv
in a temporary directory (dependencies from the package index, pinned by constraints.txt),
and from a working directory outside the checkout: builds the guest image (into a fresh cache
directory), boots one guest, runs an agent command, stops it, and writes the monitoring config.
So nothing may be found through the checkout's layout: package data comes through
importlib.resources and build outputs go to the cache directory (harness/paths.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.errors import CommandFailed
from harness.ksm.lock import ksm_lock
from harness.run import run

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.qemu, pytest.mark.fleet]


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A new venv with only the two wheels (and their pinned dependencies) installed."""
    base = tmp_path_factory.mktemp("wheels")
    wheels = base / "dist"
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels),
         str(ROOT), str(ROOT / "kernel-model")], timeout=600)  # fmt: skip
    built = sorted(p.name.split("-")[0] for p in wheels.glob("*.whl"))
    assert built == ["ksm_harness", "ksm_model"]
    env = base / "venv"
    run([sys.executable, "-m", "venv", str(env)], timeout=120)
    run([str(env / "bin" / "python"), "-m", "pip", "install", "-q", "-c",
         str(ROOT / "constraints.txt"), *map(str, wheels.glob("*.whl"))], timeout=900)  # fmt: skip
    yield env
    shutil.rmtree(base, ignore_errors=True)


def test_installed_wheel_builds_boots_runs_and_writes_monitoring(venv: Path) -> None:
    # Unix socket paths are limited to 108 bytes: the runtime directory must be short.
    scratch = Path(tempfile.mkdtemp(prefix="kw", dir="/tmp"))
    work, cache, runtime = scratch / "work", scratch / "cache", scratch / "run"
    work.mkdir()
    shutil.copy(ROOT / "playbooks" / "inventory.example.yaml", work / "inventory.example.yaml")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "KSM_HARNESS_"))}
    env.update(KSM_HARNESS_CACHE=str(cache), KSM_HARNESS_RUNTIME=str(runtime))
    env["KSM_HARNESS_LOCK"] = os.environ.get("KSM_HARNESS_LOCK", "")
    if not env["KSM_HARNESS_LOCK"]:
        del env["KSM_HARNESS_LOCK"]
    ksmh = str(venv / "bin" / "ksmh")

    def sh(*argv: str, timeout: float = 300) -> str:
        return run(list(argv), cwd=work, env=env, timeout=timeout).stdout

    run_id = None
    try:
        where = sh(str(venv / "bin" / "python"), "-c", "import harness; print(harness.__file__)")
        assert where.startswith(str(venv)), where  # the wheel, not this checkout
        with ksm_lock():  # mem-merge is off, yet a guest must never run beside a KSM test
            up = sh(ksmh, "fleet", "up", "--count", "1", "--memory", "128", "--accel", "tcg",
                    "--no-mem-merge", timeout=600)  # fmt: skip
            run_id = up.strip().splitlines()[-1].removeprefix("run id: ")
            manifest = json.loads((cache / "guest-images" / "manifest.json").read_text())
            assert manifest["kind"] == "busybox"
            src = manifest["inputs"]["agent_source"]["path"]
            assert src.startswith(str(venv)) and src.endswith("harness/guests/data/ksmh-agent.c")
            assert sorted(manifest["artifacts"]) == [
                "initramfs.cpio.gz", "ksmh-agent", "ksmh-worker", "vmlinux", "vmlinuz"
            ]  # fmt: skip
            ping = sh(ksmh, "fleet", "exec", "--run", run_id, "--", "ping")
            [line] = ping.splitlines()
            name, status, _seconds, reply = line.split()
            assert (name, status, reply) == (f"ksmh-{run_id}-g00", "ok", "pong")
            down = sh(ksmh, "fleet", "down", "--run", run_id)
            run_id = None
            assert down.splitlines() == [f"run {up.split()[1].rstrip(':')}: 1 guest stopped"]
            assert not (runtime / "fleet" / up.split()[1].rstrip(":")).exists()
        out = sh(ksmh, "monitoring", "config", "inventory.example.yaml", "--out", "mon")
        assert out.splitlines()[0] == "mon/prometheus.yml"  # relative to the working dir
        for rel in ("prometheus.yml", "rules/ksm_alert_rules.yml", "grafana/ksm-dashboard.json"):
            assert (work / "mon" / rel).read_text() == (ROOT / "monitoring" / rel).read_text()
    finally:
        if run_id is not None:
            with contextlib.suppress(CommandFailed):
                sh(ksmh, "fleet", "down", "--run", run_id)
        shutil.rmtree(scratch, ignore_errors=True)
    assert processes_mentioning(str(runtime)) == []  # no QEMU left behind


def processes_mentioning(text: str) -> list[int]:
    found = []
    for p in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text in p.read_bytes().decode(errors="replace"):
                found.append(int(p.parent.name))
        except OSError:
            continue  # gone meanwhile
    return found
