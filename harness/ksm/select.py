"""Choose a KSM backend once: kernel, model, or auto. The CLI, the runner and the plugin all
call this, so "auto" means one thing everywhere:

- kernel: the running kernel's KSM; KsmUnavailable when it has none, or (need_write) when this
  process may not write it;
- model: ksm_model;
- auto: the kernel when it has KSM (and, with need_write, when we may write it), else the
  model, with the reason for falling back in BackendChoice.fallback.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.errors import KsmUnavailable
from harness.kinds import BackendKind, choices
from harness.ksm.backend import BackendBase
from harness.ksm.sysfs import KSM_ROOT, PROC_ROOT, SysfsBackend

BACKENDS = choices(BackendKind)


def open_model(**options: Any) -> BackendBase:
    """A fresh model backend (options go to ModelBackend: profile, ...)."""
    try:
        from harness.ksm.model import ModelBackend
    except ImportError as exc:
        raise KsmUnavailable(
            f"the KSM model backend is not available ({exc})",
            hint="install the ksm-model distribution (pip install -e kernel-model)",
        ) from None
    return ModelBackend(**options)


@dataclass(frozen=True)
class BackendChoice:
    backend: BackendBase
    fallback: str | None = None  # why auto took the model; None when nothing fell back


def _kernel_problem(root: Path, need_write: bool) -> str | None:
    if not (root / "run").exists():
        return f"no KSM at {root} (kernel built without CONFIG_KSM?)"
    if need_write and not os.access(root / "run", os.W_OK):
        who = "not root" if os.geteuid() != 0 else "read-only sysfs"
        return f"real KSM at {root} is not writable ({who})"
    return None


def choose_backend(
    kind: str = BackendKind.AUTO,
    *,
    need_write: bool = False,
    root: Path = KSM_ROOT,
    proc: Path = PROC_ROOT,
    model_options: dict[str, Any] | None = None,
) -> BackendChoice:
    """The backend called `kind`, with the reason when auto fell back to the model."""
    try:
        kind = BackendKind(kind)
    except ValueError:
        raise KsmUnavailable(
            f"unknown backend {kind!r}", hint=f"choose one of {', '.join(BACKENDS)}"
        ) from None
    if kind is BackendKind.MODEL:
        return BackendChoice(open_model(**(model_options or {})))
    problem = _kernel_problem(root, need_write)
    if problem is None:
        return BackendChoice(SysfsBackend(root=root, proc=proc))
    if kind is BackendKind.KERNEL:
        raise KsmUnavailable(
            problem,
            hint="run as root" if "not root" in problem else "use --backend model to predict",
        )
    return BackendChoice(open_model(**(model_options or {})), fallback=problem)


def open_backend(
    kind: str = BackendKind.AUTO,
    *,
    need_write: bool = False,
    root: Path = KSM_ROOT,
    proc: Path = PROC_ROOT,
) -> BackendBase:
    """choose_backend(...).backend; see the module docstring for what each kind means."""
    return choose_backend(kind, need_write=need_write, root=root, proc=proc).backend
