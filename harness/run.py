"""The one subprocess chokepoint: argv lists only, never through a shell.

Everything that starts a process goes through here so that logging, environment and error
translation are uniform and a shell can be banned by review (and by a grep in the tests).
"""

from __future__ import annotations

import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

from harness.errors import CommandFailed

Argv = Sequence[str | Path]


def _argv(argv: Argv) -> list[str]:
    if isinstance(argv, str | bytes) or not argv:
        raise TypeError("argv must be a non-empty list of arguments, not a command string")
    return [str(a) for a in argv]


def run(
    argv: Argv,
    *,
    check: bool = True,
    timeout: float | None = None,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run argv to completion, capturing text output; raise CommandFailed on non-zero if check."""
    args = _argv(argv)
    try:
        proc = subprocess.run(
            args,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=cwd,
            env=dict(env) if env is not None else None,
            input=input,
            check=False,
        )
    except FileNotFoundError as exc:
        raise CommandFailed(f"{args[0]}: command not found", returncode=127) from exc
    except subprocess.TimeoutExpired as exc:
        raise CommandFailed(f"{args[0]}: timed out after {timeout} s", returncode=124) from exc
    if check and proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or [""])[-1]
        raise CommandFailed(
            f"{args[0]} exited {proc.returncode}: {last}",
            returncode=proc.returncode,
            stderr=proc.stderr,
        )
    return proc


def spawn(
    argv: Argv,
    *,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    stdin: int | IO[bytes] | None = subprocess.DEVNULL,
    stdout: int | IO[bytes] | None = subprocess.DEVNULL,
    stderr: int | IO[bytes] | None = subprocess.DEVNULL,
    new_session: bool = True,
) -> subprocess.Popen[bytes]:
    """Start a long-lived process (QEMU, prometheus, sshd, a workload child).

    new_session puts it in its own process group so teardown can signal the whole group and a
    Ctrl-C in the terminal reaches only the harness, which then tears down in order.
    """
    args = _argv(argv)
    try:
        return subprocess.Popen(
            args,
            cwd=cwd,
            env=dict(env) if env is not None else None,
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            start_new_session=new_session,
        )
    except FileNotFoundError as exc:
        raise CommandFailed(f"{args[0]}: command not found", returncode=127) from exc


PIPE = subprocess.PIPE
DEVNULL = subprocess.DEVNULL
STDOUT = subprocess.STDOUT
Popen = subprocess.Popen
TimeoutExpired = subprocess.TimeoutExpired
