"""Guest image build: module order from modules.dep, the reproducible cpio, rebuild rules."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pytest

from harness.errors import HarnessError
from harness.guests.image import (
    AGENT_SOURCE,
    CpioWriter,
    ImageInputs,
    ensure_image,
    find_kernel,
    module_load_order,
)

MODULES_DEP = """\
kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio_pci_modern_dev.ko:
kernel/drivers/virtio/virtio_pci_legacy_dev.ko:
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_legacy_dev.ko \
kernel/drivers/virtio/virtio_pci_modern_dev.ko kernel/drivers/virtio/virtio.ko \
kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/char/virtio_console.ko: kernel/drivers/virtio/virtio.ko \
kernel/drivers/virtio/virtio_ring.ko
kernel/fs/fuse/virtiofs.ko: kernel/drivers/virtio/virtio.ko
"""


def test_module_order_loads_dependencies_first_once() -> None:
    order = [
        Path(m).name
        for m in module_load_order(
            MODULES_DEP.replace("\\\n", ""), ["virtio_pci", "virtio_console"]
        )
    ]
    assert order == [
        "virtio_ring.ko",
        "virtio.ko",
        "virtio_pci_modern_dev.ko",
        "virtio_pci_legacy_dev.ko",
        "virtio_pci.ko",
        "virtio_console.ko",
    ]


def test_builtin_modules_need_no_loading() -> None:
    # Debian's 6.12 kernel has virtio_pci and virtio_console built in, not in modules.dep.
    dep = "kernel/fs/fuse/virtiofs.ko.xz:\n"
    builtin = "kernel/drivers/virtio/virtio_pci.ko\nkernel/drivers/char/virtio_console.ko\n"
    assert module_load_order(dep, ["virtio_pci", "virtio_console"], builtin) == []
    only_pci = "kernel/drivers/virtio/virtio_pci.ko\n"
    order = module_load_order(MODULES_DEP.replace("\\\n", ""), ["virtio_pci", "virtio_console"],
                              only_pci)  # fmt: skip
    assert [Path(m).name for m in order] == ["virtio_ring.ko", "virtio.ko", "virtio_console.ko"]
    with pytest.raises(HarnessError, match=r"virtio_console not in modules\.dep"):
        module_load_order(dep, ["virtio_pci", "virtio_console"], only_pci)


def test_unknown_module_is_an_error() -> None:
    with pytest.raises(HarnessError, match=r"virtio_gpu not in modules\.dep"):
        module_load_order(MODULES_DEP, ["virtio_gpu"])


def parse_newc(data: bytes) -> list[tuple[str, int, int, bytes]]:
    """(name, mode, mtime, data) of every entry of a newc archive."""
    out, off = [], 0
    while True:
        assert data[off : off + 6] == b"070701"
        f = [int(data[off + 6 + 8 * i : off + 14 + 8 * i], 16) for i in range(13)]
        namesize, filesize = f[11], f[6]
        name = data[off + 110 : off + 110 + namesize - 1].decode()
        off += 110 + namesize
        off += -off % 4
        body = data[off : off + filesize]
        off += filesize
        off += -off % 4
        if name == "TRAILER!!!":
            return out
        out.append((name, f[1], f[5], body))


def test_cpio_writer_is_valid_newc_with_fixed_metadata() -> None:
    w = CpioWriter()
    w.directory("bin")
    w.file("bin/x", b"hello", 0o755)
    w.chardev("dev/console", 5, 1)
    entries = parse_newc(w.finish())
    assert [(n, oct(m), t, d) for n, m, t, d in entries] == [
        ("bin", "0o40755", 0, b""),
        ("bin/x", "0o100755", 0, b"hello"),
        ("dev/console", "0o20600", 0, b""),
    ]


def fake_inputs(root: Path) -> ImageInputs:
    boot = root / "boot"
    boot.mkdir()
    (boot / "vmlinuz-6.1.0-9-amd64").write_bytes(b"old kernel")
    (boot / "vmlinuz-6.1.0-10-amd64").write_bytes(b"new kernel")
    for rel in ("6.1.0-9-amd64", "6.1.0-10-amd64"):
        mods = root / "modules" / rel
        mods.mkdir(parents=True)
        (mods / "modules.dep").write_text(MODULES_DEP.replace("\\\n", ""))
        for line in MODULES_DEP.replace("\\\n", "").splitlines():
            path = mods / line.split(":")[0]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(f"module {path.name}".encode())
    busybox = root / "busybox"
    busybox.write_bytes(b"\x7fELF fake busybox")
    src = root / "agent.c"
    shutil.copy(AGENT_SOURCE, src)
    return ImageInputs(boot=boot, modules_root=root / "modules", busybox=busybox, agent_source=src)


def test_find_kernel_picks_newest_release_numerically(tmp_path: Path) -> None:
    inputs = fake_inputs(tmp_path)
    path, release = find_kernel(inputs.boot, inputs.modules_root)
    assert release == "6.1.0-10-amd64"
    assert path.read_bytes() == b"new kernel"


def test_no_kernel_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(HarnessError, match="no guest kernel") as exc:
        find_kernel(tmp_path, tmp_path)
    assert exc.value.hint == "apt-get install linux-image-amd64"


@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc needed to compile the agent")
def test_build_is_reproducible_and_skipped_when_inputs_unchanged(tmp_path: Path) -> None:
    inputs = fake_inputs(tmp_path)
    a = ensure_image(tmp_path / "a", inputs)
    b = ensure_image(tmp_path / "b", inputs)
    ma = json.loads((tmp_path / "a" / "manifest.json").read_text())
    mb = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert ma["artifacts"] == mb["artifacts"]
    assert ma["kernel_release"] == "6.1.0-10-amd64"
    assert a.digest == b.digest
    names = [n for n, *_ in parse_newc(gzip.decompress(a.initrd.read_bytes()))]
    assert names[-1] == "etc/ksmh-modules"
    assert {"init", "bin/busybox", "sbin/ksmh-agent", "lib/modules/virtio_pci.ko"} <= set(names)
    # Unchanged inputs: nothing is rewritten.
    stamp = a.initrd.stat().st_mtime_ns
    assert ensure_image(tmp_path / "a", inputs).digest == a.digest
    assert a.initrd.stat().st_mtime_ns == stamp
    # A changed input (the agent source) triggers a rebuild with a new digest.
    inputs.agent_source.write_text(inputs.agent_source.read_text() + "\n/* changed */\n")
    c = ensure_image(tmp_path / "a", inputs)
    assert c.digest != a.digest
    # A damaged artifact is rebuilt too.
    c.initrd.write_bytes(b"broken")
    d = ensure_image(tmp_path / "a", inputs)
    assert d.initrd.read_bytes() != b"broken"


def test_debian_manifest_package_versions_from_dpkg_status() -> None:
    from harness.guests.debian_image import _package_versions

    status = (
        "Package: zlib1g\nStatus: install ok\nVersion: 1:1.2.13\n\nPackage: bash\nVersion: 5.2\n"
    )
    assert _package_versions(status) == {"bash": "5.2", "zlib1g": "1:1.2.13"}


def test_debian_initramfs_modules_load_in_dependency_order() -> None:
    from harness.guests.debian_image import DEBIAN_MODULES

    dep = Path("/lib/modules")
    releases = sorted(dep.glob("*/modules.dep")) if dep.exists() else []
    if not releases or not any("ext4.ko" in p.read_text() for p in releases[:1]):
        pytest.skip("no Debian kernel modules installed here")
    order = [Path(m).name for m in module_load_order(releases[0].read_text(), DEBIAN_MODULES)]
    assert order.index("crc16.ko") < order.index("ext4.ko")
    assert order.index("jbd2.ko") < order.index("ext4.ko")
    assert order.index("virtio.ko") < order.index("virtio_blk.ko")
    assert order[-1] == "overlay.ko"
