"""Shared fixtures: fake sysfs/proc trees copied from tests/fixtures so tests may write them."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from harness.ksm.sysfs import SysfsBackend

FIXTURES = Path(__file__).parent / "fixtures"

# pytester drives the plugin's own tests (tests/integration/test_pytest_plugin.py).
pytest_plugins = ("pytester",)


@pytest.fixture
def fake_tree(tmp_path: Path) -> Callable[[str], tuple[Path, Path]]:
    """fake_tree('linux-6.18') -> (ksm_root, proc_root), private copies."""

    def make(name: str) -> tuple[Path, Path]:
        root = tmp_path / name / "ksm"
        proc = tmp_path / name / "proc"
        shutil.copytree(FIXTURES / "sysfs" / name, root)
        shutil.copytree(FIXTURES / "proc", proc)
        return root, proc

    return make


@pytest.fixture
def fake_backend(fake_tree: Callable[[str], tuple[Path, Path]]) -> Callable[[str], SysfsBackend]:
    def make(name: str) -> SysfsBackend:
        root, proc = fake_tree(name)
        return SysfsBackend(root=root, proc=proc)

    return make


def snapshot(root: Path) -> dict[str, str]:
    """Every file's text, to prove a refused write changed nothing."""
    return {p.name: p.read_text() for p in sorted(root.iterdir()) if p.is_file()}
