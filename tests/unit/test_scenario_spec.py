"""Scenario descriptions: tokens, mapping loader, and validation errors that name the field."""

from __future__ import annotations

import re
from typing import Any

import pytest

from harness.errors import HarnessError
from harness.scenario import tokens as tk
from harness.scenario.errors import ScenarioError
from harness.scenario.spec import (
    Dontneed,
    Exit,
    Fork,
    ProcessSpec,
    Rerun,
    Scenario,
    SetTunable,
    Spawn,
    Unmergeable,
    Write,
    range_of,
)


def base(**over: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": "t",
        "scans": 4,
        "processes": [
            {"name": "p1", "pages": 3, "fill": "a"},
            {"name": "p2", "contents": ["a*2", "u:7"]},
        ],
    }
    data.update(over)
    return data


# -- tokens --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [
        ("a", "a"),
        (0x61, "a"),
        ("0x61", "a"),
        ("0X62", "b"),
        (0, "zero"),
        ("0x00", "zero"),
        ("zero", "zero"),
        (255, "0xff"),
        ("0x2a", "0x2a"),
        ("u:007", "u:7"),
        ("7", "7"),
    ],
)
def test_token_normalisation(raw: object, canonical: str) -> None:
    assert tk.normalize(raw) == canonical


@pytest.mark.parametrize("raw", ["ab", "", "u:", "u:-1", "0x100", 256, -1, True, None, "*", "0xzz"])
def test_bad_tokens_are_refused(raw: object) -> None:
    with pytest.raises(tk.TokenError):
        tk.normalize(raw)


def test_page_bytes() -> None:
    assert tk.page_bytes("a", 4096) == b"a" * 4096
    assert tk.page_bytes("zero", 4096) == bytes(4096)
    assert tk.page_bytes("0xff", 8) == b"\xff" * 8
    u1, u2 = tk.page_bytes("u:1", 4096), tk.page_bytes("u:2", 4096)
    assert len(u1) == len(u2) == 4096
    assert u1 != u2 and u1 == tk.page_bytes("u:1", 4096)
    # A u-page is never all one byte, so it can never equal a fill page.
    assert len(set(u1)) > 1


def test_runs_round_trip() -> None:
    pages = ["a", "a", "b", "u:3", "u:3", "u:3", "zero"]
    assert tk.encode_runs(pages) == ["a*2", "b*1", "u:3*3", "zero*1"]
    assert tk.decode_runs(tk.encode_runs(pages)) == pages
    assert tk.decode_runs(["c", "0x61*2"]) == ["c", "a", "a"]
    with pytest.raises(tk.TokenError):
        tk.decode_runs(["a*0"])


# -- loading -------------------------------------------------------------------------------


def test_from_mapping_builds_the_value() -> None:
    s = Scenario.from_mapping(
        base(
            tunables={"smart_scan": "0", "max_page_sharing": 3},
            actions=[
                {"after": 1, "do": "write", "process": "p2", "page": 2, "content": 0x62},
                {"after": 2, "do": "fork", "process": "p1", "child": "c1"},
                {"after": 2, "do": "unmergeable", "process": "c1"},
                {"after": 3, "do": "exit", "process": "p2"},
                {"after": 3, "do": "rerun"},
                {"after": 3, "do": "set", "tunable": "use_zero_pages", "value": "y"},
            ],
        )
    )
    assert s.processes == (ProcessSpec("p1", ("a", "a", "a")), ProcessSpec("p2", ("a", "a", "u:7")))
    # Tunables are parsed and kept in the harness's write order.
    assert s.tunables == (("max_page_sharing", 3), ("smart_scan", 0))
    assert s.actions == (
        Write(1, "p2", (2,), "b"),
        Fork(2, "p1", "c1"),
        Unmergeable(2, "c1"),
        Exit(3, "p2"),
        Rerun(3),
        SetTunable(3, "use_zero_pages", 1),
    )
    assert s.actions_after(2) == (Fork(2, "p1", "c1"), Unmergeable(2, "c1"))
    assert s.page_count("c1") == 3
    assert Scenario.from_mapping(s.to_mapping()) == s


def test_thp_processes_round_trip_and_describe() -> None:
    s = Scenario.from_mapping(
        base(
            processes=[{"name": "h1", "contents": ["a*512", "zero*8"], "thp": True}],
            actions=[{"after": 1, "do": "spawn", "process": "h2", "pages": 4, "fill": "b",
                      "thp": True}],
        )
    )  # fmt: skip
    assert s.processes[0].thp and s.processes[0].pages == ("a",) * 512 + ("zero",) * 8
    assert s.to_mapping()["processes"] == [
        {"name": "h1", "contents": ["a*512", "zero*8"], "thp": True}
    ]
    assert s.to_mapping()["actions"][0]["thp"] is True
    assert Scenario.from_mapping(s.to_mapping()) == s
    assert "process h1 (thp): a*512 zero*8" in s.describe()
    assert "spawn h2 (thp): b*4" in s.describe()
    plain = Scenario.from_mapping(base())
    assert all(not p.thp for p in plain.processes)
    assert all("thp" not in p for p in plain.to_mapping()["processes"])


def test_scenario_is_frozen() -> None:
    s = Scenario.from_mapping(base())
    with pytest.raises(AttributeError):
        s.scans = 9  # type: ignore[misc]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"scans": 0}, "scans"),
        ({"scans": "3"}, "scans"),
        ({"bogus": 1}, "bogus: unknown field 'bogus'"),
        ({"processes": []}, "processes"),
        ({"processes": [{"name": "p 1", "pages": 1, "fill": "a"}]}, "processes[0].name"),
        ({"processes": [{"name": "p1", "pages": 0, "fill": "a"}]}, "processes[0].pages"),
        ({"processes": [{"name": "p1", "pages": 2}]}, "processes[0].fill"),
        ({"processes": [{"name": "p1", "pages": 2, "fill": "xy"}]}, "processes[0].fill"),
        ({"processes": [{"name": "p1", "contents": ["a", "bad"]}]}, "processes[0].contents[1]"),
        ({"processes": [{"name": "p1", "contents": ["a"], "fill": "a"}]}, "processes[0]"),
        ({"processes": [{"name": "p1", "pages": 1, "fill": "a", "thp": 1}]}, "processes[0].thp"),
        (
            {"processes": [{"name": "p1", "pages": 1, "fill": "a"}] * 2},
            "name 'p1' is used twice",
        ),
        ({"tunables": {"run": 1}}, "tunables.run"),
        ({"tunables": {"advisor_mode": "scan-time"}}, "tunables.advisor_mode"),
        ({"tunables": {"max_page_sharing": 1}}, "tunables.max_page_sharing"),
        ({"tunables": {"smart_scan": "maybe"}}, "tunables.smart_scan"),
        ({"tunables": {"pages_to_scan": 0}}, "tunables.pages_to_scan"),
        ({"actions": [{"after": 1, "do": "jump"}]}, "actions[0].do"),
        ({"actions": [{"after": 4, "do": "rerun"}]}, "actions[0].after"),
        ({"actions": [{"after": 0, "do": "rerun"}]}, "actions[0].after"),
        ({"actions": [{"do": "rerun"}]}, "actions[0]: missing required field 'after'"),
        (
            {"actions": [{"after": 1, "do": "exit"}]},
            "actions[0]: missing required field 'process'",
        ),
        ({"actions": [{"after": 1, "do": "exit", "process": "p9"}]}, "actions[0].process"),
        ({"actions": [{"after": 1, "do": "rerun", "process": "p1"}]}, "actions[0].process"),
        (
            {"actions": [{"after": 1, "do": "write", "process": "p1", "page": 3, "content": "a"}]},
            "actions[0].pages",
        ),
        (
            {"actions": [{"after": 1, "do": "write", "process": "p1", "page": 0, "content": "??"}]},
            "actions[0].content",
        ),
        (
            {"actions": [{"after": 1, "do": "write", "process": "p1", "content": "a"}]},
            "actions[0].pages",
        ),
        (
            {"actions": [{"after": 1, "do": "fork", "process": "p1", "child": "p2"}]},
            "actions[0].child",
        ),
        (
            {"actions": [{"after": 1, "do": "set", "tunable": "max_page_sharing", "value": 0}]},
            "actions[0].value: 0 is out of range 2..2147483647",
        ),
        (
            {"actions": [{"after": 2, "do": "rerun"}, {"after": 1, "do": "rerun"}]},
            "actions[1].after",
        ),
        (
            {
                "actions": [
                    {"after": 1, "do": "exit", "process": "p1"},
                    {"after": 2, "do": "write", "process": "p1", "page": 0, "content": "a"},
                ]
            },
            "actions[1].process: 'p1' has exited",
        ),
        (
            {
                "actions": [
                    {"after": 1, "do": "exit", "process": "p1"},
                    {"after": 2, "do": "unmergeable", "process": "p2"},
                ]
            },
            "after F=2 no live MADV_MERGEABLE process",
        ),
    ],
)
def test_validation_errors_name_the_field(change: dict[str, Any], field: str) -> None:
    with pytest.raises(ScenarioError) as info:
        Scenario.from_mapping(base(**change))
    assert isinstance(info.value, HarnessError)
    assert field in info.value.message


def test_direct_construction_is_validated_too() -> None:
    p = ProcessSpec("p1", ("a",))
    with pytest.raises(ScenarioError, match=r"actions\[0\]\.process: 'p2' does not exist"):
        Scenario(processes=(p,), scans=3, actions=(Exit(1, "p2"),))
    with pytest.raises(ScenarioError, match="not canonical"):
        ProcessSpec("p1", ("0x61",))
    with pytest.raises(ScenarioError, match="no live MADV_MERGEABLE"):
        Scenario(processes=(p,), scans=3, actions=(Unmergeable(1, "p1"),))


def test_fork_child_of_unmergeable_parent_does_not_keep_ksmd_busy() -> None:
    p1, p2 = ProcessSpec("p1", ("a",)), ProcessSpec("p2", ("a",))
    acts = (Unmergeable(1, "p1"), Fork(1, "p1", "c1"), Exit(2, "p2"))
    with pytest.raises(ScenarioError, match="after F=2 no live"):
        Scenario(processes=(p1, p2), scans=4, actions=acts)
    # The same with a mergeable parent is fine: the child inherits VM_MERGEABLE.
    ok = (Fork(1, "p1", "c1"), Exit(2, "p2"))
    assert Scenario(processes=(p1, p2), scans=4, actions=ok).actions == ok


def test_range_actions_and_late_joiners() -> None:
    s = Scenario.from_mapping(
        base(
            actions=[
                {"after": 1, "do": "unmergeable", "process": "p1", "start": 1, "count": 2},
                {"after": 1, "do": "dontneed", "process": "p2"},
                {"after": 2, "do": "spawn", "process": "n1", "contents": ["u:1", "b*2"]},
                {"after": 2, "do": "unmergeable", "process": "p1", "start": 0, "count": 1},
                {"after": 2, "do": "unmergeable", "process": "p2"},
                {"after": 3, "do": "mergeable", "process": "p2", "start": 2},
                {"after": 3, "do": "exit", "process": "n1"},
            ]
        )
    )
    assert s.actions[:4] == (
        Unmergeable(1, "p1", 1, 2),
        Dontneed(1, "p2", 0, None),
        Spawn(2, ProcessSpec("n1", ("u:1", "b", "b"))),
        Unmergeable(2, "p1", 0, 1),
    )
    assert range_of(s.actions[0], 3) == (1, 2)  # type: ignore[arg-type]
    assert range_of(s.actions[5], 3) == (2, 1)  # type: ignore[arg-type]
    assert s.page_count("n1") == 3
    assert Scenario.from_mapping(s.to_mapping()) == s
    assert "after F=2: spawn n1: u:1*1 b*2" in s.describe()
    assert "after F=1: unmergeable p1 pages [1:+2]" in s.describe()


@pytest.mark.parametrize(
    ("actions", "message"),
    [
        ([{"after": 1, "do": "dontneed", "process": "p1", "start": 3}], "actions[0].start"),
        ([{"after": 1, "do": "dontneed", "process": "p1", "count": 4}], "actions[0].count"),
        ([{"after": 1, "do": "mergeable", "process": "p1", "count": "2"}], "actions[0].count"),
        ([{"after": 1, "do": "spawn", "process": "p1", "pages": 1, "fill": "a"}], "new name"),
        ([{"after": 1, "do": "spawn", "process": "n1", "pages": 1}], "actions[0].fill"),
        (
            # All of p1 and p2 unmergeable: no registered mm would be left for ksmd.
            [
                {"after": 1, "do": "unmergeable", "process": "p1"},
                {"after": 1, "do": "unmergeable", "process": "p2", "start": 0, "count": 3},
            ],
            "after F=1 no live",
        ),
    ],
)
def test_range_and_spawn_errors(actions: list[dict[str, Any]], message: str) -> None:
    with pytest.raises(ScenarioError, match=re.escape(message)):
        Scenario.from_mapping(base(actions=actions))


def test_mergeable_again_keeps_ksmd_busy() -> None:
    acts = [
        {"after": 1, "do": "unmergeable", "process": "p1"},
        {"after": 1, "do": "unmergeable", "process": "p2", "start": 0, "count": 2},
        {"after": 2, "do": "mergeable", "process": "p1", "start": 2},
        {"after": 2, "do": "unmergeable", "process": "p2", "start": 2},
    ]
    # p2 keeps page 2 mergeable through F=1; p1's page 2 is mergeable again from F=2 on.
    assert len(Scenario.from_mapping(base(actions=acts)).actions) == 4


def test_describe_mentions_seed_and_actions() -> None:
    s = Scenario.from_mapping(
        base(seed=42, actions=[{"after": 1, "do": "fork", "process": "p1", "child": "c1"}])
    )
    text = s.describe()
    assert "seed=42" in text
    assert "process p2: a*2 u:7*1" in text
    assert "after F=1: fork p1 -> c1" in text


def test_range_start_of_wrong_type_names_the_field() -> None:
    # Built directly (not via from_mapping), a str start used to escape as a TypeError.
    bad = Unmergeable(after=1, process="p1", start="1")  # type: ignore[arg-type]
    with pytest.raises(ScenarioError, match=re.escape("actions[0].start: '1' is outside 0..2")):
        Scenario(processes=(ProcessSpec("p1", ("a", "a", "a")),), scans=3, actions=(bad,))
