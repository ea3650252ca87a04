"""A minimal process supervisor for hosts without systemd (runs on the fleet host).

    python -m harness.remote.supervise --pidfile P --log L -- COMMAND ARGS...
    python -m harness.remote.supervise --pidfile P --stop

Detaches from the SSH session (double fork, new session, stdio to the log), writes its own
pid to P under an exclusive lock (a second supervisor for the same pid file exits at once),
starts COMMAND, restarts it with a growing back-off when it dies, and on SIGTERM stops it
and removes P. The parent returns only once P is written and prints the daemon's pid, so
`hosts prepare` knows; --stop sends that SIGTERM and waits until the supervisor is gone.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import signal
import sys
import time
from pathlib import Path
from types import FrameType

from harness.run import spawn

STOP_GRACE = 5.0


def _log(log: Path, text: str) -> None:
    with log.open("a") as f:
        f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} supervise[{os.getpid()}]: {text}\n")


def _detach(pidfile: Path, wait: float = 10.0) -> bool:
    """Double-fork; True in the daemon, False in the original process after P appears."""
    first = os.fork()
    if first > 0:
        os.waitpid(first, 0)  # the intermediate child exits at once; reap it
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if pidfile.exists() and pidfile.read_text().strip():
                return False
            time.sleep(0.05)
        print(f"supervise: no pid file {pidfile} after {wait} s", file=sys.stderr)
        sys.exit(1)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    return True


def _redirect(log: Path) -> None:
    devnull = os.open(os.devnull, os.O_RDONLY)
    out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(devnull, 0)
    os.dup2(out, 1)
    os.dup2(out, 2)


def supervise(pidfile: Path, log: Path, argv: list[str]) -> int:
    """The daemon's loop; returns the exit status when told to stop."""
    fd = os.open(pidfile, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        _log(log, f"another supervisor holds {pidfile}; exiting")
        return 1
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    stopping = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    backoff = 1.0
    try:
        while not stopping:
            started = time.monotonic()
            child = spawn(argv, stdout=1, stderr=2, new_session=False)
            _log(log, f"started pid {child.pid}: {' '.join(argv)}")
            while child.poll() is None and not stopping:
                time.sleep(0.2)
            if stopping:
                child.terminate()
                try:
                    child.wait(STOP_GRACE)
                except Exception:  # any failure to stop: escalate to SIGKILL
                    child.kill()
                    child.wait()
                _log(log, f"stopped pid {child.pid}")
                break
            _log(log, f"pid {child.pid} exited {child.returncode}; restart in {backoff:g} s")
            if time.monotonic() - started > 60:
                backoff = 1.0  # it ran a good while: a fresh failure, start over
            deadline = time.monotonic() + backoff
            while time.monotonic() < deadline and not stopping:
                time.sleep(0.1)
            backoff = min(backoff * 2, 30.0)
    finally:
        pidfile.unlink(missing_ok=True)
        os.close(fd)
    return 0


def stop(pidfile: Path, timeout: float = 10.0) -> str:
    """SIGTERM the supervisor named by pidfile (it stops its child) and wait until it is gone."""
    try:
        pid = int(pidfile.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except (OSError, ValueError):
        return "not running"
    if "harness.remote.supervise" not in cmdline:
        return "not running"  # a stale pid file whose pid now belongs to something else
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}").exists():
        if time.monotonic() > deadline:
            raise SystemExit(f"supervise: pid {pid} did not stop in {timeout:g} s")
        time.sleep(0.05)
    return "stopped"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.remote.supervise")
    parser.add_argument("--pidfile", type=Path, required=True)
    parser.add_argument("--log", type=Path, default=None, help="required to start")
    parser.add_argument("--foreground", action="store_true", help="do not detach")
    parser.add_argument("--stop", action="store_true", help="stop the running supervisor")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.stop:
        print(stop(args.pidfile))
        return 0
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command or args.log is None:
        parser.error("--log and a command to supervise (after --) are required")
    args.pidfile.parent.mkdir(parents=True, exist_ok=True)
    args.log.parent.mkdir(parents=True, exist_ok=True)
    if not args.foreground:
        if not _locked(args.pidfile):
            args.pidfile.unlink(missing_ok=True)  # stale: its supervisor is gone
        if not _detach(args.pidfile):
            print(args.pidfile.read_text().strip())  # the daemon's pid, for the caller
            return 0
        _redirect(args.log)
    return supervise(args.pidfile, args.log, command)


def _locked(pidfile: Path) -> bool:
    """True when a live supervisor holds the pid file's lock."""
    try:
        fd = os.open(pidfile, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


if __name__ == "__main__":
    sys.exit(main())
