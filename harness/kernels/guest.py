"""The differential scenario runner against a guest's own KSM, through the guest agent.

The runner logic is harness.scenario.kernel_runner.KernelRunner's, unchanged: GuestRunner only
says where the KSM and the worker processes live. Inside the guest, the agent relays the
runner's worker lines to ksmh-worker processes (harness/guests/data/ksmh-worker.c, a port of
harness/scenario/worker.py with the same line protocol), and does the one timing-critical step
itself: `ksmwait` polls full_scans every millisecond and writes run=0 the moment it moves, so
the sample is frozen at the end of the scan however slow the channel to the host is. The
series it returns is the host runner's Series/Snapshot format, so compare() works unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from types import TracebackType
from urllib.parse import unquote

from harness.errors import HarnessError
from harness.guests.agent import AgentClient, AgentCommandError
from harness.ksm.backend import BackendBase, parse_advisor_mode
from harness.ksm.types import COUNTER_NAMES, TUNABLE_NAMES, Counters, KsmStat, Tunables
from harness.procfs import parse_ksm_stat
from harness.record import Snapshot, StatValue, stat_record
from harness.scenario import tokens as tk
from harness.scenario.errors import WorkerError
from harness.scenario.kernel_runner import KernelRunner
from harness.scenario.series import relative

# An agent request line is at most 4095 bytes (LINEMAX in ksmh-agent.c); longer worker lines
# (a map of many distinct pages) go in several `wpush` requests and one `wsend`.
CHUNK = 3500
MAX_WORD = 200  # AgentClient.call refuses longer words
_ERRNO = re.compile(r"errno=(\d+)")


def unescape(text: str) -> str:
    """The agent's %XX escaping undone (readfile data, ksmsnap values)."""
    return unquote(text, errors="replace")


class GuestKsm(BackendBase):
    """/sys/kernel/mm/ksm and /proc/PID/ksm_stat of a guest, read and written by its agent."""

    source = "kernel"

    def __init__(self, client: AgentClient, page_size: int = 4096, timeout: float = 60.0):
        self.client = client
        self.page_size = page_size
        self.timeout = timeout

    def call(self, command: str, *args: str, timeout: float | None = None) -> dict[str, str]:
        """One agent command; its KEY=VALUE fields (values unescaped)."""
        reply = self.client.call(command, *args, timeout=timeout or self.timeout)
        return {k: unescape(v) for k, v in reply.fields.items()}

    def snapshot(self, procs: tuple[tuple[int, int, int], ...] = ()) -> dict[str, str]:
        """Every KSM file (k.NAME) and, per (pid, addr, length), ksm_stat and anon_huge_kb."""
        return self.call("ksmsnap", *(f"{pid}:{addr}:{length}" for pid, addr, length in procs))

    def files(self) -> dict[str, str]:
        """NAME -> text of every file in the guest's /sys/kernel/mm/ksm."""
        return {k[2:]: v for k, v in self.snapshot().items() if k.startswith("k.")}

    def _read(self, name: str) -> str | None:
        value = self.files().get(name)
        return None if value is None else value + "\n"

    def read_counters(self) -> Counters:
        return counters_of(self.files())

    def read_tunables(self) -> Tunables:
        return tunables_of(self.files())

    def _write(self, name: str, text: str) -> None:
        try:
            self.client.call("ksmset", name, text, timeout=self.timeout)
        except AgentCommandError as exc:
            m = _ERRNO.search(exc.message)
            raise OSError(int(m.group(1)) if m else 0, exc.message) from None

    def ksm_stat(self, pid: int) -> KsmStat:
        return stat_of(pid, self.snapshot(((pid, 0, 0),)))


def counters_of(files: dict[str, str]) -> Counters:
    return Counters(**{n: int(files[n]) if n in files else None for n in COUNTER_NAMES})


def tunables_of(files: dict[str, str]) -> Tunables:
    values: dict[str, int | str | None] = {}
    for name in TUNABLE_NAMES:
        text = files.get(name)
        if text is None:
            values[name] = None
        elif name == "advisor_mode":
            values[name] = parse_advisor_mode(text)
        else:
            values[name] = int(text)
    return Tunables(**values)  # type: ignore[arg-type]


def stat_of(pid: int, snap: dict[str, str]) -> KsmStat:
    """A KsmStat from a ksmsnap reply, parsed as /proc/PID/ksm_stat is on the host."""
    if snap.get(f"p{pid}.gone"):
        raise HarnessError(f"no process with pid {pid} in the guest")
    prefix = f"p{pid}."
    text = "".join(
        f"{k[len(prefix) :]} {v}\n"
        for k, v in snap.items()
        if k.startswith(prefix) and k != f"{prefix}anon_huge_kb"
    )
    return parse_ksm_stat(pid, text)


class GuestWorker:
    """One scenario worker process in the guest, driven through the agent."""

    def __init__(self, pool: GuestWorkerPool, name: str, pid: int) -> None:
        self.pool = pool
        self.name = name
        self.pid = pid
        self.addr = 0  # the buffer's address and length in bytes, once mapped
        self.length = 0

    def request(self, line: str, timeout: float) -> str:
        """Send one worker line and return its reply; an 'err' reply or silence raises.

        A write of many pages goes as ranges (ksmh-worker accepts a-b), in as many writes as
        agent words allow (ksmd is paused meanwhile, so that is the same write).
        """
        words = line.split()
        if words[0] == "write" and len(words) == 3 and len(words[2]) > MAX_WORD:
            reply = ""
            for part in _index_parts(words[2]):
                reply = self._send(["write", words[1], part], timeout)
            return reply
        return self._send(words, timeout)

    def _send(self, words: list[str], timeout: float) -> str:
        client = self.pool.client
        try:
            chunks = _chunks(words)
            for chunk in chunks[:-1]:
                client.call("wpush", self.name, *chunk, timeout=timeout)
            reply = client.call("w", self.name, *chunks[-1], timeout=timeout).text
        except HarnessError as exc:
            raise WorkerError(f"guest worker {self.name}: {words[0]}: {exc.message}") from None
        if reply.startswith("err"):
            raise WorkerError(f"guest worker {self.name}: {words[0]} failed: {reply[4:]}")
        return reply


def _index_parts(indexes: str) -> list[str]:
    """'3,4,5,9' -> ['3-5,9']: consecutive pages as ranges, cut into words of <= MAX_WORD."""
    nums = [int(i) for i in indexes.split(",")]
    items: list[str] = []
    start = prev = nums[0]
    for n in [*nums[1:], None]:
        if n is not None and n == prev + 1:
            prev = n
            continue
        items.append(str(start) if start == prev else f"{start}-{prev}")
        if n is not None:
            start = prev = n
    parts = [items[0]]
    for item in items[1:]:
        if len(parts[-1]) + 1 + len(item) > MAX_WORD:
            parts.append(item)
        else:
            parts[-1] += "," + item
    return parts


def _chunks(words: list[str]) -> list[list[str]]:
    out: list[list[str]] = [[]]
    size = 0
    for word in words:
        if out[-1] and size + len(word) + 1 > CHUNK:
            out.append([])
            size = 0
        out[-1].append(word)
        size += len(word) + 1
    return out


class GuestWorkerPool:
    """WorkerPool's interface (harness.scenario.workers) for workers inside a guest."""

    def __init__(self, client: AgentClient, page_size: int = 4096, timeout: float = 60.0):
        self.client = client
        self.page_size = page_size
        self.timeout = timeout
        self.workers: dict[str, GuestWorker] = {}
        self.pids: list[int] = []

    def __enter__(self) -> GuestWorkerPool:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.kill_all()

    def __getitem__(self, name: str) -> GuestWorker:
        return self.workers[name]

    def live(self) -> list[GuestWorker]:
        return list(self.workers.values())

    def _pid(self, command: str, *args: str) -> int:
        try:
            return self.client.call(command, *args, timeout=self.timeout).int("pid")
        except HarnessError as exc:
            raise WorkerError(f"guest {command} {' '.join(args)}: {exc.message}") from None

    def start(
        self, name: str, pages: tuple[str, ...] | list[str], huge: bool = False
    ) -> GuestWorker:
        """Start a worker, fill its buffer and register it with the guest's KSM."""
        worker = GuestWorker(self, name, self._pid("wspawn", name))
        self.workers[name] = worker
        self.pids.append(worker.pid)
        runs = " ".join(tk.encode_runs(list(pages)))
        mode = "huge" if huge else "nohuge"
        reply = worker.request(f"map {self.page_size} {mode} {runs}", self.timeout).split()
        if reply[:2] != ["ok", str(worker.pid)] or len(reply) != 3:
            raise WorkerError(f"guest worker {name}: unexpected map reply {' '.join(reply)!r}")
        worker.addr, worker.length = int(reply[2]), len(pages) * self.page_size
        return worker

    def fork(self, parent: str, child: str) -> GuestWorker:
        """fork() worker `parent`; the child becomes worker `child`."""
        worker = GuestWorker(self, child, self._pid("wfork", parent, child))
        worker.addr, worker.length = self.workers[parent].addr, self.workers[parent].length
        self.workers[child] = worker
        self.pids.append(worker.pid)
        return worker

    def exit(self, name: str) -> None:
        """The worker exits; returns once its mm is gone."""
        self.workers.pop(name)
        self._pid("wexit", name)

    def kill_all(self) -> None:
        """SIGKILL every worker (each root's process group) and wait until they are gone."""
        self.workers.clear()
        self.client.call("wkill", timeout=self.timeout)


class GuestRunner(KernelRunner):
    """KernelRunner against the KSM of a guest (a GuestKsm backend); see the module docstring."""

    backend: GuestKsm

    def _pool(self) -> GuestWorkerPool:  # type: ignore[override]
        b = self.backend
        return GuestWorkerPool(b.client, b.page_size, self.worker_timeout)

    @contextmanager
    def _full_scans_fd(self) -> Iterator[int]:
        yield -1  # the agent polls full_scans in the guest

    def _await_scan(
        self, fd: int, last: int, scan: int
    ) -> tuple[int, tuple[int | None, int | None]]:
        try:
            f = self.backend.call(
                "ksmwait", str(last), str(int(self.scan_timeout * 1000)),
                timeout=self.scan_timeout + 30,
            )  # fmt: skip
        except AgentCommandError as exc:
            from harness.errors import ScanTimeout

            raise ScanTimeout(
                f"guest: full scan {scan} did not complete in {self.scan_timeout:g} s "
                f"(full_scans stayed {last}): {exc.message}",
                hint="see the guest's console log",
            ) from None

        def visit(key: str) -> int | None:
            return None if f[key] == "-" else int(f[key])

        return int(f["full_scans"]), (visit("scanned"), visit("skipped"))

    def _snapshot(self, pool: GuestWorkerPool, base: dict[str, int | None]) -> Snapshot:  # type: ignore[override]
        live = pool.live()
        snap = self.backend.snapshot(tuple((w.pid, w.addr, w.length) for w in live))
        files = {k[2:]: v for k, v in snap.items() if k.startswith("k.")}
        counters = relative(counters_of(files).as_dict(), base)
        procs: dict[str, dict[str, StatValue]] = {}
        for w in live:
            procs[w.name] = stat_record(stat_of(w.pid, snap))
            huge = snap.get(f"p{w.pid}.anon_huge_kb")  # the agent reads the buffer's smaps
            procs[w.name]["anon_huge_kb"] = int(huge) if huge and huge.isdigit() else None
        return Snapshot(counters=counters, processes=procs)

    def read_stat(self, pid: int) -> dict[str, StatValue]:
        return stat_record(self.backend.ksm_stat(pid))

    def _foreign(self, ours: set[int]) -> str:
        users = self.backend.call("ksmusers", *(str(p) for p in sorted(ours))).get("users", "")
        out = []
        for user in filter(None, users.split(",")):
            pid, comm, reason = user.split("/", 2)
            reason = {
                "ksm_mergeable:yes": "ksm_mergeable: yes",
                "VM_MERGEABLE": "VM_MERGEABLE mapping",
            }.get(reason, reason.replace(":", " "))
            out.append(f"pid {pid} ({comm}; {reason})")
        return ", ".join(out)
