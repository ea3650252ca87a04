"""The agent's line protocol, host side, against a fake channel: replies, errors, garbage,
timeouts, a closed channel and a guest that never says ready. Nothing here may hang."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from harness.errors import GuestBootTimeout, GuestError
from harness.guests.agent import AgentClient, AgentCommandError, parse_fields


class FakeChannel:
    """A guest: `respond(request_line)` returns the bytes the guest sends back."""

    def __init__(self, initial: bytes = b"", respond: Callable[[str], bytes] | None = None):
        self.pending = initial
        self.respond = respond or (lambda line: b"")
        self.sent: list[str] = []
        self.closed_by_guest = False
        self.closed = False

    def send(self, data: bytes) -> None:
        for line in data.decode().splitlines():
            self.sent.append(line)
            self.pending += self.respond(line)

    def recv(self, timeout: float) -> bytes:
        if self.pending:
            # Hand out data in small pieces to exercise line reassembly.
            chunk, self.pending = self.pending[:7], self.pending[7:]
            return chunk
        if self.closed_by_guest:
            return b""
        time.sleep(min(timeout, 0.01))
        raise TimeoutError

    def close(self) -> None:
        self.closed = True


def echo_ok(text: str) -> Callable[[str], bytes]:
    return lambda line: f"{line.split()[0]} ok {text}\n".encode()


def test_ready_line_is_parsed_and_noise_before_it_is_skipped() -> None:
    chan = FakeChannel(
        b"[  1.0] kernel noise\n\x00\xffgarbage\nready index=3 version=1 pagesize=4096\n"
    )
    client = AgentClient(chan, "g")
    assert client.wait_ready(1.0) == {"index": "3", "version": "1", "pagesize": "4096"}
    assert client.skipped[0] == "[  1.0] kernel noise"
    assert len(client.skipped) == 2


def test_guest_that_never_says_ready_times_out() -> None:
    client = AgentClient(FakeChannel(b"booting...\n"), "g7")
    t0 = time.monotonic()
    with pytest.raises(GuestBootTimeout, match="g7: agent not ready within 0 s"):
        client.wait_ready(0.2)
    assert time.monotonic() - t0 < 1.0


def test_guest_that_dies_before_ready_is_an_error_not_a_timeout() -> None:
    chan = FakeChannel(b"partial rea")
    chan.closed_by_guest = True
    with pytest.raises(GuestError, match="channel closed while waiting for ready"):
        AgentClient(chan, "g").wait_ready(5.0)


def test_ok_reply_fields() -> None:
    chan = FakeChannel(respond=echo_ok("mismatched=0 bad_pages=0 pages=8192"))
    client = AgentClient(chan, "g")
    reply = client.call("verify", "a")
    assert reply.fields == {"mismatched": "0", "bad_pages": "0", "pages": "8192"}
    assert reply.int("pages") == 8192
    rid, cmd, arg = chan.sent[0].split()
    assert (cmd, arg) == ("verify", "a")
    assert rid == reply.id


def test_request_ids_are_unique_per_request() -> None:
    chan = FakeChannel(respond=echo_ok("pong"))
    client = AgentClient(chan, "g")
    ids = {client.call("ping").id for _ in range(5)}
    assert len(ids) == 5


def test_err_reply_raises_agent_command_error_with_message() -> None:
    chan = FakeChannel(respond=lambda line: f"{line.split()[0]} err no region 'x'\n".encode())
    with pytest.raises(AgentCommandError, match="g: verify failed: no region 'x'"):
        AgentClient(chan, "g").call("verify", "x")


def test_stale_replies_and_garbage_are_skipped() -> None:
    def respond(line: str) -> bytes:
        rid = line.split()[0]
        return f"old-1 ok stale\nready index=0\n\xfe\xfe nonsense\n{rid} ok fresh=1\n".encode(
            "latin-1"
        )

    client = AgentClient(FakeChannel(respond=respond), "g")
    assert client.call("ping").fields == {"fresh": "1"}
    assert client.skipped[:2] == ["old-1 ok stale", "ready index=0"]


def test_malformed_request_reply_is_an_error() -> None:
    chan = FakeChannel(respond=lambda line: b"- err malformed request: line too long\n")
    with pytest.raises(AgentCommandError, match=r"agent rejected .* line too long"):
        AgentClient(chan, "g").call("ping")


def test_reply_with_unknown_status_is_a_protocol_error() -> None:
    chan = FakeChannel(respond=lambda line: f"{line.split()[0]} maybe\n".encode())
    with pytest.raises(GuestError, match="malformed reply"):
        AgentClient(chan, "g").call("ping")


def test_no_reply_times_out_quickly() -> None:
    client = AgentClient(FakeChannel(), "g")
    t0 = time.monotonic()
    with pytest.raises(GuestError, match=r"g: no reply to '.* hold a 5' within 0 s"):
        client.call("hold", "a", "5", timeout=0.2)
    assert time.monotonic() - t0 < 1.0


def test_channel_closed_mid_request() -> None:
    chan = FakeChannel()
    chan.closed_by_guest = True
    with pytest.raises(GuestError, match="channel closed while waiting for the reply"):
        AgentClient(chan, "g").call("fill", "a", "32M", "zero")


def test_overlong_garbage_without_newline_is_dropped_not_buffered_forever() -> None:
    chan = FakeChannel(b"x" * (70 * 1024))
    client = AgentClient(chan, "g")
    with pytest.raises(GuestBootTimeout):
        client.wait_ready(0.3)
    assert client.skipped and client.skipped[0].endswith("...")


@pytest.mark.parametrize("bad", ["two words", "new\nline", "", "x" * 201])
def test_arguments_are_single_words(bad: str) -> None:
    chan = FakeChannel(respond=echo_ok("pong"))
    with pytest.raises(GuestError, match="bad agent argument"):
        AgentClient(chan, "g").call("fill", bad)
    assert chan.sent == []


def test_parse_fields_ignores_bare_words() -> None:
    assert parse_fields("region=a pong pages=3") == {"region": "a", "pages": "3"}
