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
kernel/drivers/virtio/virtio_mmio.ko: kernel/drivers/virtio/virtio.ko \
kernel/drivers/virtio/virtio_ring.ko
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


def test_builtin_modules_are_skipped() -> None:
    dep = MODULES_DEP.replace("\\\n", "")
    builtin = "kernel/drivers/virtio/virtio_pci.ko\nkernel/drivers/char/virtio_console.ko\n"
    # 6.12: both are built in, but their entries are gone from modules.dep too.
    only_builtin = "\n".join(
        line for line in dep.splitlines() if "virtio_pci.ko:" not in line and "console" not in line
    )
    assert module_load_order(only_builtin, ["virtio_pci", "virtio_console"], builtin) == []


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
    no_status = tmp_path / "no-dpkg-status"  # no default kernel package: the newest
    path, release = find_kernel(inputs.boot, inputs.modules_root, status=no_status)
    assert release == "6.1.0-10-amd64"
    assert path.read_bytes() == b"new kernel"


def test_the_default_kernel_package_wins_over_a_newer_release(tmp_path: Path) -> None:
    """Installing another kernel package (the kernel matrix does) must not change what the
    default guest boots: linux-image-amd64's dependency names the release."""
    inputs = fake_inputs(tmp_path)
    status = tmp_path / "status"
    other = "Package: linux-image-6.1.0-10-amd64\nStatus: install ok installed\n"
    meta = (
        "Package: linux-image-amd64\nStatus: install ok installed\n"
        "Depends: linux-image-6.1.0-9-amd64 (= 6.1.38-1)\n"
    )
    status.write_text(f"{other}\n{meta}")
    path, release = find_kernel(inputs.boot, inputs.modules_root, status=status)
    assert (release, path.read_bytes()) == ("6.1.0-9-amd64", b"old kernel")
    # Not installed (deinstall): the newest release again.
    status.write_text(meta.replace("install ok installed", "deinstall ok config-files"))
    assert find_kernel(inputs.boot, inputs.modules_root, status=status)[1] == "6.1.0-10-amd64"


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
    # virtio_mmio is in modules.dep: loaded last, and the image boots on microvm too.
    modules = dict((n, d) for n, _, _, d in parse_newc(gzip.decompress(a.initrd.read_bytes())))
    assert modules["etc/ksmh-modules"].decode().split()[-1] == "virtio_mmio.ko"
    assert a.microvm and ma["inputs"]["microvm"] is True
    assert a.kernel.name == "vmlinuz"  # "new kernel" is no bzImage: nothing to unpack
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


DPKG_STATUS = """\
Package: linux-image-6.12.117+deb12-amd64
Status: install ok installed
Version: 6.12.117-1~deb12u1

Package: linux-image-amd64
Status: install ok installed
Priority: optional
Version: 6.1.192-3
Depends: linux-image-6.1.0-9-amd64 (= 6.1.192-3)

Package: linux-image-6.12-amd64
Status: deinstall ok config-files
Depends: linux-image-6.12.117+deb12-amd64 (= 6.12.117-1~deb12u1)
"""


def test_default_kernel_is_the_meta_package_one_not_the_newest(tmp_path: Path) -> None:
    from harness.guests.image import default_release, installed_kernels

    inputs = fake_inputs(tmp_path)
    status = tmp_path / "status"
    status.write_text(DPKG_STATUS)
    assert default_release(status) == "6.1.0-9-amd64"
    assert list(installed_kernels(inputs.boot, inputs.modules_root)) == [
        "6.1.0-9-amd64",
        "6.1.0-10-amd64",
    ]
    path, release = find_kernel(inputs.boot, inputs.modules_root, status=status)
    assert (release, path.read_bytes()) == ("6.1.0-9-amd64", b"old kernel")
    # A release asked for by name, and one that is not installed.
    assert find_kernel(inputs.boot, inputs.modules_root, "6.1.0-10-amd64", status)[1] == (
        "6.1.0-10-amd64"
    )
    with pytest.raises(HarnessError, match=r"no guest kernel '6\.12\.1-amd64'") as exc:
        find_kernel(inputs.boot, inputs.modules_root, "6.12.1-amd64", status)
    assert exc.value.hint == "apt-get install linux-image-6.12.1-amd64"
    # Without the meta-package (or dpkg): the newest.
    assert default_release(tmp_path / "nothing") is None
    assert find_kernel(inputs.boot, inputs.modules_root, status=tmp_path / "x")[1] == (
        "6.1.0-10-amd64"
    )


@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc needed to compile the agent")
def test_xz_modules_are_decompressed_and_the_worker_is_in(tmp_path: Path) -> None:
    import lzma

    inputs = fake_inputs(tmp_path)
    for rel in ("6.1.0-9-amd64", "6.1.0-10-amd64"):
        mods = inputs.modules_root / rel
        con = mods / "kernel/drivers/char/virtio_console.ko"
        (mods / "kernel/drivers/char/virtio_console.ko.xz").write_bytes(
            lzma.compress(b"\x7fELF console module")
        )
        con.unlink()
        (mods / "modules.dep").write_text(
            (mods / "modules.dep")
            .read_text()
            .replace("virtio_console.ko:", "virtio_console.ko.xz:")
        )
    image = ensure_image(tmp_path / "out", inputs, release="6.1.0-9-amd64")
    assert image.kernel_release == "6.1.0-9-amd64"
    files = {n: d for n, _, _, d in parse_newc(gzip.decompress(image.initrd.read_bytes()))}
    assert files["lib/modules/virtio_console.ko"] == b"\x7fELF console module"
    assert files["etc/ksmh-modules"].decode().split()[-2:] == [
        "virtio_console.ko",
        "virtio_mmio.ko",
    ]
    assert files["sbin/ksmh-worker"][:4] == b"\x7fELF"
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert set(manifest["artifacts"]) == {
        "vmlinuz", "initramfs.cpio.gz", "ksmh-agent", "ksmh-worker",
    }  # fmt: skip
