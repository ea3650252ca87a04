"""Package data through importlib.resources; build outputs in the cache directory."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from harness import paths
from harness.errors import HarnessError
from harness.guests import image
from harness.guests.accel import default_cache_path
from harness.guests.debian_image import default_debian_dir


def test_cache_dir_order(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("KSM_HARNESS_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(paths.os, "geteuid", lambda: 0)
    assert paths.cache_dir() == Path("/var/cache/ksm-harness")
    monkeypatch.setattr(paths.os, "geteuid", lambda: 1000)
    assert paths.cache_dir() == tmp_path / "xdg" / "ksm-harness"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert paths.cache_dir() == tmp_path / "home" / ".cache" / "ksm-harness"
    monkeypatch.setenv("KSM_HARNESS_CACHE", str(tmp_path / "mine"))
    assert paths.cache_dir() == tmp_path / "mine"  # explicit wins, root or not


def test_images_and_accel_verdicts_live_in_the_cache(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("KSM_HARNESS_CACHE", str(tmp_path))
    monkeypatch.delenv("KSM_HARNESS_IMAGE_DIR", raising=False)
    assert image.default_image_dir() == tmp_path / "guest-images"
    assert default_debian_dir() == tmp_path / "guest-images" / "debian"
    assert default_cache_path() == tmp_path / "accel.json"
    monkeypatch.setenv("KSM_HARNESS_IMAGE_DIR", str(tmp_path / "elsewhere"))
    assert image.default_image_dir() == tmp_path / "elsewhere"


def test_package_data_is_found_inside_the_package() -> None:
    import harness

    pkg = Path(harness.__file__).parent
    assert pkg / "guests" / "data" / "ksmh-agent.c" == image.AGENT_SOURCE
    assert "org.ksmh.agent" in image.AGENT_SOURCE.read_text()
    # The init script is byte-identical to the one the image was built with before it moved
    # out of image.py, so only the recorded source path changes the input digest.
    digest = hashlib.sha256(image.INIT_SCRIPT.encode()).hexdigest()
    assert digest == "841468da53cf7cb76fbb82a2c7955e572cb488d71b44d1d8f1e269d8f42d04bc"
    unit = paths.data_path("harness.monitoring", "templates/ksmh-exporter.service")
    assert "@EXEC@" in unit.read_text()


def test_no_module_finds_files_relative_to_its_own_location() -> None:
    pkg = Path(paths.__file__).parent
    offenders = [
        str(p.relative_to(pkg))
        for p in pkg.rglob("*.py")
        if "__file__" in p.read_text() and ".parents[" in p.read_text()
    ]
    assert offenders == []


def test_runtime_dir_order(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("KSM_HARNESS_RUNTIME", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    monkeypatch.setattr(paths.tempfile, "tempdir", None)  # gettempdir() reads TMPDIR again
    monkeypatch.setattr(paths.os, "geteuid", lambda: 0)
    assert paths.runtime_dir() == Path("/run/ksm-harness")
    monkeypatch.setattr(paths.os, "geteuid", lambda: 1000)
    assert paths.runtime_dir() == tmp_path / "ksm-harness"  # the login session's tmpfs
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    (tmp_path / "tmp").mkdir()
    assert paths.runtime_dir() == tmp_path / "tmp" / "ksm-harness-1000"
    monkeypatch.setenv("XDG_RUNTIME_DIR", "relative/dir")  # not a usable runtime directory
    assert paths.runtime_dir() == tmp_path / "tmp" / "ksm-harness-1000"
    monkeypatch.setenv("KSM_HARNESS_RUNTIME", str(tmp_path / "mine"))
    assert paths.runtime_dir() == tmp_path / "mine"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make a directory another user's")
def test_a_runtime_root_planted_by_another_user_is_refused(tmp_path: Path) -> None:
    from harness.guests.backend import prepare_runtime_root

    planted = tmp_path / "ksm-harness-1000"
    planted.mkdir()
    os.chown(planted, 65534, 65534)
    with pytest.raises(HarnessError, match="belongs to uid 65534, not to root or us") as info:
        prepare_runtime_root(planted)
    assert info.value.hint == f"remove it (as root): rm -r {planted}"
    os.chown(planted, 0, 0)
    planted.chmod(0o777)
    with pytest.raises(HarnessError, match="is writable by other users"):
        prepare_runtime_root(planted)
    planted.chmod(0o755)
    assert prepare_runtime_root(planted / "fleet") == planted / "fleet"
