"""`ksmh run PLAYBOOK`, `ksmh report DIR`, `ksmh compare DIR_A DIR_B`."""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from harness.console import plural
from harness.errors import HarnessError
from harness.ksm.select import BACKENDS
from harness.ksm.sysfs import KSM_ROOT

DEFAULT_EXPORT = "127.0.0.1:9712"


def register(sub: Any) -> None:
    p = sub.add_parser(
        "run",
        help="run a playbook on real KSM and the model; write results/<run-id>/",
        description="Exit status: 0 every expectation held, 1 some failed (listed), 2 error.",
    )
    p.add_argument(
        "playbook", type=Path, help="a playbook YAML file, e.g. playbooks/quickstart.yaml"
    )
    p.add_argument(
        "--backend",
        choices=BACKENDS,
        default="auto",
        help="kernel: real KSM; model: the model alone; auto: kernel if present and writable "
        "(root), else the model",
    )
    p.add_argument(
        "--out", type=Path, default=Path("results"), help="results root (default results/)"
    )
    p.add_argument(
        "--export",
        default=None,
        metavar="HOST:PORT",
        help=f"serve kernel + model metrics while running (default {DEFAULT_EXPORT} if free; "
        "'off' for none)",
    )
    p.add_argument("--check", action="store_true", help="only validate the playbook")
    p.add_argument(
        "--push",
        default=None,
        metavar="URL",
        help="after the run, push its summary to this Prometheus Pushgateway (overrides the "
        "playbook's push:; 'off' for none); a failed push does not change the exit status",
    )
    p.add_argument(
        "--inventory",
        type=Path,
        default=None,
        help="run on every host of this inventory over SSH, in parallel (hosts prepared with "
        "`ksmh hosts prepare`); per-host results plus OUT/fleet-<id>/report.md. --export is "
        "then off unless given",
    )
    p.add_argument(
        "--known-hosts", type=Path, default=None, help="with --inventory: overrides its known_hosts"
    )
    p.add_argument(
        "--parallel", type=int, default=8, help="with --inventory: hosts run at once (default 8)"
    )
    p.add_argument("--sysfs-root", type=Path, default=KSM_ROOT, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("report", help="re-render plots and report.md of a results directory")
    p.add_argument("directory", type=Path)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser(
        "compare",
        help="show what changed between two results directories (or two kernel matrices)",
        description="Two run directories, or two `ksmh kernels check` outputs (a directory "
        "with matrix.json, or the file). Exit status 1: B's verdict is worse (for matrices: a "
        "kernel lost exact scenarios, has a new mismatch or an error, or is missing).",
    )
    p.add_argument("a", type=Path, metavar="DIR_A")
    p.add_argument("b", type=Path, metavar="DIR_B")
    p.add_argument(
        "--tolerance",
        type=float,
        default=0.0,
        help="hide counter changes up to this fraction (default 0: show every change)",
    )
    p.set_defaults(func=cmd_compare)


def cmd_run(args: argparse.Namespace) -> int:
    from harness.playbook.schema import load_playbook

    # Validate before importing the runner (numpy, the model, ...): a bad playbook fails fast.
    playbook = load_playbook(args.playbook)
    push = _push_url(args.push, playbook.push)
    if args.check:
        steps = sum(len(p.steps) for p in playbook.phases)
        phases = plural(len(playbook.phases), "phase")
        print(f"{args.playbook}: valid ({phases}, {plural(steps, 'step')})")
        return 0
    if args.inventory is not None:
        from harness.remote.run import cmd_run_fleet

        args.playbook_name = playbook.name
        args.push_url = push
        return cmd_run_fleet(args)
    from harness.monitoring.push import push_results
    from harness.playbook.runner import Runner, RunOptions

    export = args.export or DEFAULT_EXPORT
    opts = RunOptions(
        backend=args.backend,
        out=args.out,
        export=None if export == "off" else export,
        export_required=args.export not in (None, "off"),
        sysfs_root=args.sysfs_root,
    )
    runner = Runner(playbook, opts)
    try:
        outcome = runner.run()
    except KeyboardInterrupt as exc:
        # The verdict (error, exit 2) is in run.json already; say so and exit the same way.
        if push and runner.dir is not None:
            push_results(runner.dir, push)
        where = f"; results: {runner.dir}/report.md" if runner.dir is not None else ""
        print(f"ksmh: run interrupted ({exc or 'Ctrl-C'}): verdict error{where}", file=sys.stderr)
        return 2
    except HarnessError:
        if push and runner.dir is not None:  # the error verdict is a night too
            push_results(runner.dir, push)
        raise
    print(summary_line(outcome.passed, len(outcome.failed), outcome.skipped))
    for text in outcome.failed:
        print(f"  - failed: {text}")
    print(f"results: {outcome.directory}/report.md")
    if push:
        push_results(outcome.directory, push)
    return outcome.exit_status


def summary_line(passed: int, failed: int, skipped: int) -> str:
    """E.g. '4 expectations: 3 held, 1 skipped' (a skipped one is never reported as held)."""
    total = passed + failed + skipped
    if total == 0:
        return "no expectations in this playbook"
    parts = [f"{passed} held"]
    if failed:
        parts.append(f"{failed} failed")
    if skipped:
        parts.append(f"{skipped} skipped")
    noun = "expectation" if total == 1 else "expectations"
    return f"{total} {noun}: " + ", ".join(parts)


def _push_url(option: str | None, playbook: str | None) -> str | None:
    """--push wins over the playbook's push:; 'off' turns pushing off."""
    from harness.monitoring.push import check_url

    if option is not None:
        return None if option == "off" else check_url(option)
    return playbook


def cmd_report(args: argparse.Namespace) -> int:
    from harness.report.render import render
    from harness.report.results import read_results

    res = read_results(args.directory)
    with _malformed(args.directory):
        print(f"report: {render(args.directory, res)}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from harness.report.compare import compare, worse_verdict
    from harness.report.results import read_results

    if not math.isfinite(args.tolerance) or args.tolerance < 0:
        raise HarnessError(
            f"--tolerance {args.tolerance}: must be a fraction of 0 or more",
            hint="e.g. --tolerance 0.01 hides changes up to 1%",
        )
    from harness.kernels.report import compare_matrices, is_matrix, read_matrix

    if is_matrix(args.a) or is_matrix(args.b):
        # Two `ksmh kernels check` runs: exit 1 when B is worse (fewer exact, new mismatches).
        text, worse_matrix = compare_matrices(read_matrix(args.a), read_matrix(args.b))
        print(text, end="")
        return 1 if worse_matrix else 0
    a, b = read_results(args.a), read_results(args.b)
    with _malformed(f"{args.a} or {args.b}"):
        text = compare(a, b, args.tolerance)
        worse = worse_verdict(a, b)
    print(text, end="")
    if worse:
        va, vb = (r.run.get("verdict", {}).get("status") for r in (a, b))
        print(f"verdict got worse: {va} -> {vb}", file=sys.stderr)
    return 1 if worse else 0


@contextlib.contextmanager
def _malformed(where: object) -> Iterator[None]:
    """A run.json of the right outline but wrong insides (edited, or from another version)
    fails with one line, not a traceback from deep in the report code."""
    from harness.report.results import ResultsError

    try:
        yield
    except (KeyError, TypeError, AttributeError, ValueError, IndexError) as exc:
        raise ResultsError(
            f"{where}: run.json is not a ksmh run record this version can read "
            f"({type(exc).__name__}: {str(exc)[:120]})",
            hint="re-render only directories written by `ksmh run` of this version",
        ) from None
