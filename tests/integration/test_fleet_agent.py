"""The real in-guest agent and allocator, in two real guests (mem-merge off: no KSM involved):
every pattern, verify (including a corruption it must count), rewrite, free, and error paths."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from harness.guests.fleet import Fleet
from harness.guests.spec import FleetSpec
from harness.kinds import AccelKind

pytestmark = pytest.mark.qemu


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    with Fleet(FleetSpec(2, 128, accel=AccelKind.TCG, mem_merge=False)) as f:
        yield f


def digests(fleet: Fleet, region: str) -> list[str]:
    result = fleet.run("digest", region).raise_if_failed()
    return [r.value.fields["hash"] for r in result.values() if r.value is not None]


@pytest.mark.parametrize(
    ("pattern", "same_in_every_guest"),
    [
        ("byte:0x5a", True),
        ("zero", True),
        ("mix:3:common=100,zero=0", True),
        ("random:1", False),
        ("tail96:1", False),
        ("mix:3:common=50,zero=20", False),
    ],
)
def test_patterns_are_deterministic_per_guest_index(
    fleet: Fleet, pattern: str, same_in_every_guest: bool
) -> None:
    fleet.fill("p", "4M", pattern).raise_if_failed()
    first = digests(fleet, "p")
    assert (first[0] == first[1]) is same_in_every_guest
    fleet.fill("p", "4M", pattern).raise_if_failed()  # refilling gives the same bytes again
    assert digests(fleet, "p") == first
    assert fleet.verify("p").field("mismatched") == dict.fromkeys(fleet.pids(), 0)


def test_verify_counts_corrupted_bytes_and_rewrite_stays_consistent(fleet: Fleet) -> None:
    g0 = fleet.guests[0].spec.name
    fleet.fill("v", "4M", "tail96:9").raise_if_failed()
    rewritten = fleet.run("rewrite", "v", "0.5", "7", guests="0").raise_if_failed()
    assert 400 < rewritten[g0].value.int("rewritten") < 624  # type: ignore[union-attr]
    assert fleet.verify("v", guests="0").field("mismatched") == {g0: 0}
    fleet.run("poke", "v", "5000", "0x11", guests="0").raise_if_failed()
    fleet.run("poke", "v", "5001", "0x11", guests="0").raise_if_failed()
    got = fleet.verify("v", guests="0")[g0].value
    assert got is not None and got.fields["mismatched"] in ("1", "2")  # a poke may hit a same byte
    assert got.fields["bad_pages"] == "1"
    fleet.run("free", "v").raise_if_failed()
    gone = fleet.verify("v")
    assert all("no region 'v'" in str(r.error) for r in gone.values())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("fill", "x", "3000", "zero"), "bad size '3000'"),
        (("fill", "x", "1M", "byte:300"), "bad pattern 'byte:300'"),
        (("fill", "x", "1M", "mix:1:common=80,zero=30"), "bad pattern"),
        (("fill", "x", "1M", "mix:1:common=4294967295,zero=2"), "bad pattern"),  # wraps to 1
        (("fill", "x", "1G", "zero"), "available in the guest"),
        (("rewrite", "nope", "0.5"), "no region 'nope'"),
        (("hold", "x"), "usage: hold NAME SECONDS"),
        (("frobnicate",), "unknown command 'frobnicate'"),
    ],
)
def test_bad_requests_get_an_error_reply(fleet: Fleet, args: tuple[str, ...], message: str) -> None:
    result = fleet.run(*args, guests="1")
    [r] = result.values()
    assert r.error is not None and message in str(r.error)
    assert fleet.run("ping", guests="1").ok  # and the agent is fine afterwards


def test_malformed_and_overlong_lines_get_errors_never_a_hang(fleet: Fleet) -> None:
    # QEMU serves one client per chardev socket: use the fleet's own connection.
    client = fleet.guests[1].client
    assert client is not None
    for raw, reply in [
        (b"!!bad-id ping\n", b"- err malformed request: id must be"),
        (b"x" * 5000 + b"\n", b"- err malformed request: line longer than"),
        (b"lonely\n", b"lonely err malformed request: missing command"),
    ]:
        client.channel.send(raw)
        line = client._readline(time.monotonic() + 10, "a reply")
        assert line.encode().startswith(reply), line
    assert client.call("ping").text == "pong"


def test_nan_fraction_and_seconds_are_refused(fleet: Fleet) -> None:
    fleet.fill("n", "1M", "zero", guests="1").raise_if_failed()
    for args, message in [
        (("rewrite", "n", "nan"), "usage: rewrite NAME FRACTION"),
        (("hold", "n", "nan"), "bad SECONDS 'nan'"),
    ]:
        [r] = fleet.run(*args, guests="1").values()
        assert r.error is not None and message in str(r.error)
    [r] = fleet.run("rewrite", "n", "0", guests="1").values()  # the refused one left no round
    assert r.value is not None and r.value.fields["round"] == "1"
    assert r.value.fields["rewritten"] == "0"


def test_a_partial_line_of_a_closed_connection_does_not_swallow_the_next_request(
    fleet: Fleet,
) -> None:
    guest = fleet.guests[1]
    assert guest.client is not None
    guest.client.channel.send(b"stale fil")  # no newline: the agent holds it as a partial line
    guest.client.close()
    guest.client = None
    time.sleep(1.0)  # let the agent see the hang-up before the next client connects
    assert fleet.run("ping", guests="1").ok  # reconnects; the ping is not glued to "stale fil"


def test_a_refused_fill_leaves_the_region_it_would_replace(fleet: Fleet) -> None:
    g1 = fleet.guests[1].spec.name
    fleet.fill("keep", "1M", "byte:3", guests="1").raise_if_failed()
    [r] = fleet.fill("keep", "1G", "zero", guests="1").values()
    assert r.error is not None and "available in the guest" in str(r.error)
    assert fleet.verify("keep", guests="1").field("pages") == {g1: 256}  # not freed
    fleet.run("free", "keep", guests="1").raise_if_failed()
