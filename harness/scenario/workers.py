"""Runner side of the worker protocol: start, command, fork and kill worker processes.

Root workers are started through harness.run.spawn with stdin/stdout pipes, each in its own
process group; fork children talk over two FIFOs in a private directory and stay in their
root's process group, so killing every group we created ends every worker we started.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

from harness.run import PIPE, Popen, TimeoutExpired, spawn
from harness.scenario import tokens as tk
from harness.scenario.errors import WorkerError

WORKER_MODULE = "harness.scenario.worker"


class WorkerHandle:
    """One worker process: send a request line, get its reply line."""

    def __init__(self, name: str, rfd: int, wfd: int, proc: Popen[bytes] | None) -> None:
        self.name = name
        self.rfd = rfd
        self.wfd = wfd
        self.proc = proc  # only for root workers; fork children are not our children
        self.pid = proc.pid if proc is not None else 0
        self.buf = b""
        self.addr = 0  # the buffer's address and length in bytes, once mapped
        self.length = 0

    def request(self, line: str, timeout: float) -> str:
        """Send one command and return the reply; an 'err' reply or silence raises."""
        data = (line + "\n").encode()
        try:
            while data:
                data = data[os.write(self.wfd, data) :]
        except OSError as exc:
            raise WorkerError(
                f"worker {self.name}: cannot send {line.split()[0]!r}: {exc}"
            ) from None
        reply = self.readline(timeout, line.split()[0])
        if reply.startswith("err"):
            raise WorkerError(f"worker {self.name}: {line.split()[0]} failed: {reply[4:]}")
        return reply

    def readline(self, timeout: float, what: str) -> str:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise WorkerError(
                    f"worker {self.name} (pid {self.pid}) gave no answer to {what!r} "
                    f"in {timeout:g} s",
                    hint="is the host overloaded? KernelRunner(worker_timeout=...) waits longer",
                )
            ready, _, _ = select.select([self.rfd], [], [], min(left, 0.05))
            if not ready:
                if not self.alive():
                    raise WorkerError(f"worker {self.name} (pid {self.pid}) died during {what!r}")
                continue
            chunk = os.read(self.rfd, 65536)
            if not chunk:
                raise WorkerError(f"worker {self.name} (pid {self.pid}) closed its channel")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line.decode()

    def alive(self) -> bool:
        """True while the process exists and is not a zombie (its mm not yet torn down)."""
        if self.proc is not None:
            return self.proc.poll() is None
        return process_alive(self.pid)

    def close(self) -> None:
        """Close our ends of the channel (the Popen pipe objects for a root worker)."""
        if self.proc is not None:
            for stream in (self.proc.stdin, self.proc.stdout):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()
            return
        for fd in {self.rfd, self.wfd}:
            with contextlib.suppress(OSError):
                os.close(fd)


def process_alive(pid: int, proc_root: Path = Path("/proc")) -> bool:
    """True if /proc/PID exists and is not a zombie or dead task."""
    try:
        stat = (proc_root / str(pid) / "stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    state = stat.rpartition(")")[2].split()[0]
    return state not in ("Z", "X", "x")


class WorkerPool:
    """Every worker of one scenario run; a context manager that always kills them all."""

    def __init__(
        self,
        *,
        python: str = sys.executable,
        page_size: int = 4096,
        timeout: float = 30.0,
        env: dict[str, str] | None = None,
    ) -> None:
        self.python = python
        self.page_size = page_size
        self.timeout = timeout
        self.env = env
        self.workers: dict[str, WorkerHandle] = {}
        self.groups: list[int] = []  # process groups we created (one per root worker)
        self.pids: list[int] = []
        self.dir = Path(tempfile.mkdtemp(prefix="ksmh-scenario-"))
        self.forks = 0

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.kill_all()

    def __getitem__(self, name: str) -> WorkerHandle:
        return self.workers[name]

    def live(self) -> list[WorkerHandle]:
        return list(self.workers.values())

    def start(
        self, name: str, pages: tuple[str, ...] | list[str], huge: bool = False
    ) -> WorkerHandle:
        """Start a root worker, fill its buffer and register it with KSM; returns when done.

        A `huge` buffer is MADV_HUGEPAGE and starts on a 2 MiB boundary; otherwise it is
        MADV_NOHUGEPAGE.
        """
        handle = self.spawn_worker(name)
        self._map(handle, pages, huge)
        return handle

    def spawn_worker(self, name: str) -> WorkerHandle:
        """Start a root worker that has no buffer yet (so it is not known to KSM)."""
        err = open(self.dir / f"{name}.stderr", "wb")  # noqa: SIM115 - closed right below
        try:
            proc = spawn(
                [self.python, "-m", WORKER_MODULE],
                stdin=PIPE,
                stdout=PIPE,
                stderr=err,
                env=self.env,
            )
        finally:
            err.close()
        self.groups.append(proc.pid)  # new_session: the pid is the process group id
        self.pids.append(proc.pid)
        assert proc.stdin is not None and proc.stdout is not None
        handle = WorkerHandle(name, proc.stdout.fileno(), proc.stdin.fileno(), proc)
        self.workers[name] = handle
        return handle

    def _map(self, handle: WorkerHandle, pages: tuple[str, ...] | list[str], huge: bool) -> None:
        runs = " ".join(tk.encode_runs(list(pages)))
        mode = "huge" if huge else "nohuge"
        try:
            reply = handle.request(f"map {self.page_size} {mode} {runs}", self.timeout)
        except WorkerError as exc:
            raise WorkerError(exc.message + self._stderr_tail(handle.name), exc.hint) from None
        _, pid, addr = reply.split()
        if int(pid) != handle.pid:
            raise WorkerError(f"worker {handle.name}: answered as pid {pid}, started {handle.pid}")
        handle.addr, handle.length = int(addr), len(pages) * self.page_size

    def fork(self, parent: str, child: str) -> WorkerHandle:
        """fork() worker `parent`; the child becomes worker `child` on its own FIFOs."""
        self.forks += 1
        cmd, reply = self.dir / f"fork{self.forks}.cmd", self.dir / f"fork{self.forks}.reply"
        os.mkfifo(cmd, 0o600)
        os.mkfifo(reply, 0o600)
        # O_RDWR never blocks on a FIFO, so neither side can hang waiting for the other.
        wfd = os.open(cmd, os.O_RDWR)
        rfd = os.open(reply, os.O_RDWR)
        handle = WorkerHandle(child, rfd, wfd, None)
        handle.addr, handle.length = self.workers[parent].addr, self.workers[parent].length
        answer = self.workers[parent].request(f"fork {cmd} {reply}", self.timeout)
        handle.pid = int(answer.split()[1])
        self.pids.append(handle.pid)
        self.workers[child] = handle
        hello = handle.readline(self.timeout, "fork")
        if hello != f"ok {handle.pid}":
            raise WorkerError(f"fork child {child}: unexpected greeting {hello!r}")
        return handle

    def exit(self, name: str) -> None:
        """Make the worker exit and wait until its mm is gone (process reaped or a zombie)."""
        handle = self.workers.pop(name)
        handle.request("exit", self.timeout)
        deadline = time.monotonic() + self.timeout
        if handle.proc is not None:
            handle.proc.wait(self.timeout)
        else:
            while process_alive(handle.pid):
                if time.monotonic() > deadline:
                    raise WorkerError(f"worker {name} (pid {handle.pid}) did not exit")
                time.sleep(0.001)
        handle.close()

    def kill_all(self) -> None:
        """SIGKILL every process group we created and reap our direct children."""
        for pgid in self.groups:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
        for handle in self.workers.values():
            if handle.proc is not None:
                with contextlib.suppress(TimeoutExpired):
                    handle.proc.wait(10)
            handle.close()
        deadline = time.monotonic() + 10
        while any(process_alive(p) for p in self.pids) and time.monotonic() < deadline:
            time.sleep(0.005)
        self.workers.clear()
        for path in self.dir.iterdir():
            path.unlink()
        self.dir.rmdir()

    def _stderr_tail(self, name: str) -> str:
        try:
            tail = (self.dir / f"{name}.stderr").read_text().strip().splitlines()[-3:]
        except OSError:
            return ""
        return ("; stderr: " + " | ".join(tail)) if tail else ""
