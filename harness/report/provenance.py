"""What a run records so that a trend across nights can group and explain it.

    host, kernel_release          the group of a night (with the playbook)
    qemu, libvirt                 versions of the tools the guests ran on
    model_profile, model_version  which ksm_model behaviour the run compared against
    harness_revision              git commit of the checkout the harness ran from ("unknown"
                                  when it is not a checkout, e.g. an installed bundle)
    harness_dirty                 true when that checkout had uncommitted changes to tracked files
    playbook_digest               sha256 of the playbook file's bytes (of its parsed content,
                                  canonical JSON, when the playbook did not come from a file)

Every external fact is asked through harness.run (the one subprocess chokepoint) with a short
timeout; a missing tool is recorded as None and never fails the run.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from harness.errors import HarnessError
from harness.paths import source_root
from harness.run import run

UNKNOWN = "unknown"
# The checkout the harness runs from, if any (an installed wheel has none: revision unknown).
SOURCE_ROOT = source_root() or Path("/nonexistent")
_VERSION = re.compile(r"(\d+\.\d+(?:\.\d+)?)")
TIMEOUT = 10.0


def _first_line(argv: list[str]) -> str | None:
    try:
        proc = run(argv, check=False, timeout=TIMEOUT)
    except HarnessError:  # not installed, or hung
        return None
    if proc.returncode != 0:
        return None
    lines = (proc.stdout or proc.stderr).strip().splitlines()
    return lines[0].strip() if lines else None


def _version(line: str | None) -> str | None:
    m = _VERSION.search(line or "")
    return m.group(1) if m else None


def qemu_version() -> str | None:
    """'7.2.22' from `qemu-system-x86_64 --version` (None when QEMU is absent)."""
    return _version(_first_line(["qemu-system-x86_64", "--version"]))


def libvirt_version() -> str | None:
    """'9.0.0' from `libvirtd --version`, else `virsh --version`; None without libvirt."""
    for argv in (["libvirtd", "--version"], ["virsh", "--version"]):
        v = _version(_first_line(argv))
        if v:
            return v
    return None


def git_revision(root: Path = SOURCE_ROOT) -> tuple[str, bool | None]:
    """(commit, dirty) of the checkout at root; ("unknown", None) when it is not one."""
    if not (root / ".git").exists() or not (root / "pyproject.toml").exists():
        return UNKNOWN, None
    rev = _first_line(["git", "-C", str(root), "rev-parse", "HEAD"])
    if not rev or not re.fullmatch(r"[0-9a-f]{40,64}", rev):
        return UNKNOWN, None
    try:
        status = run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            check=False,
            timeout=TIMEOUT,
        )
    except HarnessError:
        return rev, None
    return rev, (bool(status.stdout.strip()) if status.returncode == 0 else None)


def playbook_digest(file: str | None, raw: Mapping[str, Any] | None = None) -> str:
    """'sha256:<hex>' of the playbook file's bytes, or of its parsed content without a file."""
    if file:
        try:
            data = Path(file).read_bytes()
        except OSError:
            pass
        else:
            return "sha256:" + hashlib.sha256(data).hexdigest()
    text = json.dumps(raw or {}, sort_keys=True, separators=(",", ":"), default=str)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def model_profile(name: str = "host") -> str | None:
    """The ksm_model profile `name` resolves to on this kernel ("host" -> "6.17" on 6.18)."""
    try:
        from ksm_model.profiles import resolve
    except ImportError:
        return None
    try:
        return resolve(name).name
    except ValueError:
        return None


def _dist_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def gather(playbook: Any, model: str | None = "host") -> dict[str, Any]:
    """The provenance of a run of `playbook` (anything with .file and .raw, e.g. a Playbook).

    `model` is the ksm_model profile name the run compares against (None: no model)."""
    revision, dirty = git_revision()
    return {
        "host": socket.gethostname(),
        "kernel_release": os.uname().release,
        "qemu": qemu_version(),
        "libvirt": libvirt_version(),
        "model_profile": model_profile(model) if model else None,
        "model_version": _dist_version("ksm-model"),
        "harness_version": _dist_version("ksm-harness"),
        "harness_revision": revision,
        "harness_dirty": dirty,
        "playbook_digest": playbook_digest(
            getattr(playbook, "file", None), getattr(playbook, "raw", None)
        ),
    }


def of_run(run: Mapping[str, Any]) -> dict[str, Any]:
    """A run.json's provenance; runs recorded before provenance existed get what their host
    facts say (hostname, kernel release, QEMU) and None for the rest."""
    recorded = run.get("provenance")
    if isinstance(recorded, Mapping):
        out = dict(recorded)
    else:
        facts = run.get("host") or {}
        out = {
            "host": facts.get("hostname"),
            "kernel_release": facts.get("kernel_release"),
            "qemu": _version(facts.get("qemu")),
            "libvirt": None,
            "model_profile": None,
            "model_version": None,
            "harness_version": None,
            "harness_revision": UNKNOWN,
            "harness_dirty": None,
            "playbook_digest": None,
        }
    # The profile the model really used, when the run had one (run.json "shadow").
    used = (run.get("shadow") or {}).get("profile")
    if used:
        out["model_profile"] = used
    return out
