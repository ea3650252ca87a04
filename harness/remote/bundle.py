"""What `hosts prepare` ships: ksm-harness, ksm-model and their runtime dependencies, in a tarball.

Why a tarball of the installed tree and not `pip install` on the host: a fleet host may have
no route to PyPI (the loopback hosts of the tests have none), and the controller already has
exactly the pinned versions installed. So the bundle holds the two packages' sources plus the
installed files (with their .dist-info) of the runtime dependencies a fleet host needs.
Pure-Python dependencies are portable; a compiled one is shipped only when the host's
interpreter has the same ABI (SOABI) as ours, otherwise the host must provide it through its
system packages (the venv is made with --system-site-packages so those are visible).

The archive is deterministic (sorted names, zero mtimes/owners), so its SHA-256 identifies
the installed version and makes `prepare` idempotent.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.metadata as md
import io
import sysconfig
import tarfile
from dataclasses import dataclass
from pathlib import Path

import harness

# Runtime dependencies a fleet host needs (exporter, KSM backends, playbooks, libvirt, and
# numpy and xxhash for the runner's shadow capture). matplotlib (plots) and fabric/paramiko
# (SSH) stay on the controller: `ksmh run --inventory` renders the plots there after fetching
# the results.
SHIPPED_DISTRIBUTIONS = (
    "prometheus-client",
    "PyYAML",
    "libvirt-python",
    "numpy",
    "xxhash",  # page keys (harness.pagekey)
    # The playbook/inventory validation (harness.validation) and its dependencies.
    "pydantic",
    "pydantic-core",
    "annotated-types",
    "typing-inspection",
    "typing-extensions",
    "qemu.qmp",  # stopping guests (QMP quit)
    "rich",  # terminal output, and what it needs:
    "markdown-it-py",
    "mdurl",
    "Pygments",
)
# The Debian package that provides each one when it cannot be shipped (ABI mismatch).
SYSTEM_FALLBACK = {
    "prometheus-client": "python3-prometheus-client",
    "PyYAML": "python3-yaml",
    "libvirt-python": "python3-libvirt",
    "numpy": "python3-numpy",
    "xxhash": "python3-xxhash",
    # pydantic-core is the compiled one; Debian 13's python3-pydantic is v2 (Debian 12's is v1,
    # too old: such a host needs the controller's Python ABI).
    "pydantic": "python3-pydantic",
    "pydantic-core": "python3-pydantic-core",
    "annotated-types": "python3-annotated-types",
    "typing-inspection": "python3-typing-inspection",
    "typing-extensions": "python3-typing-extensions",
    "rich": "python3-rich",
    "markdown-it-py": "python3-markdown-it",
    "mdurl": "python3-mdurl",
    "Pygments": "python3-pygments",
}  # qemu.qmp is pure Python and always shipped (Debian has no package of it)


@dataclass(frozen=True)
class Bundle:
    """A built archive: its bytes, digest and what it contains."""

    data: bytes
    sha256: str
    distributions: tuple[str, ...]
    skipped: tuple[str, ...]  # compiled distributions left to the host's system packages


def local_soabi() -> str:
    return str(sysconfig.get_config_var("SOABI") or "")


def _package_files(package_dir: Path) -> list[tuple[str, Path]]:
    base = package_dir.parent
    out = []
    for p in sorted(package_dir.rglob("*")):
        if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".pyc", ".pyo"):
            out.append((p.relative_to(base).as_posix(), p))
    return out


def _distribution_files(name: str) -> tuple[list[tuple[str, Path]], bool]:
    """Installed files of a distribution (relative to site-packages) and whether it is compiled."""
    dist = md.distribution(name)
    out = []
    compiled = False
    for f in dist.files or ():
        rel = f.as_posix()
        if rel.startswith("..") or "__pycache__" in rel or rel.endswith(".pyc"):
            continue  # scripts outside site-packages and bytecode are not needed
        path = Path(str(dist.locate_file(f)))
        if not path.is_file():
            continue
        compiled = compiled or path.suffix == ".so"
        out.append((rel, path))
    return out, compiled


def _metadata(name: str, version: str, entry_points: str = "") -> list[tuple[str, bytes]]:
    info = f"{name.replace('-', '_')}-{version}.dist-info"
    files = [
        (f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode()),
        (f"{info}/INSTALLER", b"ksmh-hosts-prepare\n"),
    ]
    if entry_points:
        files.append((f"{info}/entry_points.txt", entry_points.encode()))
    return files


def _add(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    tar.addfile(info, io.BytesIO(data))


def build_bundle(remote_soabi: str) -> Bundle:
    """Build the archive for a host whose interpreter reports SOABI `remote_soabi`."""
    import ksm_model

    entries: dict[str, bytes] = {}
    for pkg in (Path(harness.__file__).parent, Path(ksm_model.__file__).parent):
        for rel, path in _package_files(pkg):
            entries[rel] = path.read_bytes()
    eps = "[console_scripts]\nksmh = harness.cli:main\n"
    entries.update(_metadata("ksm-harness", harness.__version__, eps))
    entries.update(_metadata("ksm-model", getattr(ksm_model, "__version__", "0.1.0")))
    shipped, skipped = [], []
    for name in SHIPPED_DISTRIBUTIONS:
        try:
            files, compiled = _distribution_files(name)
        except md.PackageNotFoundError:
            skipped.append(name)
            continue
        if compiled and remote_soabi != local_soabi():
            skipped.append(name)
            continue
        shipped.append(name)
        for rel, path in files:
            entries[rel] = path.read_bytes()
    raw = io.BytesIO()
    with (
        # Level 6: a third of level 9's time (numpy makes this ~70 MB) for 1% more bytes.
        gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, compresslevel=6) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        for name in sorted(entries):
            _add(tar, name, entries[name])
    data = raw.getvalue()
    return Bundle(data, hashlib.sha256(data).hexdigest(), tuple(shipped), tuple(skipped))
