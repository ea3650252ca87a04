"""`ksmh kernels check|list`: the kernel matrix (harness.kernels.matrix)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from harness.errors import HarnessError


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def register(sub: Any) -> None:
    p = sub.add_parser("kernels", help="check the model against real kernels booted as guests")
    ks = p.add_subparsers(dest="kernels_command", metavar="SUBCOMMAND")
    ks.required = True
    c = ks.add_parser(
        "check",
        help="the worked examples + N random scenarios on each kernel and on its model",
        description="Writes DIR/matrix.json and DIR/matrix.md. Exit status: 0 every scenario "
        "exact on every kernel, 1 some mismatch or a kernel that could not be checked, 2 error.",
    )
    c.add_argument(
        "--kernel",
        action="append",
        default=[],
        metavar="RELEASE",
        help="an installed guest kernel (e.g. 6.1.0-57-amd64, or a prefix such as 6.12) or "
        "`host`; repeatable (default: every installed guest kernel, then the host)",
    )
    c.add_argument("--seeds", type=_count, default=30, help="random scenarios per kernel (30)")
    c.add_argument("--seed-start", type=_count, default=0, help="first seed (0)")
    c.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output directory (default results/kernels-YYYYmmdd-HHMMSS)",
    )
    c.set_defaults(func=cmd_check)
    lst = ks.add_parser("list", help="installed guest kernels and the profile each release maps to")
    lst.set_defaults(func=cmd_list)


def cmd_check(args: argparse.Namespace) -> int:
    from harness.kernels.matrix import resolve_kernels, run_matrix

    kernels = resolve_kernels(args.kernel)
    out = args.out or Path("results") / time.strftime("kernels-%Y%m%d-%H%M%S")
    if out.exists() and not out.is_dir():
        raise HarnessError(f"--out {out}: exists and is not a directory")
    rows = run_matrix(kernels, args.seeds, out, args.seed_start)
    for r in rows:
        state = "ERROR" if r.error else f"{r.exact}/{r.scenarios} exact"
        print(f"{r.release:28} {r.where:6} {r.profile:22} {state:16} {r.seconds:6.0f} s")
    print(f"matrix: {out / 'matrix.json'} {out / 'matrix.md'}")
    return 0 if rows and all(r.ok for r in rows) else 1


def cmd_list(args: argparse.Namespace) -> int:
    import os

    from ksm_model.profiles import for_release

    from harness.guests.image import installed_kernels

    print(f"{'host':28} {os.uname().release:28} {for_release(os.uname().release).name}")
    for release in installed_kernels():
        print(f"{'guest':28} {release:28} {for_release(release).name}")
    return 0
