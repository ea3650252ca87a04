"""The realistic image kind: a minimal Debian rootfs (mmdebstrap) booted like the busybox one.

Built only when asked (`make -C guest-images debian`, or `python -m harness.guests.debian_image`):
mmdebstrap --variant=minbase with systemd-sysv, plus our agent as a systemd service, written into
an ext2 disk image (mke2fs -d) that every guest of a fleet boots read-only under a tmpfs
overlay. Kernel and initramfs are the busybox image's, with the block, ext4 and overlay
modules added; the initramfs init switches to the disk when `ksmh.root=` is on the command
line. Output in debian/ under the busybox image's directory (harness.guests.image.
default_image_dir) with a manifest (kernel release, the apt source,
the installed package versions, sha256 of every artifact). SOURCE_DATE_EPOCH, a fixed
filesystem UUID and hash seed, and E2FSPROGS_FAKE_TIME keep the build repeatable; the package
set itself follows the Debian archive, so it changes when Debian publishes updates.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from harness.errors import CommandFailed, HarnessError
from harness.guests.image import (
    WANTED_MODULES,
    ImageInputs,
    _build_lock,
    _digest,
    build_initramfs,
    compile_agent,
    default_image_dir,
    describe_inputs,
    sha256_file,
)
from harness.guests.spec import GuestImage
from harness.kinds import ImageKind
from harness.run import run

SUITE = "bookworm"
MIRROR = "deb http://deb.debian.org/debian bookworm main"
PACKAGES = ("systemd-sysv",)
SOURCE_DATE_EPOCH = "1700000000"
DISK_MIB = 512
FS_UUID = "6b736d68-0000-4000-8000-000000000001"
# ext4 asks the crypto API for crc32c when it mounts; without the module it refuses.
DEBIAN_MODULES = (*WANTED_MODULES, "virtio_blk", "crc32c_generic", "ext4", "overlay")
ROOT_CMDLINE = ("ksmh.root=/dev/vda",)

AGENT_UNIT = """[Unit]
Description=ksm-harness guest agent (virtio-serial port org.ksmh.agent)

[Service]
ExecStart=/usr/local/sbin/ksmh-agent
Restart=always
RestartSec=1

[Install]
WantedBy=multi-user.target
"""


def default_debian_dir() -> Path:
    return default_image_dir() / ImageKind.DEBIAN.value


def _need(tool: str, package: str) -> None:
    if shutil.which(tool) is None:
        raise HarnessError(
            f"{tool} not found: the Debian image kind needs it",
            hint=f"apt-get install {package}",
        )


def _customise(root: Path, agent: Path) -> None:
    """Put the agent in as an enabled service and make the rootfs fit a fleet guest."""
    sbin = root / "usr/local/sbin"
    sbin.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(agent, sbin / "ksmh-agent")
    os.chmod(sbin / "ksmh-agent", 0o755)
    unit = root / "etc/systemd/system/ksmh-agent.service"
    unit.write_text(AGENT_UNIT)
    wants = root / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    link = wants / "ksmh-agent.service"
    if not link.is_symlink():
        link.symlink_to("/etc/systemd/system/ksmh-agent.service")
    (root / "etc/hostname").write_text("ksmh-guest\n")
    # Every guest boots the same read-only disk; an empty machine-id lets systemd make one in
    # the tmpfs overlay at boot, as on a first boot.
    (root / "etc/machine-id").write_text("")
    # Clamp every timestamp to SOURCE_DATE_EPOCH (what mmdebstrap did for its own files), so
    # our additions do not make the disk image depend on the time of the build.
    epoch = int(SOURCE_DATE_EPOCH)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in (*dirnames, *filenames):
            path = os.path.join(dirpath, name)
            if os.lstat(path).st_mtime > epoch:
                os.utime(path, (epoch, epoch), follow_symlinks=False)
    os.utime(root, (epoch, epoch))


def ensure_debian_image(
    out: Path | None = None, inputs: ImageInputs | None = None, force: bool = False
) -> GuestImage:
    """Build the Debian image into `out` unless its inputs are unchanged; return it."""
    out = out or default_debian_dir()
    _need("mmdebstrap", "mmdebstrap")
    _need("mke2fs", "e2fsprogs")
    inputs = inputs or ImageInputs()
    desc = describe_inputs(inputs, DEBIAN_MODULES)
    desc.update(
        kind=ImageKind.DEBIAN.value,
        suite=SUITE,
        mirror=MIRROR,
        packages=list(PACKAGES),
        source_date_epoch=SOURCE_DATE_EPOCH,
        disk_mib=DISK_MIB,
        unit_sha256=hashlib.sha256(AGENT_UNIT.encode()).hexdigest(),
    )
    digest = _digest(desc)
    env = {**os.environ, "SOURCE_DATE_EPOCH": SOURCE_DATE_EPOCH}
    with _build_lock(out):
        manifest_path = out / "manifest.json"
        if not force and manifest_path.exists():
            manifest = json.loads(manifest_path.read_text())
            arts = manifest.get("artifacts", {})
            if manifest.get("input_digest") == digest and all(
                (out / n).exists() for n in arts
            ):  # the disk is 512 MiB: trust sizes+digest here, not a full re-hash per boot
                return _image(out, manifest)
        with tempfile.TemporaryDirectory(dir=out, prefix=".tmp-") as tmp_name:
            tmp = Path(tmp_name)
            compile_agent(inputs.agent_source, tmp / "ksmh-agent")
            tar = tmp / "rootfs.tar"
            try:
                run(
                    ["mmdebstrap", "--variant=minbase", "--include=" + ",".join(PACKAGES),
                     "--format=tar", SUITE, str(tar), MIRROR],
                    env=env, timeout=1800,
                )  # fmt: skip
            except CommandFailed as exc:
                raise HarnessError(
                    f"mmdebstrap failed: {exc.message}",
                    hint="it needs the Debian archive (deb.debian.org) reachable",
                ) from exc
            root = tmp / "root"
            root.mkdir()
            run(["tar", "-C", str(root), "-xpf", str(tar)], timeout=600)
            packages = (root / "var/lib/dpkg/status").read_text()
            versions = _package_versions(packages)
            _customise(root, tmp / "ksmh-agent")
            disk = tmp / "disk.img"
            run(
                ["mke2fs", "-q", "-F", "-t", "ext2", "-L", "ksmh-debian", "-U", FS_UUID,
                 "-E", f"hash_seed={FS_UUID},root_owner=0:0", "-d", str(root), str(disk),
                 f"{DISK_MIB}M"],
                env={**env, "E2FSPROGS_FAKE_TIME": SOURCE_DATE_EPOCH}, timeout=600,
            )  # fmt: skip
            _fix_times(disk)
            (tmp / "initramfs.cpio.gz").write_bytes(
                build_initramfs(desc, tmp / "ksmh-agent", inputs.modules_root)
            )
            shutil.copyfile(str(desc["kernel"]["path"]), tmp / "vmlinuz")  # type: ignore[index]
            names = ("vmlinuz", "initramfs.cpio.gz", "disk.img")
            artifacts = {n: sha256_file(tmp / n) for n in names}
            for name in names:
                os.replace(tmp / name, out / name)
        manifest = {
            "format": 1,
            "kind": ImageKind.DEBIAN.value,
            "kernel_release": desc["kernel_release"],
            "input_digest": digest,
            "inputs": desc,
            "package_versions": versions,
            "artifacts": artifacts,
        }
        tmp_manifest = out / "manifest.json.tmp"
        tmp_manifest.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        os.replace(tmp_manifest, manifest_path)
        return _image(out, manifest)


def _fix_times(disk: Path) -> None:
    """Set every inode's ctime and atime to SOURCE_DATE_EPOCH (mke2fs -d copies the build's).

    mke2fs -d allocates inodes in sequence on a fresh filesystem, so the used ones are the
    root (2) and 11 .. used count; the reserved inodes 1 and 3-10 are left alone.
    """
    header = run(["dumpe2fs", "-h", str(disk)], timeout=60).stdout
    fields = dict(
        (k.strip(), v.strip()) for k, _, v in (ln.partition(":") for ln in header.splitlines())
    )
    used = int(fields["Inode count"]) - int(fields["Free inodes"])
    script = "".join(
        f"sif <{ino}> {field} @{SOURCE_DATE_EPOCH}\n"
        for ino in (2, *range(11, used + 1))
        for field in ("ctime", "atime")  # atime: mke2fs's own reads touched the sources
    )
    cmds = disk.with_suffix(".debugfs")
    cmds.write_text(script)
    try:
        run(["debugfs", "-w", "-f", str(cmds), str(disk)], timeout=600)
    finally:
        cmds.unlink()


def _package_versions(status: str) -> dict[str, str]:
    versions: dict[str, str] = {}
    name = ""
    for line in status.splitlines():
        if line.startswith("Package: "):
            name = line.split(": ", 1)[1]
        elif line.startswith("Version: ") and name:
            versions[name] = line.split(": ", 1)[1]
    return dict(sorted(versions.items()))


def _image(out: Path, manifest: dict[str, object]) -> GuestImage:
    return GuestImage(
        kernel=out / "vmlinuz",
        initrd=out / "initramfs.cpio.gz",
        kind=ImageKind.DEBIAN,
        kernel_release=str(manifest["kernel_release"]),
        digest=str(manifest["input_digest"]),
        disk=out / "disk.img",
        cmdline=ROOT_CMDLINE,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.guests.debian_image")
    parser.add_argument("--out", type=Path, default=None, help=f"default: {default_debian_dir()}")
    parser.add_argument("--force", action="store_true", help="rebuild even if current")
    args = parser.parse_args(argv)
    try:
        image = ensure_debian_image(args.out or default_debian_dir(), force=args.force)
    except HarnessError as exc:
        print(f"debian image: error: {exc.message}", file=sys.stderr)
        if exc.hint:
            print(f"  hint: {exc.hint}", file=sys.stderr)
        return 2
    print(f"debian image ready: {image.disk} (kernel {image.kernel_release})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
