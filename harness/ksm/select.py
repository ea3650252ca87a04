"""Choose a KSM backend once, by name: kernel, model, or auto (kernel if usable, else model)."""

from __future__ import annotations

import importlib
from pathlib import Path

from harness.errors import KsmUnavailable
from harness.ksm.backend import BackendBase
from harness.ksm.sysfs import KSM_ROOT, PROC_ROOT, SysfsBackend

BACKENDS = ("auto", "kernel", "model")


def open_model() -> BackendBase:
    try:
        module = importlib.import_module("harness.ksm.model")
    except ImportError as exc:
        raise KsmUnavailable(
            f"the KSM model backend is not available ({exc})",
            hint="install the ksm-model distribution (pip install -e kernel-model)",
        ) from None
    backend: BackendBase = module.ModelBackend()
    return backend


def open_backend(
    name: str = "auto", *, root: Path = KSM_ROOT, proc: Path = PROC_ROOT
) -> BackendBase:
    """Return the backend called `name`.

    auto picks the real kernel when its KSM is present and the model otherwise; the caller can
    tell which from `backend.source`. Reading needs no root, so a read-only kernel KSM is still
    the kernel (writes then fail with KsmPermissionDenied and its hint).
    """
    if name not in BACKENDS:
        raise KsmUnavailable(f"unknown backend {name!r}", hint="choose auto, kernel or model")
    if name == "model":
        return open_model()
    try:
        kernel = SysfsBackend(root=root, proc=proc)
    except KsmUnavailable:
        if name == "kernel":
            raise
        return open_model()
    return kernel
