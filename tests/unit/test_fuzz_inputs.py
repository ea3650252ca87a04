"""Property-based tests (hypothesis): every loader and the agent's line protocol give a valid
object or a HarnessError for any input, never another exception and never a hang."""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from harness.errors import HarnessError
from harness.guests.agent import AgentClient, AgentReply
from harness.playbook.plan import Playbook
from harness.playbook.schema import loads_playbook, parse_playbook
from harness.remote.inventory import Inventory, parse_inventory
from harness.scenario.generate import generate
from harness.scenario.spec import Scenario
from harness.yamlfile import Source

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = (ROOT / "playbooks" / "quickstart.yaml").read_text()
INVENTORY = (ROOT / "playbooks" / "inventory.example.yaml").read_text()
FUZZ = settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None
)

# Plain data as YAML and JSON give it: the shapes loaders see.
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(["all", "0-3", "64MiB", "64MB", "byte:0x5a", "1%", "+2", "debian", "qemu"]),
)
data = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=25,
)
FIELDS = [
    "name", "fleet", "phases", "ksm", "steps", "fill", "wait", "expect", "count", "size",
    "pattern", "guests", "region", "hosts", "address", "user", "key_file", "port", "defaults",
    "processes", "actions", "after", "do", "scans", "pages", "contents", "process", "tunables",
]  # fmt: skip
# Mappings whose keys are mostly the formats' own, so validation gets deep, not just to line 1.
shaped = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.sampled_from(FIELDS), inner, max_size=5),
    ),
    max_leaves=30,
)


def _mutate(text: str, start: int, length: int, insert: str) -> str:
    start %= len(text) + 1
    return text[:start] + insert + text[start + length :]


@FUZZ
@given(st.text(max_size=300))
@example("=")  # found by this test: PyYAML's constructor error spans lines
def test_any_text_is_a_playbook_or_a_playbook_error(text: str) -> None:
    try:
        assert isinstance(loads_playbook(text), Playbook)
    except HarnessError as exc:
        assert "\n" not in exc.message


@FUZZ
@given(st.integers(0, 2000), st.integers(0, 40), st.text(max_size=30))
def test_mutated_quickstart_is_a_playbook_or_a_playbook_error(
    start: int, length: int, insert: str
) -> None:
    try:
        loads_playbook(_mutate(QUICKSTART, start, length, insert))
    except HarnessError as exc:
        assert exc.message.startswith("<string>:") and "\n" not in exc.message
        assert exc.hint


@FUZZ
@given(st.one_of(data, shaped))
def test_any_data_is_a_playbook_or_a_playbook_error(value: Any) -> None:
    try:
        parse_playbook(value, Source("<data>"))
    except HarnessError as exc:
        assert re.match(r"^<data>:\d+: ", exc.message), exc.message
    # The same data through YAML text (where it can be written as YAML).
    try:
        text = yaml.safe_dump(value)
    except (yaml.YAMLError, ValueError):
        return
    with contextlib.suppress(HarnessError):
        loads_playbook(text)


@FUZZ
@given(st.one_of(data, shaped), st.integers(0, 3000), st.integers(0, 40), st.text(max_size=30))
def test_inventories(value: Any, start: int, length: int, insert: str) -> None:
    for text in (_mutate(INVENTORY, start, length, insert), yaml.safe_dump(value)):
        try:
            assert isinstance(parse_inventory(text, Path("/x/inv.yaml")), Inventory)
        except HarnessError as exc:
            assert exc.message.startswith("/x/inv.yaml:") and "\n" not in exc.message


@FUZZ
@given(st.one_of(data, shaped))
def test_any_data_is_a_scenario_or_a_scenario_error(value: Any) -> None:
    try:
        assert isinstance(Scenario.from_mapping(value), Scenario)
    except HarnessError as exc:
        assert "\n" not in exc.message


@FUZZ
@given(st.integers(0, 2**32), st.data())
def test_generated_scenarios_round_trip_and_survive_mutation(seed: int, draw: Any) -> None:
    scenario = generate(seed)
    mapping = scenario.to_mapping()
    assert Scenario.from_mapping(mapping) == scenario
    # One field replaced by arbitrary data: a scenario or a ScenarioError.
    key = draw.draw(st.sampled_from(sorted(mapping)))
    mapping[key] = draw.draw(data)
    with contextlib.suppress(HarnessError):
        Scenario.from_mapping(mapping)


# -- the agent's line protocol, host side ----------------------------------------------------


class Script:
    """A channel that hands out fixed bytes, then times out."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.sent = b""

    def send(self, data: bytes) -> None:
        self.sent += data

    def recv(self, timeout: float) -> bytes:
        if self.data:
            chunk, self.data = self.data[:5000], self.data[5000:]
            return chunk
        raise TimeoutError

    def close(self) -> None:
        pass


replies = st.lists(
    st.one_of(
        st.binary(max_size=80),
        st.builds(
            lambda status, text: f"{{id}} {status} {text}".encode(),
            st.sampled_from(["ok", "err", "okay", ""]),
            st.text(max_size=40).map(lambda t: t.replace("\n", " ")),
        ),
    ),
    max_size=6,
)


@FUZZ
@given(replies)
def test_agent_client_reads_any_reply_stream(lines: list[bytes]) -> None:
    client = AgentClient(Script(b""), name="g0", default_timeout=0.05)
    rid = f"{client._prefix}-1".encode()
    client.channel = Script(b"\n".join(line.replace(b"{id}", rid) for line in lines) + b"\n")
    try:
        reply = client.call("info")
    except HarnessError:
        return
    assert isinstance(reply, AgentReply) and reply.id == rid.decode()
    for key in reply.fields:
        with contextlib.suppress(HarnessError):
            assert isinstance(reply.int(key), int)


@FUZZ
@given(st.binary(max_size=300))
def test_agent_ready_line_from_any_bytes(data: bytes) -> None:
    client = AgentClient(Script(data), name="g0")
    try:
        fields = client.wait_ready(0.05)
    except HarnessError:
        return
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in fields.items())
