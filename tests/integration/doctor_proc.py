"""A real process for the doctor's tests: one buffer in the shape a test asks for.

    python doctor_proc.py [--pages N] [--fill byte:V|index:SEED|random] [--shared]
                          [--mergeable] [--thp on|off] [--volatile] [--uring]
    python doctor_proc.py --tune FILE=V1,V2,... [--period S]

It prints "ready PID" once the buffer is set up and lives until its stdin closes. --volatile
keeps rewriting every page with new content; --uring registers the buffer as an io_uring fixed
buffer (pinned: VmPin); --tune writes the values to FILE in turn every --period seconds (a
stand-in for ksmtuned). Stdlib only, so it starts fast and nothing else of it is mergeable.
"""

from __future__ import annotations

import argparse
import ctypes
import mmap
import os
import sys
import threading
import time

PAGE = 4096
CHUNK = 16384  # pages per write: 64 MiB


def page(fill: str, i: int, gen: int = 0) -> bytes:
    kind, _, arg = fill.partition(":")
    if kind == "byte":
        return bytes([int(arg, 0)]) * PAGE
    if kind == "index":  # the same in every process with this seed, unique within one
        return (int(arg) * 1_000_003 + i).to_bytes(8, "little") * (PAGE // 8)
    return os.urandom(PAGE)  # random: unique everywhere


def fill_buffer(buf: mmap.mmap, pages: int, fill: str, gen: int = 0) -> None:
    buf.seek(0)
    if fill.startswith("byte:"):
        block = page(fill, 0) * CHUNK
        for first in range(0, pages, CHUNK):
            buf.write(block[: min(CHUNK, pages - first) * PAGE])
    elif fill == "random":
        for first in range(0, pages, CHUNK):
            n = min(CHUNK, pages - first)
            data = bytearray(os.urandom(n * PAGE))
            for k in range(n):  # a counter word per page: unique even if urandom repeated
                data[k * PAGE : k * PAGE + 16] = (gen << 40 | (first + k)).to_bytes(16, "little")
            buf.write(bytes(data))
    else:
        buf.write(b"".join(page(fill, i) for i in range(pages)))


def register_uring(buf: mmap.mmap, size: int) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    params = ctypes.create_string_buffer(120)
    fd = libc.syscall(425, 8, params)  # io_uring_setup
    if fd < 0:
        raise OSError(ctypes.get_errno(), "io_uring_setup")

    class Iovec(ctypes.Structure):
        _fields_ = (("base", ctypes.c_void_p), ("len", ctypes.c_size_t))

    iov = Iovec(ctypes.addressof(ctypes.c_char.from_buffer(buf)), size)
    if libc.syscall(427, fd, 0, ctypes.byref(iov), 1) != 0:  # IORING_REGISTER_BUFFERS
        raise OSError(ctypes.get_errno(), "io_uring_register")
    return int(fd)


def tune(spec: str, period: float) -> None:
    path, _, values = spec.partition("=")
    words = values.split(",")
    i = 0
    while True:
        with open(path, "w") as f:
            f.write(words[i % len(words)] + "\n")
        i += 1
        time.sleep(period)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pages", type=int, default=2048)
    ap.add_argument("--fill", default="byte:0x5a")
    ap.add_argument("--shared", action="store_true")
    ap.add_argument("--mergeable", action="store_true")
    ap.add_argument("--thp", choices=("on", "off"), default="off")
    ap.add_argument("--volatile", action="store_true")
    ap.add_argument("--uring", action="store_true")
    ap.add_argument("--tune")
    ap.add_argument("--period", type=float, default=0.05)
    args = ap.parse_args()
    threading.Thread(target=lambda: (sys.stdin.read(), os._exit(0)), daemon=True).start()
    if args.tune:
        print(f"ready {os.getpid()}", flush=True)
        tune(args.tune, args.period)
        return
    size = args.pages * PAGE
    share = mmap.MAP_SHARED if args.shared else mmap.MAP_PRIVATE
    buf = mmap.mmap(-1, size, flags=share | mmap.MAP_ANONYMOUS)
    if not args.shared:
        buf.madvise(mmap.MADV_HUGEPAGE if args.thp == "on" else mmap.MADV_NOHUGEPAGE)
    fill_buffer(buf, args.pages, args.fill)
    if args.mergeable:
        buf.madvise(mmap.MADV_MERGEABLE)  # succeeds on a shared mapping, and changes nothing
    if args.uring:
        register_uring(buf, size)
    print(f"ready {os.getpid()}", flush=True)
    gen = 0
    while True:
        if args.volatile:
            gen += 1
            fill_buffer(buf, args.pages, "random", gen)
            time.sleep(0.05)
        else:
            time.sleep(3600)


if __name__ == "__main__":
    main()
