"""One result type for every fleet operation: guests of a Fleet, hosts of an inventory.

Like fabric's GroupResult, a FleetResult holds one MemberResult per member (a value, or the
error that stopped that member), in member order, so a partial failure is never hidden and
never stops the other members. `raise_if_failed()` turns the failures into one error that
names each failed member.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from harness.console import plural
from harness.errors import GuestError, HarnessError

T = TypeVar("T")


@dataclass(frozen=True)
class MemberResult(Generic[T]):
    """The outcome of one operation on one member (a guest, or a host)."""

    name: str
    value: T | None = None
    error: HarnessError | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None


class _IntFields(Protocol):
    def int(self, key: str) -> int: ...


class FleetResult(Mapping[str, MemberResult[T]]):
    """Per-member results of one operation, in member order (a mapping name -> result)."""

    def __init__(
        self, operation: str, results: Sequence[MemberResult[T]], noun: str = "guests"
    ) -> None:
        self.operation = operation
        self.noun = noun  # what the members are, for messages: "guests" or "hosts"
        self._results = {r.name: r for r in results}

    def __getitem__(self, name: str) -> MemberResult[T]:
        return self._results[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._results)

    def __len__(self) -> int:
        return len(self._results)

    def __repr__(self) -> str:
        return f"<FleetResult {self.operation}: {len(self.succeeded)}/{len(self)} ok>"

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self._results.values())

    @property
    def failed(self) -> list[MemberResult[T]]:
        return [r for r in self._results.values() if not r.ok]

    @property
    def succeeded(self) -> list[MemberResult[T]]:
        return [r for r in self._results.values() if r.ok]

    def field(self: FleetResult[_IntFields], key: str) -> dict[str, int]:
        """An integer reply field of every member that answered, e.g. field('mismatched')."""
        return {r.name: r.value.int(key) for r in self.succeeded if r.value is not None}

    def raise_if_failed(self, error: type[HarnessError] = GuestError) -> FleetResult[T]:
        """self when every member succeeded; else one `error` naming each failed member."""
        if self.failed:
            # Errors usually name their member already: say the name once.
            lines = "; ".join(
                f"{r.name}: {str(r.error).removeprefix(f'{r.name}: ')}" for r in self.failed
            )
            raise error(
                f"{self.operation} failed on {len(self.failed)} of "
                f"{plural(len(self), self.noun.removesuffix('s'), self.noun)}: {lines}"
            )
        return self
