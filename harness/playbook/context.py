"""What a step may use of the run it is part of: a narrow view, so steps never reach into the
runner (and the runner and its steps do not import each other)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from harness.playbook.expect import Context
from harness.sides import Side


class FleetLike(Protocol):
    """What a run needs of harness.guests.fleet.Fleet (a fake in unit tests)."""

    run_id: str

    def up(self) -> Any: ...
    def down(self) -> Any: ...
    def run(self, command: str, *args: str, guests: str | None = None) -> Any: ...
    def pids(self) -> dict[str, int]: ...


class StepContext(Protocol):
    """The run as its steps see it."""

    @property
    def leader(self) -> Side:
        """The side whose ksmd runs (the kernel; the model in a model-only run)."""
        ...

    @property
    def fleet(self) -> FleetLike: ...

    @property
    def proc(self) -> Path:
        """The /proc the run reads (a fake tree in tests): where steps capture guests from."""
        ...

    @property
    def phase_record(self) -> dict[str, Any]:
        """The current phase's entry in run.json, which steps append to."""
        ...

    def say(self, text: str) -> None: ...
    def elapsed(self) -> float: ...
    def fail(self, text: str) -> None:
        """Record a failed expectation or wait (the run's verdict becomes failed)."""
        ...

    def failures(self) -> int: ...
    def sync(self, why: str) -> dict[str, dict[str, Any]]:
        """Read every side at one instant (followers catch up first); source -> values."""
        ...

    def write_knobs(self, values: Mapping[str, int | str]) -> None:
        """Write KSM knobs on every side (followers catch up first)."""
        ...

    def expectation_context(self, values: Mapping[str, Mapping[str, Any]]) -> Context: ...
