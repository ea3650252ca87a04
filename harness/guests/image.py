"""Reproducible build of the busybox guest image, on demand.

Inputs: a Debian kernel package's /boot/vmlinuz-RELEASE and its modules (the distribution's
default guest kernel unless a release is asked for, see default_release), the static busybox
(Debian packages), and the C sources of the agent and the scenario worker and the init script
shipped inside this package (harness/guests/data/, read through importlib.resources, so an
installed wheel builds the same image as a checkout). Output in the cache directory
(harness.paths: guest-images/ under /var/cache/ksm-harness for root, ~/.cache/ksm-harness
otherwise; KSM_HARNESS_IMAGE_DIR moves it; another release than the default goes to
kernels/RELEASE/ under it): vmlinuz, its unpacked vmlinux when that boots by PVH (see
harness.guests.vmlinux: several times faster under TCG), initramfs.cpio.gz, ksmh-agent,
ksmh-worker and manifest.json (kernel release, sha256 of every input and artifact). The
initramfs is written by our own cpio (newc) writer with fixed owners, modes and mtimes, and
gzip with mtime 0, so the same inputs give the same bytes. A build is skipped when the
manifest's input digest matches and every artifact still has its recorded hash.

`python -m harness.guests.image [--out DIR] [--force] [--kernel RELEASE]` is what
`make -C guest-images` runs.
"""

from __future__ import annotations

import argparse
import fcntl
import gzip
import hashlib
import io
import json
import lzma
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from harness.errors import CommandFailed, HarnessError
from harness.guests.spec import GuestImage
from harness.guests.vmlinux import pvh_vmlinux
from harness.kinds import ImageKind
from harness.paths import cache_dir, data_path
from harness.run import run

FORMAT = 3
AGENT_SOURCE = data_path("harness.guests", "data/ksmh-agent.c")
# The differential scenario worker in C (harness/scenario/worker.py's protocol), which the
# agent starts for the kernel matrix (harness.kernels).
WORKER_SOURCE = data_path("harness.guests", "data/ksmh-worker.c")
BUSYBOX = Path("/bin/busybox")
# Where kernel packages are found: / (their /boot and /lib/modules), or a tree a package was
# unpacked into (dpkg-deb -x, then depmod -b) given as KSM_HARNESS_KERNEL_ROOT.
KERNEL_ROOT = Path(os.environ.get("KSM_HARNESS_KERNEL_ROOT") or "/")
BOOT = KERNEL_ROOT / "boot"
MODULES_ROOT = KERNEL_ROOT / "lib/modules"
DPKG_STATUS = Path("/var/lib/dpkg/status")
# The distribution's default kernel (a meta-package): which installed release guests boot
# when none is asked for, so installing another kernel package changes nothing by itself.
DEFAULT_KERNEL_PACKAGE = "linux-image-amd64"
# The guest needs these (and their dependencies, read from modules.dep) for the agent port.
WANTED_MODULES = ("virtio_pci", "virtio_console")
# virtio-mmio: the transport of QEMU's `microvm` machine (harness.guests.qemu_argv), which
# the qemu backend boots when the image has it; kernels without it keep the pc machine.
MMIO_MODULE = "virtio_mmio"

# The initramfs's /init (busybox sh), shipped with the package like the agent's source.
INIT_SCRIPT = data_path("harness.guests", "data/init").read_text()


def default_image_dir() -> Path:
    """Where images are built: KSM_HARNESS_IMAGE_DIR, else guest-images/ in the cache."""
    explicit = os.environ.get("KSM_HARNESS_IMAGE_DIR")
    return Path(explicit) if explicit else cache_dir() / "guest-images"


@dataclass(frozen=True)
class ImageInputs:
    """Where the build takes its inputs from (parameters so tests can use fake trees)."""

    boot: Path = BOOT
    modules_root: Path = MODULES_ROOT
    busybox: Path = BUSYBOX
    agent_source: Path = AGENT_SOURCE
    worker_source: Path = WORKER_SOURCE
    dpkg_status: Path = DPKG_STATUS


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _version_key(release: str) -> list[int | str]:
    return [int(p) if p.isdigit() else p for p in re.split(r"[.-]", release)]


def installed_kernels(boot: Path = BOOT, modules_root: Path = MODULES_ROOT) -> dict[str, Path]:
    """Release -> vmlinuz of every Debian amd64 kernel in `boot` with its modules installed."""
    found = {}
    for vmlinuz in boot.glob("vmlinuz-*-amd64"):
        release = vmlinuz.name.removeprefix("vmlinuz-")
        if (modules_root / release / "modules.dep").exists():
            found[release] = vmlinuz
    return dict(sorted(found.items(), key=lambda rv: _version_key(rv[0])))


def default_release(status: Path = DPKG_STATUS) -> str | None:
    """The release the default kernel meta-package (linux-image-amd64) depends on, from the
    dpkg status file (e.g. "6.1.0-57-amd64" on bookworm); None when it is not installed."""
    try:
        text = status.read_text(errors="replace")
    except OSError:
        return None
    for stanza in text.split("\n\n"):
        fields = dict(
            line.split(": ", 1) for line in stanza.splitlines() if ": " in line and line[0] != " "
        )
        if fields.get("Package") != DEFAULT_KERNEL_PACKAGE or "installed" not in fields.get(
            "Status", ""
        ):
            continue
        m = re.search(r"linux-image-(\S+-amd64)\b", fields.get("Depends", ""))
        return m.group(1) if m else None
    return None


def find_kernel(
    boot: Path = BOOT,
    modules_root: Path = MODULES_ROOT,
    release: str | None = None,
    status: Path = DPKG_STATUS,
) -> tuple[Path, str]:
    """The guest kernel: `release` when given; else the default meta-package's kernel when it
    is installed, else the newest Debian amd64 kernel in boot that has its modules."""
    found = installed_kernels(boot, modules_root)
    if not found:
        raise HarnessError(
            f"no guest kernel: no {boot}/vmlinuz-*-amd64 with modules in {modules_root}",
            hint="apt-get install linux-image-amd64",
        )
    if release is not None:
        if release not in found:
            raise HarnessError(
                f"no guest kernel {release!r} (installed: {', '.join(found)})",
                hint=f"apt-get install linux-image-{release}",
            )
        return found[release], release
    default = default_release(status)
    if default in found:
        return found[default], default
    release = list(found)[-1]
    return found[release], release


def _module_name(path: str) -> str:
    return Path(path).name.split(".ko")[0].replace("-", "_")


def module_load_order(modules_dep: str, wanted: Sequence[str], builtin: str = "") -> list[str]:
    """Module paths (relative, as in modules.dep) in an order insmod accepts: deps first.

    A wanted module listed in `builtin` (modules.builtin) is part of the kernel already
    (6.12's virtio_pci and virtio_console) and needs nothing.
    """
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    inside = {_module_name(line) for line in builtin.split()}
    for line in modules_dep.splitlines():
        if ":" not in line:
            continue
        mod, _, rest = line.partition(":")
        mod = mod.strip()
        deps[mod] = rest.split()
        by_name[_module_name(mod)] = mod
    order: list[str] = []

    def visit(mod: str, stack: tuple[str, ...]) -> None:
        if mod in order:
            return
        if mod in stack:
            raise HarnessError(f"dependency cycle in modules.dep at {mod}")
        # modules.dep lists dependencies so that the last one must be loaded first.
        for dep in reversed(deps.get(mod, [])):
            visit(dep, (*stack, mod))
        order.append(mod)

    for name in wanted:
        key = name.replace("-", "_")
        if key in inside and key not in by_name:
            continue
        if key not in by_name:
            raise HarnessError(f"kernel module {name} not in modules.dep")
        visit(by_name[key], ())
    return order


# -- a reproducible cpio (newc) writer ------------------------------------------------------------


class CpioWriter:
    """Writes a newc archive with owner root, mtime 0 and sequential inode numbers."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.ino = 0

    def _entry(
        self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
    ) -> None:
        self.ino += 1
        encoded = name.encode() + b"\0"
        fields = [self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0]
        header = b"070701" + b"".join(f"{v:08X}".encode() for v in fields)
        self.buf.write(header + encoded)
        self.buf.write(b"\0" * (-(len(header) + len(encoded)) % 4))
        self.buf.write(data)
        self.buf.write(b"\0" * (-len(data) % 4))

    def directory(self, name: str) -> None:
        self._entry(name, 0o040755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, 0o100000 | mode, data)

    def chardev(self, name: str, major: int, minor: int) -> None:
        self._entry(name, 0o020600, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self.buf.getvalue()


def _gzip(data: bytes) -> bytes:
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=6, mtime=0, filename="") as gz:
        gz.write(data)
    return out.getvalue()


# -- the build -------------------------------------------------------------------------------------


def describe_inputs(
    inputs: ImageInputs, modules: Sequence[str] = WANTED_MODULES, release: str | None = None
) -> dict[str, object]:
    """Everything the image depends on, with hashes; its digest decides whether to rebuild."""
    vmlinuz, release = find_kernel(inputs.boot, inputs.modules_root, release, inputs.dpkg_status)
    mod_dir = inputs.modules_root / release
    builtin_path = mod_dir / "modules.builtin"
    modules_dep = (mod_dir / "modules.dep").read_text()
    builtin = builtin_path.read_text() if builtin_path.exists() else ""
    mmio = f"/{MMIO_MODULE}.ko" in modules_dep + builtin
    order = module_load_order(modules_dep, (*modules, *([MMIO_MODULE] * mmio)), builtin)
    for path in (inputs.busybox, inputs.agent_source, inputs.worker_source):
        if not path.exists():
            raise HarnessError(
                f"guest image input missing: {path}", hint="apt-get install busybox-static"
            )
    gcc = shutil.which("gcc")
    return {
        "format": FORMAT,
        "kind": ImageKind.BUSYBOX.value,
        "kernel_release": release,
        "microvm": mmio,
        "kernel": {"path": str(vmlinuz), "sha256": sha256_file(vmlinuz)},
        "busybox": {"path": str(inputs.busybox), "sha256": sha256_file(inputs.busybox)},
        "agent_source": {
            "path": str(inputs.agent_source),
            "sha256": sha256_file(inputs.agent_source),
        },
        "worker_source": {
            "path": str(inputs.worker_source),
            "sha256": sha256_file(inputs.worker_source),
        },
        "gcc": {"path": gcc, "sha256": sha256_file(Path(gcc)) if gcc else None},
        "init_sha256": hashlib.sha256(INIT_SCRIPT.encode()).hexdigest(),
        "modules": [{"path": m, "sha256": sha256_file(mod_dir / m)} for m in order],
    }


def _digest(desc: dict[str, object]) -> str:
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()


def compile_agent(source: Path, out: Path) -> None:
    """gcc -static: the guest has no libc. -ffile-prefix-map keeps the binary path-independent.
    (The scenario worker, ksmh-worker.c, is compiled the same way.)"""
    try:
        run(
            [
                "gcc", "-static", "-O2", "-s", "-Wall",
                f"-ffile-prefix-map={source.parent}=.",
                "-o", str(out), str(source),
            ],
            timeout=300,
        )  # fmt: skip
    except CommandFailed as exc:
        raise HarnessError(
            f"compiling the guest {source.stem} failed: {exc.message}",
            hint="apt-get install gcc libc6-dev (static libc.a is needed)",
        ) from exc


def module_bytes(path: Path) -> bytes:
    """A module as insmod needs it: busybox insmod cannot read xz-compressed modules (Debian
    compresses them since 6.12), so .ko.xz is decompressed here."""
    data = path.read_bytes()
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if path.name.endswith(".ko.gz"):
        return gzip.decompress(data)
    if not path.name.endswith(".ko"):
        raise HarnessError(
            f"kernel module {path} is compressed in a way the image build cannot read",
            hint="xz, gzip and uncompressed modules are supported",
        )
    return data


def build_initramfs(
    desc: dict[str, object], agent: Path, modules_root: Path, worker: Path | None = None
) -> bytes:
    release = str(desc["kernel_release"])
    cpio = CpioWriter()
    for d in ("bin", "dev", "etc", "lib", "lib/modules", "proc", "sbin", "sys", "tmp"):
        cpio.directory(d)
    # The kernel opens /dev/console before init runs; devtmpfs is not mounted yet then.
    cpio.chardev("dev/console", 5, 1)
    cpio.file("init", INIT_SCRIPT.encode(), 0o755)
    cpio.file("bin/busybox", Path(str(desc["busybox"]["path"])).read_bytes(), 0o755)  # type: ignore[index]
    cpio.file("sbin/ksmh-agent", agent.read_bytes(), 0o755)
    if worker is not None:
        cpio.file("sbin/ksmh-worker", worker.read_bytes(), 0o755)
    names = []
    for mod in desc["modules"]:  # type: ignore[attr-defined]
        name = Path(mod["path"]).name.split(".ko")[0] + ".ko"
        names.append(name)
        cpio.file(f"lib/modules/{name}", module_bytes(modules_root / release / mod["path"]))
    cpio.file("etc/ksmh-modules", ("\n".join(names) + "\n").encode())
    return _gzip(cpio.finish())


@contextmanager
def _build_lock(out: Path) -> Iterator[None]:
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(out / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise HarnessError(
            f"cannot build the guest image in {out}: {exc.strerror}",
            hint="set KSM_HARNESS_CACHE (or XDG_CACHE_HOME, or KSM_HARNESS_IMAGE_DIR for the "
            "images alone) to a directory you can write",
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # concurrent tests and CLI calls build once
        yield
    finally:
        os.close(fd)


def _image_from_manifest(out: Path, manifest: dict[str, object]) -> GuestImage:
    artifacts = manifest.get("artifacts")
    pvh = isinstance(artifacts, dict) and "vmlinux" in artifacts
    inputs = manifest.get("inputs")
    return GuestImage(
        kernel=out / ("vmlinux" if pvh else "vmlinuz"),
        microvm=isinstance(inputs, dict) and inputs.get("microvm") is True,
        initrd=out / "initramfs.cpio.gz",
        kind=ImageKind.BUSYBOX,
        kernel_release=str(manifest["kernel_release"]),
        digest=str(manifest["input_digest"]),
    )


def _up_to_date(out: Path, digest: str) -> dict[str, object] | None:
    try:
        manifest: dict[str, object] = json.loads((out / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("input_digest") != digest:
        return None
    artifacts = manifest.get("artifacts")
    if not isinstance(artifacts, dict):
        return None
    for name, sha in artifacts.items():
        path = out / name
        if not path.exists() or sha256_file(path) != sha:
            return None
    return manifest


def image_dir_for(release: str | None, inputs: ImageInputs | None = None) -> Path:
    """Where the image of `release` lives: default_image_dir() for the default guest kernel,
    kernels/RELEASE/ under it for any other."""
    base = default_image_dir()
    if release is None:
        return base
    i = inputs or ImageInputs()
    _, default = find_kernel(i.boot, i.modules_root, None, i.dpkg_status)
    return base if release == default else base / "kernels" / release


def ensure_image(
    out: Path | None = None,
    inputs: ImageInputs | None = None,
    force: bool = False,
    release: str | None = None,
) -> GuestImage:
    """Build the busybox image of kernel `release` (default: the default guest kernel, see
    find_kernel) into `out` (default: image_dir_for(release)) unless current; return it."""
    inputs = inputs or ImageInputs()
    out = out or image_dir_for(release, inputs)
    desc = describe_inputs(inputs, release=release)
    digest = _digest(desc)
    with _build_lock(out):
        manifest = None if force else _up_to_date(out, digest)
        if manifest is not None:
            return _image_from_manifest(out, manifest)
        with tempfile.TemporaryDirectory(dir=out, prefix=".tmp-") as tmp_name:
            tmp = Path(tmp_name)
            compile_agent(inputs.agent_source, tmp / "ksmh-agent")
            compile_agent(inputs.worker_source, tmp / "ksmh-worker")
            (tmp / "initramfs.cpio.gz").write_bytes(
                build_initramfs(desc, tmp / "ksmh-agent", inputs.modules_root, tmp / "ksmh-worker")
            )
            shutil.copyfile(str(desc["kernel"]["path"]), tmp / "vmlinuz")  # type: ignore[index]
            names: tuple[str, ...] = ("vmlinuz", "initramfs.cpio.gz", "ksmh-agent", "ksmh-worker")
            vmlinux = pvh_vmlinux((tmp / "vmlinuz").read_bytes())
            if vmlinux is not None:  # boots several times faster under TCG (guests.vmlinux)
                (tmp / "vmlinux").write_bytes(vmlinux)
                names += ("vmlinux",)
            artifacts = {n: sha256_file(tmp / n) for n in names}
            for name in artifacts:
                os.replace(tmp / name, out / name)
        manifest = {
            "format": FORMAT,
            "kind": ImageKind.BUSYBOX.value,
            "kernel_release": desc["kernel_release"],
            "input_digest": digest,
            "inputs": desc,
            "artifacts": artifacts,
        }
        tmp_manifest = out / "manifest.json.tmp"
        tmp_manifest.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        os.replace(tmp_manifest, out / "manifest.json")
        return _image_from_manifest(out, manifest)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.guests.image")
    parser.add_argument("--out", type=Path, default=None, help=f"default: {default_image_dir()}")
    parser.add_argument("--force", action="store_true", help="rebuild even if current")
    parser.add_argument(
        "--kernel", metavar="RELEASE", default=None, help="an installed kernel, e.g. 6.1.0-57-amd64"
    )
    args = parser.parse_args(argv)
    try:
        args.out = args.out or image_dir_for(args.kernel)
        before = (
            (args.out / "manifest.json").read_bytes()
            if (args.out / "manifest.json").exists()
            else b""
        )
        image = ensure_image(args.out, force=args.force, release=args.kernel)
    except HarnessError as exc:
        print(f"guest image: error: {exc.message}", file=sys.stderr)
        if exc.hint:
            print(f"  hint: {exc.hint}", file=sys.stderr)
        return 2
    after = (args.out / "manifest.json").read_bytes()
    state = "up to date" if before == after else "built"
    print(f"guest image {state}: {image.kernel} {image.initrd} (kernel {image.kernel_release})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
