"""The worked examples of the KSM spec (shared/ksm-model-spec.md section 15) as scenarios.

The same workloads tests/integration/test_model_vs_kernel.py checks value by value on the host;
here they are plain Scenario values, so `ksmh kernels check` can run them on any kernel (and
compare them with the model of that kernel). A kernel without a knob an example sets runs it
without (see harness.scenario.kernel_runner): e.g. example-4-smart1 on 6.1 has no smart scan.
"""

from __future__ import annotations

from typing import Any

from harness.scenario.spec import Scenario


def _procs(n: int, pages: int, fill: str) -> list[dict[str, Any]]:
    return [{"name": f"p{i + 1}", "pages": pages, "fill": fill} for i in range(n)]


def _unique(n: int, pages: int) -> list[dict[str, Any]]:
    return [{"name": f"p{i + 1}", "contents": [f"u:{j}" for j in range(pages)]} for i in range(n)]


def _s(name: str, scans: int, processes: list[dict[str, Any]], **more: Any) -> Scenario:
    return Scenario.from_mapping({"name": name, "scans": scans, "processes": processes, **more})


def worked_examples() -> tuple[Scenario, ...]:
    """Examples 1-11 of the spec, with the variants the spec gives, in the spec's order."""
    write = {"after": 3, "do": "write", "process": "p1", "pages": list(range(5)), "content": "b"}
    cow = [
        {"after": 2, "do": "write", "process": "p2", "page": 0, "content": "b"},
        {"after": 5, "do": "write", "process": "p1", "page": 0, "content": "c"},
    ]
    return (
        _s("example-1", 3, _procs(3, 100, "a")),
        _s("example-1-n50", 3, _procs(3, 50, "a")),
        _s("example-2", 3, _unique(3, 40)),
        _s("example-3", 3, _procs(3, 4, "a"), tunables={"max_page_sharing": 2}),
        _s("example-3-k9", 25, _procs(3, 3, "a"), tunables={"max_page_sharing": 2}),
        _s("example-4-smart1", 25, _unique(1, 64), tunables={"smart_scan": 1}),
        _s("example-4-smart0", 25, _unique(1, 64), tunables={"smart_scan": 0}),
        _s(
            "example-5-zero1",
            5,
            _procs(1, 32, "zero"),
            tunables={"use_zero_pages": 1},
            actions=[write],
        ),
        _s("example-5-zero0", 3, _procs(1, 32, "zero")),
        _s("example-6", 7, _procs(2, 1, "a"), actions=cow),
        _s("example-7", 4, _procs(3, 100, "a"), actions=[{"after": 2, "do": "rerun"}]),
        _s(
            "example-8",
            3,
            _unique(3, 20),
            actions=[{"after": 2, "do": "unmergeable", "process": "p2"}],
        ),
        *(
            _s(
                f"example-9-n{n}",
                4,
                _procs(1, n, "a"),
                actions=[{"after": 2, "do": "fork", "process": "p1", "child": "c1"}],
            )
            for n in (100, 200)
        ),
        _s(
            "example-10",
            4,
            _procs(3, 100, "a"),
            actions=[{"after": 2, "do": "exit", "process": "p3"}],
        ),
        _s(
            "example-11",
            4,
            _procs(2, 1, "a"),
            actions=[{"after": 2, "do": "spawn", "process": "p3", "pages": 1, "fill": "a"}],
        ),
    )
