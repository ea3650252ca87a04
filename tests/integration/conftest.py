"""Real-part fixtures for integration tests: mergeable child processes, free ports."""

from __future__ import annotations

import socket
import sys
from collections.abc import Callable, Iterator
from subprocess import Popen

import pytest

from harness.run import PIPE, spawn

# A child whose only mergeable memory is one buffer of identical pages: mmap private+anonymous,
# THP off (a huge page would be split later and delay merging), filled, then MADV_MERGEABLE.
CHILD = """
import mmap, sys
n, value = int(sys.argv[1]), int(sys.argv[2])
buf = mmap.mmap(-1, n * 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
buf.madvise(mmap.MADV_NOHUGEPAGE)
buf.write(bytes([value]) * (n * 4096))
buf.madvise(mmap.MADV_MERGEABLE)
print("ready", flush=True)
sys.stdin.read()
"""


@pytest.fixture
def mergeable_child() -> Iterator[Callable[[int, int], Popen[bytes]]]:
    """mergeable_child(pages, byte) -> a running child process; killed after the test."""
    children: list[Popen[bytes]] = []

    def start(pages: int, value: int) -> Popen[bytes]:
        proc = spawn([sys.executable, "-c", CHILD, str(pages), str(value)], stdin=PIPE, stdout=PIPE)
        children.append(proc)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line == b"ready\n", f"child did not start: {line!r}"
        return proc

    yield start
    for proc in children:
        proc.kill()
        proc.wait(10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
