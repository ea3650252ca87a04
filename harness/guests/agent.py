"""Host side of the in-guest agent's line protocol (harness/guests/data/ksmh-agent.c).

    guest -> host, once after boot:  ready index=N version=1 pagesize=4096
    host  -> guest:                  ID COMMAND ARGS...
    guest -> host:                   ID ok KEY=VALUE...   |   ID err MESSAGE
    malformed request:               - err MESSAGE

Every wait has a deadline, lines that are not the awaited reply (stale replies from an earlier
connection, console noise, garbage) are skipped and counted, and a closed channel is an error
at once, so no call can hang on a dead or confused guest.
"""

from __future__ import annotations

import itertools
import os
import re
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from harness.errors import GuestBootTimeout, GuestError

MAX_LINE = 64 * 1024
_ARG_RE = re.compile(r"^[^\s]+$")


class Channel(Protocol):
    """A byte stream to one guest's agent (a unix socket, or a fake in tests)."""

    def send(self, data: bytes) -> None: ...

    def recv(self, timeout: float) -> bytes:
        """Bytes available within timeout; b"" means closed; raise TimeoutError if none."""
        ...

    def close(self) -> None: ...


class UnixChannel:
    """The agent's virtio-serial port, exposed by QEMU/libvirt as a unix socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    @classmethod
    def connect(cls, path: Path, deadline: float, alive: object = None) -> UnixChannel:
        """Connect, retrying until the socket exists and accepts or `deadline` (monotonic)."""
        last: OSError | None = None
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(path))
                return cls(sock)
            except OSError as exc:
                sock.close()
                last = exc
            if callable(alive) and not alive():
                raise GuestError(f"guest exited before its agent socket {path} accepted")
            if time.monotonic() >= deadline:
                raise GuestBootTimeout(
                    f"agent socket {path} not connectable before the deadline ({last})",
                    hint="see the guest's console log next to the socket",
                )
            time.sleep(0.05)

    def send(self, data: bytes) -> None:
        self.sock.settimeout(10.0)
        try:
            self.sock.sendall(data)
        except OSError as exc:
            raise AgentChannelClosed(f"agent channel write failed: {exc}") from exc

    def recv(self, timeout: float) -> bytes:
        self.sock.settimeout(max(timeout, 0.001))
        try:
            return self.sock.recv(65536)
        except TimeoutError:
            raise
        except OSError as exc:
            raise GuestError(f"agent channel read failed: {exc}") from exc

    def close(self) -> None:
        self.sock.close()


@dataclass(frozen=True)
class AgentReply:
    """A successful reply: the raw text and its KEY=VALUE fields."""

    id: str
    text: str
    fields: dict[str, str] = field(default_factory=dict)

    def int(self, key: str) -> int:
        try:
            return int(self.fields[key])
        except (KeyError, ValueError) as exc:
            raise GuestError(f"agent reply {self.text!r} has no integer {key}") from exc


class AgentCommandError(GuestError):
    """The agent answered `err`: the command was understood but refused or failed."""


class AgentChannelClosed(GuestError):
    """The agent's channel ended (EOF or a failed write): usually the guest died."""


def parse_fields(text: str) -> dict[str, str]:
    out = {}
    for token in text.split():
        key, sep, value = token.partition("=")
        if sep:
            out[key] = value
    return out


class AgentClient:
    """One connection to one guest's agent. Not thread-safe: one request at a time."""

    def __init__(self, channel: Channel, name: str = "guest", default_timeout: float = 120.0):
        self.channel = channel
        self.name = name
        self.default_timeout = default_timeout
        self._buf = b""
        self._ids = itertools.count(1)
        # A per-connection prefix, so replies left over from an earlier client never match.
        self._prefix = os.urandom(3).hex()
        self.skipped: list[str] = []

    def _readline(self, deadline: float, what: str) -> str:
        while True:
            nl = self._buf.find(b"\n")
            if nl >= 0:
                line, self._buf = self._buf[:nl], self._buf[nl + 1 :]
                return line.decode("utf-8", "replace").strip()
            if len(self._buf) > MAX_LINE:
                self.skipped.append(self._buf[:80].decode("utf-8", "replace") + "...")
                self._buf = b""
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(what)
            try:
                chunk = self.channel.recv(remaining)
            except TimeoutError:
                raise TimeoutError(what) from None
            if not chunk:
                raise AgentChannelClosed(
                    f"{self.name}: agent channel closed while waiting for {what}",
                    hint="the guest probably died; see its console log",
                )
            self._buf += chunk

    def wait_ready(self, timeout: float) -> dict[str, str]:
        """Wait for the agent's `ready` line; return its fields (index, version, pagesize)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._readline(deadline, "ready")
            except TimeoutError:
                raise GuestBootTimeout(
                    f"{self.name}: agent not ready within {timeout:.0f} s",
                    hint="see the guest's console log; under TCG boot takes ~5 s per guest",
                ) from None
            if line == "ready" or line.startswith("ready "):
                return parse_fields(line)
            if line:
                self.skipped.append(line)

    def call(self, command: str, *args: str, timeout: float | None = None) -> AgentReply:
        """Send one request and return its `ok` reply; raise AgentCommandError on `err`."""
        for word in (command, *args):
            if not _ARG_RE.match(word) or len(word) > 200:
                raise GuestError(f"bad agent argument {word!r}: one word, no whitespace")
        rid = f"{self._prefix}-{next(self._ids)}"
        line = " ".join((rid, command, *args))
        wait = self.default_timeout if timeout is None else timeout
        deadline = time.monotonic() + wait
        self.channel.send(line.encode() + b"\n")
        while True:
            try:
                got = self._readline(deadline, f"the reply to {command!r}")
            except TimeoutError:
                raise GuestError(
                    f"{self.name}: no reply to {line!r} within {wait:.0f} s",
                    hint="the guest may be hung or overloaded; see its console log",
                ) from None
            head, _, rest = got.partition(" ")
            if head == "-" and rest.startswith("err "):
                # We only send well-formed lines, so this answers ours (e.g. too long).
                raise AgentCommandError(f"{self.name}: agent rejected {line!r}: {rest[4:]}")
            if head != rid:
                if got:
                    self.skipped.append(got)
                continue
            status, _, text = rest.partition(" ")
            if status == "ok":
                return AgentReply(id=rid, text=text, fields=parse_fields(text))
            if status == "err":
                raise AgentCommandError(f"{self.name}: {command} failed: {text}")
            raise GuestError(f"{self.name}: malformed reply {got!r}")

    def close(self) -> None:
        self.channel.close()
