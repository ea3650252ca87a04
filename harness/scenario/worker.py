"""The scenario worker: a child process holding one KSM-mergeable buffer.

Run as ``python -m harness.scenario.worker``; it speaks a line protocol, one request and one
reply line at a time, on stdin/stdout (a root worker) or on two FIFOs (a fork child):

    map <page_size> <huge|nohuge> <tok*count>...
                                     mmap + MADV_[NO]HUGEPAGE + write pages + MADV_MERGEABLE
                                     -> "ok <pid> <buffer address>"; a `huge` buffer starts
                                     on a 2 MiB boundary, so every whole 2 MiB block of it
                                     can be a transparent huge page
    write <token> <i>[,<i>...]       write that content into those pages -> "ok"
    madvise <advice> <first> <count> MADV_<advice> (mergeable, unmergeable, dontneed,
                                     hugepage, nohugepage) on pages [first, first+count)
                                     of the buffer -> "ok"
    fork <cmd_fifo> <reply_fifo>     fork(); the parent answers "ok <child pid>", the child
                                     opens the FIFOs and says "ok <pid>" there
    exit                             "ok", then _exit(0)
    ping                             "pong <pid>"

Errors answer "err <text>". EOF on the command channel (the runner died) exits. Only the stdlib
and harness.scenario.tokens are imported, so start-up stays fast and the interpreter's own
memory never becomes mergeable (only this buffer is madvised).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import signal
import sys

from harness.scenario import tokens as tk

_ADVICE = {
    "mergeable": mmap.MADV_MERGEABLE,
    "unmergeable": mmap.MADV_UNMERGEABLE,
    "dontneed": mmap.MADV_DONTNEED,
    "hugepage": 14,  # MADV_HUGEPAGE
    "nohugepage": 15,  # MADV_NOHUGEPAGE
}
HPAGE = 2 << 20  # a PMD-mapped transparent huge page on x86-64


class Buffer:
    """An anonymous private mapping at a known address (libc mmap, not the mmap module, so
    a huge buffer can be cut to start on a 2 MiB boundary whatever its length)."""

    def __init__(self, length: int, huge: bool) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = (
            ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
            ctypes.c_long,
        )  # fmt: skip
        libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
        libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        self.libc = libc
        span = length + (HPAGE if huge else 0)
        prot = mmap.PROT_READ | mmap.PROT_WRITE
        raw = libc.mmap(None, span, prot, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
        if raw in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), "mmap failed")
        start = raw
        if huge:
            start = (raw + HPAGE - 1) & ~(HPAGE - 1)
            for lo, hi in ((raw, start), (start + length, raw + span)):
                if hi > lo:
                    libc.munmap(lo, hi - lo)
        self.addr = start
        self.length = length
        self.view = memoryview((ctypes.c_char * length).from_address(start)).cast("B")

    def madvise(self, advice: int, offset: int, length: int) -> None:
        if self.libc.madvise(self.addr + offset, length, advice) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"madvise({advice}): {os.strerror(err)}")


class Channel:
    """Line I/O on raw fds (no Python buffering that a fork child could inherit)."""

    def __init__(self, rfd: int, wfd: int) -> None:
        self.rfd = rfd
        self.wfd = wfd
        self.buf = b""

    def readline(self) -> str | None:
        while b"\n" not in self.buf:
            chunk = os.read(self.rfd, 65536)
            if not chunk:
                return None
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line.decode()

    def send(self, text: str) -> None:
        data = (text + "\n").encode()
        while data:
            data = data[os.write(self.wfd, data) :]


class Worker:
    """State of one worker: its buffer and its command channel."""

    def __init__(self, channel: Channel) -> None:
        self.chan = channel
        self.buf: Buffer | None = None
        self.page_size = 4096

    def serve(self) -> None:
        while True:
            line = self.chan.readline()
            if line is None:
                os._exit(0)
            words = line.split()
            if not words:
                continue
            try:
                reply = self.handle(words[0], words[1:])
            except Exception as exc:  # reported to the runner, which raises WorkerError
                reply = f"err {type(exc).__name__}: {exc}".replace("\n", " ")
            if reply is not None:
                self.chan.send(reply)

    def handle(self, cmd: str, args: list[str]) -> str | None:
        if cmd == "ping":
            return f"pong {os.getpid()}"
        if cmd == "map":
            if args[1] not in ("huge", "nohuge"):
                raise ValueError(f"map: {args[1]!r} must be huge or nohuge")
            return self.map(int(args[0]), args[1] == "huge", tk.decode_runs(args[2:]))
        if cmd == "write":
            return self.write(tk.normalize(args[0]), [int(i) for i in args[1].split(",")])
        if cmd == "madvise":
            ps = self.page_size
            self.buffer().madvise(_ADVICE[args[0]], int(args[1]) * ps, int(args[2]) * ps)
            return "ok"
        if cmd == "fork":
            return self.fork(args[0], args[1])
        if cmd == "exit":
            self.chan.send("ok")
            os._exit(0)
        return f"err unknown command {cmd!r}"

    def buffer(self) -> Buffer:
        if self.buf is None:
            raise RuntimeError("no buffer yet: send map first")
        return self.buf

    def map(self, page_size: int, huge: bool, pages: list[str]) -> str:
        if self.buf is not None:
            raise RuntimeError("the buffer is already mapped")
        self.page_size = page_size
        buf = Buffer(page_size * len(pages), huge)
        # Before the first write: a huge buffer faults in whole 2 MiB THPs at first touch; a
        # nohuge one never gets a huge page (THP would delay merges, spec section 13).
        buf.madvise(_ADVICE["hugepage" if huge else "nohugepage"], 0, buf.length)
        cache: dict[str, bytes] = {}
        view = buf.view
        for i, token in enumerate(pages):
            data = cache.get(token)
            if data is None:
                data = cache[token] = tk.page_bytes(token, page_size)
            view[i * page_size : (i + 1) * page_size] = data
        buf.madvise(mmap.MADV_MERGEABLE, 0, buf.length)
        self.buf = buf
        return f"ok {os.getpid()} {buf.addr}"

    def write(self, token: str, indexes: list[int]) -> str:
        view = self.buffer().view
        data = tk.page_bytes(token, self.page_size)
        for i in indexes:
            view[i * self.page_size : (i + 1) * self.page_size] = data
        return "ok"

    def fork(self, cmd_fifo: str, reply_fifo: str) -> str | None:
        pid = os.fork()
        if pid:
            return f"ok {pid}"
        # Child: drop the parent's channel (stdin/stdout are the parent's pipes), take FIFOs.
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1):
            os.dup2(null, fd)
        os.close(null)
        if self.chan.rfd > 2:
            os.close(self.chan.rfd)
        if self.chan.wfd > 2 and self.chan.wfd != self.chan.rfd:
            os.close(self.chan.wfd)
        self.chan = Channel(os.open(cmd_fifo, os.O_RDONLY), os.open(reply_fifo, os.O_WRONLY))
        self.chan.send(f"ok {os.getpid()}")
        return None


def main() -> None:
    """Entry point: serve commands on stdin/stdout until exit or EOF."""
    # Fork children are reaped automatically, so an exited child never lingers as a zombie.
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    Worker(Channel(sys.stdin.fileno(), sys.stdout.fileno())).serve()


if __name__ == "__main__":
    main()
