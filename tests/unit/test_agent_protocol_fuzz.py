"""Hypothesis against the real C agent (harness/guests/data/ksmh-agent.c), built natively with
-DKSMH_AGENT_STDIO: requests on stdin, replies on stdout, and nothing harmful to the host
(poweroff only exits, fills at most 16 MiB, holds at most 0.1 s).

Properties: every request line gets exactly one well-formed reply line (none for a blank
line), the agent never dies, and the host's AgentClient reads every reply into a value or a
HarnessError."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.errors import HarnessError
from harness.guests.agent import AgentClient, AgentReply
from tests.stdio_agent import PipeChannel, build_stdio_agent

FUZZ = settings(
    max_examples=200,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
REPLY = re.compile(rb"^([A-Za-z0-9_.-]{1,32}|-) (ok|err)( .*)?$")
COMMANDS = ["ping", "info", "fill", "verify", "rewrite", "hold", "digest", "poke", "free"]

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc builds the agent")


@pytest.fixture(scope="module")
def agent_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_stdio_agent(tmp_path_factory.mktemp("agent"))


@pytest.fixture(scope="module")
def agent(agent_binary: Path) -> Iterator[AgentClient]:
    proc = subprocess.Popen(
        [str(agent_binary)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    client = AgentClient(PipeChannel(proc), name="stdio-agent", default_timeout=5.0)
    assert client.wait_ready(5)["pagesize"] == "4096"
    yield client
    proc.stdin.close()  # type: ignore[union-attr]
    assert proc.wait(5) == 0  # it survived everything and exits on EOF
    client.skipped.clear()


def _raw_exchange(client: AgentClient, line: bytes) -> list[bytes]:
    """Send one raw line and a ping; the reply lines before the ping's."""
    client.channel.send(line + b"\nzz ping\n")
    got: list[bytes] = []
    while True:
        text = client._readline(time.monotonic() + 5, "a reply").encode()
        if text == b"zz ok pong":
            return got
        got.append(text)


words = st.text(
    alphabet=st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=24
)
raw_lines = st.binary(max_size=300).map(lambda b: b.replace(b"\n", b" ").replace(b"\0", b" "))
requests = st.builds(
    lambda i, c, a: b" ".join([i.encode(), c.encode(), *(w.encode() for w in a)]),
    st.one_of(words, st.sampled_from(["a1", "x-y.z", "-"])),
    st.one_of(st.sampled_from(COMMANDS), words),
    st.lists(
        st.one_of(
            words,
            st.sampled_from(["r", "4096", "8K", "1MiB", "16M", "1MB", "0", "byte:5", "zero",
                             "random:3", "mix:1:common=50,zero=20", "0.5", "nan", "-1"]),
        ),
        max_size=5,
    ),
)  # fmt: skip


@FUZZ
@given(st.one_of(raw_lines, requests))
def test_every_line_gets_one_well_formed_reply(agent: AgentClient, line: bytes) -> None:
    if re.search(rb"(^|[ \t\r])poweroff([ \t\r]|$)", line):
        return  # the one command that ends the agent (by design)
    replies = _raw_exchange(agent, line)
    blank = not line.replace(b"\t", b" ").replace(b"\r", b" ").strip(b" ")
    assert len(replies) == (0 if blank else 1), (line, replies)
    for reply in replies:
        assert REPLY.match(reply), reply


@FUZZ
@given(st.sampled_from(COMMANDS), st.lists(words, max_size=4))
def test_host_client_reads_every_reply(agent: AgentClient, command: str, args: list[str]) -> None:
    try:
        reply = agent.call(command, *args)
    except HarnessError as exc:
        assert "\n" not in exc.message
        return
    assert isinstance(reply, AgentReply)


def test_sizes_follow_the_one_grammar(agent: AgentClient) -> None:
    ok = {"8K": 8192, "8KiB": 8192, "8kib": 8192, "1M": 2**20, "1MiB": 2**20, "4096": 4096}
    for size, n in ok.items():
        assert agent.call("fill", "s", size, "zero").int("bytes") == n
    for size in ("1MB", "8KB", "1GB", "4095", "1Mi", "1MiBB", "0"):
        with pytest.raises(HarnessError, match=r"bad size"):
            agent.call("fill", "s", size, "zero")
    assert agent.call("free", "s").int("freed_pages") == 1  # the last good fill: 4096 B
