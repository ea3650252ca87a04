"""ksm_model.hostprobe on fake /proc, /sys and /boot trees (and once on this host)."""

from __future__ import annotations

import gzip
from pathlib import Path

from ksm_model import Kernel
from ksm_model.hostprobe import bracketed, config_hz, probe


def tree(tmp_path: Path, config_gz: str | None, boot_config: str | None) -> tuple[Path, ...]:
    proc, sys_root, boot = tmp_path / "proc", tmp_path / "sys", tmp_path / "boot"
    for d in (proc, sys_root / "kernel/mm/transparent_hugepage", boot):
        d.mkdir(parents=True)
    if config_gz is not None:
        (proc / "config.gz").write_bytes(gzip.compress(config_gz.encode()))
    if boot_config is not None:
        (boot / "config-6.18.0-test").write_text(boot_config)
    thp = sys_root / "kernel/mm/transparent_hugepage"
    (thp / "enabled").write_text("always [madvise] never\n")
    (thp / "use_zero_page").write_text("0\n")
    ksmd = proc / "37"
    ksmd.mkdir()
    (ksmd / "comm").write_text("ksmd\n")
    (ksmd / "schedstat").write_text("123456789 1000 12\n")
    return proc, sys_root, boot


def test_hz_from_config_gz_then_boot_then_default(tmp_path: Path) -> None:
    gz = "CONFIG_HZ_1000=y\nCONFIG_HZ=1000\nCONFIG_PT_RECLAIM=y\n"
    proc, sys_root, boot = tree(tmp_path, gz, "CONFIG_HZ=100\n")
    host = probe(proc, sys_root, boot, release="6.18.0-test")
    assert (host.hz, host.sources["config"]) == (1000, str(proc / "config.gz"))
    assert (host.thp, host.thp_use_zero_page, host.ksmd_runtime_ns) == ("madvise", False, 123456789)
    assert host.kernel_args() == {
        "hz": 1000, "thp": "madvise", "thp_use_zero_page": False, "pt_reclaim": True,
    }  # fmt: skip
    (proc / "config.gz").unlink()
    from_boot = probe(proc, sys_root, boot, release="6.18.0-test")
    assert (from_boot.hz, from_boot.pt_reclaim) == (100, False)
    assert probe(proc, sys_root, boot, release="other").hz == 250


def test_parsers() -> None:
    assert config_hz("# CONFIG_HZ_100 is not set\nCONFIG_HZ=300\n") == 300
    assert config_hz("CONFIG_HZ_250=y\n") is None
    assert bracketed("[always] madvise never") == "always"
    assert bracketed("garbage") is None


def test_this_host() -> None:
    host = probe()
    assert host.hz in (100, 250, 300, 1000)
    k = Kernel(profile="host", **host.kernel_args())
    assert (k.hz, k.thp_enabled) == (host.hz, host.thp)
