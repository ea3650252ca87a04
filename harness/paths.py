"""Where the harness finds its own files, and where it keeps what it builds.

Its own files (the guest agent's C source, the guest's init script, the exporter's systemd
unit template) are package data, found through importlib.resources: they travel inside the
wheel, so an installed harness run from any directory finds them (data_path).

What it builds or learns goes to the cache directory (cache_dir): `KSM_HARNESS_CACHE` when set;
otherwise /var/cache/ksm-harness for root and $XDG_CACHE_HOME/ksm-harness (default
~/.cache/ksm-harness) for everyone else. It holds the guest images (guest-images/, see
harness.guests.image; KSM_HARNESS_IMAGE_DIR moves just those) and the accelerator probe's
verdicts (accel.json). Nothing in it is precious: removing it costs a rebuild.

Running guests keep their sockets, pid files, console logs and run.json in the runtime
directory (runtime_dir): `KSM_HARNESS_RUNTIME` when set; /run/ksm-harness for root; for other
users $XDG_RUNTIME_DIR/ksm-harness (the per-user tmpfs a login session has), else
/tmp/ksm-harness-UID. A non-root user's is created 0700 and must be theirs alone.

A few developer-facing things need the source checkout itself (the git revision a run records,
the README section the doctor generates): source_root() finds it, or says there is none (an
installed wheel).
"""

from __future__ import annotations

import importlib.resources
import os
import tempfile
from pathlib import Path

from harness.errors import HarnessError


def cache_dir() -> Path:
    """The cache directory (see the module docstring); not created here."""
    explicit = os.environ.get("KSM_HARNESS_CACHE")
    if explicit:
        return Path(explicit)
    if is_root():
        return Path("/var/cache/ksm-harness")
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ksm-harness"


def is_root() -> bool:
    """Whether we run as root: the host-wide state (KSM knobs, the host lock, run journals,
    /run/ksm-harness) is root's; everyone else gets per-user places and the model."""
    return os.geteuid() == 0


def runtime_dir() -> Path:
    """The runtime directory (see the module docstring); not created here."""
    explicit = os.environ.get("KSM_HARNESS_RUNTIME")
    if explicit:
        return Path(explicit)
    if is_root():
        return Path("/run/ksm-harness")
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isabs(xdg) and os.access(xdg, os.W_OK | os.X_OK):
        return Path(xdg) / "ksm-harness"
    return Path(tempfile.gettempdir()) / f"ksm-harness-{os.geteuid()}"


def data_path(package: str, name: str) -> Path:
    """A file shipped inside `package` (e.g. "harness.guests", "data/ksmh-agent.c").

    A filesystem path, because gcc and QEMU's tools need one: the harness is installed as
    files (a checkout, an editable install or a wheel), never run from a zip archive.
    """
    resource = importlib.resources.files(package).joinpath(name)
    if not isinstance(resource, Path):
        raise HarnessError(
            f"{package}/{name} is not a file on disk ({type(resource).__name__})",
            hint="install ksm-harness as files (pip install), not as a zip archive",
        )
    return resource


def source_root() -> Path | None:
    """The checkout the harness runs from (the directory holding harness/ and pyproject.toml),
    or None when it is installed (a wheel in site-packages has no checkout around it)."""
    import harness

    root = Path(harness.__file__).resolve().parent.parent
    return root if (root / "pyproject.toml").is_file() else None
