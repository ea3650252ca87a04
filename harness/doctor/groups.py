"""Labels on processes and guests, for grouping the sharing matrix (e.g. by tenant).

    --label TARGETS:KEY=VALUE    e.g. --label 0-1:tenant=acme --label 2,3:tenant=globex
    --group-by KEY               one row/column per value of KEY instead of per process

TARGETS is a comma list of numbers, ranges (`0-3`) and names. Numbers are guest indexes when
the doctor examines a fleet (`--guests RUN_ID`) and PIDs otherwise; names are guest names (or
the process names the doctor prints). Label names follow the inventory's rules
(harness.remote.inventory: Prometheus label names, not the reserved ones), so a tenant label
of an inventory can be used as it is.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from harness import procfs
from harness.errors import HarnessError
from harness.remote.inventory import label_name_problem

HINT = "e.g. --label 0-1:tenant=acme (guest indexes or PIDs, then KEY=VALUE)"
MAX_RANGE = 1 << 22  # larger than any pid_max: a range beyond it is a typo
# Executables of virtual machine monitors: `ksmh doctor --all` examines them even when they
# registered nothing with KSM (the classic "the VMM never called MADV_MERGEABLE").
VMMS = ("qemu-system-", "qemu-kvm", "crosvm", "firecracker", "cloud-hypervisor")


@dataclass(frozen=True)
class Label:
    numbers: frozenset[int]
    names: frozenset[str]
    key: str
    value: str


def parse_label(text: str) -> Label:
    """'0-1,web:tenant=acme' -> Label; HarnessError naming what is wrong."""
    targets, sep, assignment = text.rpartition(":")
    key, eq, value = assignment.partition("=")
    if not sep or not targets or not eq or not key or not value:
        raise HarnessError(f"--label {text!r}: expected TARGETS:KEY=VALUE", hint=HINT)
    problem = label_name_problem(key)
    if problem is not None:
        raise HarnessError(f"--label {text!r}: label {key!r}: {problem}", hint=HINT)
    numbers: set[int] = set()
    names: set[str] = set()
    for part in targets.split(","):
        part = part.strip()
        lo, dash, hi = part.partition("-")
        if lo.isdigit() and (not dash or hi.isdigit()):
            a, b = int(lo), int(hi) if dash else int(lo)
            if b < a or b - a > MAX_RANGE or b > MAX_RANGE:
                raise HarnessError(f"--label {text!r}: bad range {part!r}", hint=HINT)
            numbers.update(range(a, b + 1))
        elif part:
            names.add(part)
        else:
            raise HarnessError(f"--label {text!r}: empty target", hint=HINT)
    return Label(frozenset(numbers), frozenset(names), key, value)


def group_names(
    processes: Mapping[int, str],
    labels: Sequence[Label],
    group_by: str | None,
    index_of: Mapping[int, int] | None = None,
) -> dict[int, str]:
    """pid -> group: the value of label `group_by`, or the process's own name.

    processes maps pid -> name; index_of maps pid -> guest index (numbers then mean guest
    indexes, not PIDs).
    """
    if group_by is not None:
        problem = label_name_problem(group_by)
        if problem is not None:
            raise HarnessError(f"--group-by {group_by!r}: {problem}", hint=HINT)
        if not any(lb.key == group_by for lb in labels):
            raise HarnessError(f"--group-by {group_by!r}: no --label gives {group_by}", hint=HINT)
    out: dict[int, str] = {}
    for pid, name in processes.items():
        number = index_of.get(pid) if index_of is not None else pid
        group = name
        for lb in labels:
            if lb.key == group_by and (number in lb.numbers or name in lb.names):
                group = lb.value
        out[pid] = group
    return out


def process_name(pid: int, proc: Path) -> str:
    """The guest name of a QEMU (`-name guest=NAME`), else comm-pid."""
    from harness.guests.qemu_backend import guest_name_of

    try:
        argv = [a.decode(errors="replace") for a in (proc / str(pid) / "cmdline").read_bytes()
                .split(b"\0") if a]  # fmt: skip
    except OSError:
        argv = []
    return guest_name_of(argv) or f"{procfs.comm(pid, proc) or '?'}-{pid}"


def is_vmm(pid: int, proc: Path) -> bool:
    exe = procfs.cmdline(pid, proc).split(" ", 1)[0]
    return Path(exe).name.startswith(VMMS)
