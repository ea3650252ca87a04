"""The real ksmd and the model, compared after every single ksmd batch (mid-scan operations).

ksmd is stepped one batch at a time: sleep_millisecs is set huge, and each change of its value
ends ksmd's sleep, so it runs exactly one batch and sleeps again. Between batches the test
writes pages, unmerges, starts and ends processes, in real child processes and in the model,
and compares every counter. This covers what scan-boundary comparisons cannot: batch
boundaries, insertion before the cursor, pages changed under the unstable tree, pages
allocated mid-scan (per-CPU LRU batches), exits of the mm under the cursor.
"""

from __future__ import annotations

import os
import random
import sys
import time
from typing import IO, Any

import pytest
from ksm_model import MADV_MERGEABLE, MADV_UNMERGEABLE, Kernel, Process

pytestmark = pytest.mark.ksm_kernel

PS = 4096
COUNTERS = (
    "pages_shared",
    "pages_sharing",
    "pages_unshared",
    "pages_volatile",
    "full_scans",
    "stable_node_chains",
    "stable_node_dups",
    "pages_scanned",
    "pages_skipped",
    "ksm_zero_pages",
    "general_profit",
)
CHILD = r"""
import mmap, sys
spec = sys.argv[1].split(",")
buf = mmap.mmap(-1, len(spec) * 4096, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
buf.madvise(mmap.MADV_NOHUGEPAGE)
def put(i, tok):
    if tok.startswith("u"):
        page = tok.encode() + bytes(4096 - len(tok))
    elif tok == "Z":
        page = bytes(4096)
    else:
        page = tok.encode() * 4096
    buf[i * 4096:(i + 1) * 4096] = page
for i, tok in enumerate(spec):
    put(i, tok)
buf.madvise(mmap.MADV_MERGEABLE)
print("ready", flush=True)
for line in sys.stdin:
    cmd = line.split()
    if cmd[0] == "w":
        put(int(cmd[1]), cmd[2])
    elif cmd[0] == "unm":
        buf.madvise(mmap.MADV_UNMERGEABLE)
    elif cmd[0] == "q":
        break
    print("ok", flush=True)
"""
SLEEP = 600000  # ms: ksmd never wakes by itself during a test


def put(p: Process, a: int, i: int, tok: str) -> None:
    if tok.startswith("u"):
        p.write(a + i * PS, tok.encode() + bytes(PS - len(tok)))
    else:
        p.fill(a + i * PS, PS, 0 if tok == "Z" else ord(tok))


class Child:
    """A real process holding one madvised buffer, driven over a pipe."""

    def __init__(self, spec: list[str]) -> None:
        from harness.run import PIPE, spawn

        self.proc = spawn([sys.executable, "-c", CHILD, ",".join(spec)], stdin=PIPE, stdout=PIPE)
        assert self._line() == "ready"

    def _line(self) -> str:
        out: IO[bytes] | None = self.proc.stdout
        assert out is not None
        return out.readline().decode().strip()

    def cmd(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((text + "\n").encode())
        self.proc.stdin.flush()
        if text == "q":
            self.proc.wait(timeout=30)
        else:
            assert self._line() == "ok"

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


def run_stepped(
    ksm: Any,
    pts: int,
    procs: list[tuple[str, list[str]]],
    events: list[tuple[int, str, str]],
    batches: int,
    tunables: list[tuple[str, int]],
) -> None:
    from harness.ksm.sysfs import SysfsBackend
    from harness.procfs import ksm_users

    if not isinstance(ksm, SysfsBackend):
        pytest.skip("needs the real kernel backend, not the model")
    ksm._write("run", "0")
    ksm._write("run", "2")
    if ksm_users(ksm.proc, exclude={os.getpid()}):
        pytest.skip("another process on this host uses KSM; batch counts would not match")
    k = Kernel()
    for name, value in [
        ("max_page_sharing", 256),
        ("smart_scan", 1),
        ("use_zero_pages", 0),
        *tunables,
        ("pages_to_scan", pts),
        ("sleep_millisecs", SLEEP),
    ]:
        ksm._write(name, str(value))
        k.sysfs.write(name, str(value))
    base = ksm.read_counters()
    real: dict[str, Child] = {}
    model: dict[str, tuple[Process, int, int]] = {}

    def start(name: str, spec: list[str]) -> None:
        real[name] = Child(spec)
        p = k.spawn(name=name)
        a = p.mmap(len(spec) * PS)
        for i, tok in enumerate(spec):
            put(p, a, i, tok)
        p.madvise(a, len(spec) * PS, MADV_MERGEABLE)
        model[name] = (p, a, len(spec))

    try:
        for name, spec in procs:
            start(name, spec)
        sleep = SLEEP
        for batch in range(batches):
            for at, name, text in events:
                if at != batch:
                    continue
                if text.startswith("spawn "):
                    woken = not k.mm_list and batch > 0
                    start(name, text.split()[1].split(","))
                    if woken:  # registering into an empty list wakes ksmd: one batch
                        k.scan_pages(pts)
                        time.sleep(0.3)
                    continue
                real[name].cmd(text)
                p, a, n = model[name]
                if text == "q":
                    del real[name], model[name]
                    p.exit()
                elif text == "unm":
                    p.madvise(a, n * PS, MADV_UNMERGEABLE)
                else:
                    _, i, tok = text.split()
                    put(p, a, int(i), tok)
            if batch == 0:
                ksm._write("run", "1")
                k.sysfs.write("run", "1")
            else:
                sleep = SLEEP + 1 if sleep == SLEEP else SLEEP
                ksm._write("sleep_millisecs", str(sleep))
            time.sleep(0.15)
            got = ksm.read_counters()
            time.sleep(0.05)
            assert ksm.read_counters() == got, "ksmd ran more than one batch"
            k.scan_pages(pts)
            kernel = got.as_dict()
            for name in ("pages_scanned", "pages_skipped"):
                kernel[name] -= base.as_dict()[name]
            mine = {n: int(k.sysfs.read(n)) for n in COUNTERS}
            diff = {n: (kernel[n], mine[n]) for n in COUNTERS if kernel[n] != mine[n]}
            assert not diff, f"after batch {batch}: (kernel, model) {diff}"
    finally:
        for child in real.values():
            child.kill()
        ksm._write("run", "0")


def random_case(seed: int) -> tuple[int, list[Any], list[Any], list[tuple[str, int]]]:
    rng = random.Random(seed)
    toks = ["a", "b", "c", "ux1", "ux2", "ux3", "ux4", "ux5", "Z"]
    procs = [
        (f"P{i}", [rng.choice(toks) for _ in range(rng.randint(2, 9))])
        for i in range(rng.randint(1, 3))
    ]
    sizes = {n: len(s) for n, s in procs}
    alive = [n for n, _ in procs]
    events: list[tuple[int, str, str]] = []
    for b in range(1, 30):
        if rng.random() >= 0.35 or not alive:
            continue
        r, n = rng.random(), rng.choice(alive)
        if r < 0.6:
            events.append((b, n, f"w {rng.randrange(sizes[n])} {rng.choice(toks)}"))
        elif r < 0.7:
            events.append((b, n, "unm"))
        elif r < 0.8 and len(alive) > 1:
            events.append((b, n, "q"))
            alive.remove(n)
        elif len(alive) < 4:
            name = f"P{len(sizes)}"
            spec = [rng.choice(toks) for _ in range(rng.randint(1, 6))]
            sizes[name] = len(spec)
            alive.append(name)
            events.append((b, name, "spawn " + ",".join(spec)))
    tunables = [
        ("smart_scan", rng.randint(0, 1)),
        ("max_page_sharing", rng.choice([2, 3, 256])),
        ("use_zero_pages", rng.randint(0, 1)),
    ]
    return rng.choice([1, 2, 3, 5]), procs, events, tunables


@pytest.mark.parametrize("seed", [101, 105, 117])
def test_random_mid_scan_operations(ksm: Any, seed: int) -> None:
    pts, procs, events, tunables = random_case(seed)
    run_stepped(ksm, pts, procs, events, 30, tunables)


def test_pages_changed_under_the_unstable_tree(ksm: Any) -> None:
    u = [f"u{i:02d}" for i in range(12)]
    run_stepped(
        ksm,
        3,
        [("P1", u), ("P2", u[::-1]), ("P3", [*u[3:9], "a", "a"])],
        [
            (14, "P1", "w 3 u07"),
            (14, "P1", "w 0 uzz"),
            (15, "P1", "w 5 u01"),
            (16, "P2", "w 11 u09"),
            (17, "P1", "unm"),
            (18, "P2", "w 2 a"),
            (22, "P3", "w 0 u10"),
        ],
        30,
        [("smart_scan", 0)],
    )
