"""The kernel files the doctor reads; every root is a parameter so tests use fake trees."""

from __future__ import annotations

from pathlib import Path

KSM_ROOT = Path("/sys/kernel/mm/ksm")
THP_ROOT = Path("/sys/kernel/mm/transparent_hugepage")
NODE_ROOT = Path("/sys/devices/system/node")
