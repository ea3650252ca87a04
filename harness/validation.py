"""Declarative validation of the harness's documents (playbooks, inventories, scenarios).

Documents are pydantic v2 models (`Model`: strict, unknown fields forbidden, frozen) over the
plain data harness.yamlfile reads. This module is the small shared layer that keeps errors as
useful as hand-written ones: one line `FILE:LINE: FIELD: message` plus a hint.

- `Model` checks the shape first (a mapping, no unknown field, every required field) with
  messages that list what is allowed, and a per-model `example` hint.
- `Check(fn)` attaches a plain function to a field (`Annotated[int, Check(fn)]`): it returns
  the converted value or raises `Invalid` (or any HarnessError, e.g. units.SizeError), whose
  message and hint become the error's. `between`, `one_of`, `matching` build the common ones.
- `Invalid(..., at=("key",))` points below the value being validated (e.g. the phase whose
  name repeats), so model-level checks still name the exact line.
- `validate(Model, data, src)` runs the model and turns the first pydantic error into
  `src.error(path, message, hint)`: the path comes from walking the error's location through
  the data itself (so union tags and other non-data parts of a location drop out).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from enum import StrEnum
from typing import Any, ClassVar, NoReturn, TypeVar

from pydantic import BaseModel, ConfigDict, GetCoreSchemaHandler, ValidationError, model_validator
from pydantic_core import PydanticCustomError, core_schema

from harness.errors import HarnessError
from harness.yamlfile import PathKey, Source

ERROR_TYPE = "harness"
_AT = "harness_at"
_HINT = "harness_hint"
M = TypeVar("M", bound=BaseModel)


class Invalid(ValueError):
    """Raised by a check: `message` (and `hint`); `at` is a path below the checked value."""

    def __init__(self, message: str, hint: str | None = None, at: PathKey = ()) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.at = tuple(at)


def fail(message: str, hint: str | None = None, at: PathKey = ()) -> PydanticCustomError:
    """The pydantic error for an Invalid; ctx carries where below and the hint."""
    # pydantic fills only {harness_at}/{harness_hint} placeholders of the template from ctx.
    return PydanticCustomError(ERROR_TYPE, message, {_AT: tuple(at), _HINT: hint})


def kind(value: object) -> str:
    """How a wrong value is shown in messages: 'a mapping', "str 'x'", 'nothing'."""
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return f"a boolean ({value})"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


class Model(BaseModel):
    """Base of every document model: strict, frozen, and shape errors that say what is allowed."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    what: ClassVar[str] = "a mapping"  # shown in "expected <what> (a mapping), got ..."
    example: ClassVar[str | None] = None  # hint for a missing required field

    @model_validator(mode="before")
    @classmethod
    def _shape(cls, data: Any) -> Any:
        if isinstance(data, BaseModel):
            return data
        if not isinstance(data, dict):
            raise fail(f"expected {cls.what} (a mapping), got {kind(data)}")
        names = [f.alias or name for name, f in cls.model_fields.items()]
        for key in data:
            if key not in names:
                exc = cls.unknown_field(key, data)
                raise fail(exc.message, exc.hint, (key, *exc.at))
        for name, f in cls.model_fields.items():
            if f.is_required() and (f.alias or name) not in data:
                raise fail(f"missing required field {f.alias or name!r}", hint=cls.example)
        return data

    @classmethod
    def unknown_field(cls, key: str, data: dict[str, Any]) -> Invalid:
        """The error for an unknown field (a model may recognise a wrong kind of file)."""
        allowed = ", ".join(f.alias or n for n, f in cls.model_fields.items())
        return Invalid(f"unknown field {key!r}", hint="allowed here: " + allowed)


class Check:
    """Field metadata running `fn(value)` before the field's own (strict) type check."""

    def __init__(self, fn: Callable[[Any], Any]) -> None:
        self.fn = fn

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        return core_schema.no_info_before_validator_function(self._run, handler(source))

    def _run(self, value: Any) -> Any:
        try:
            return self.fn(value)
        except Invalid as exc:
            raise fail(exc.message, exc.hint, exc.at) from None
        except HarnessError as exc:
            raise fail(exc.message, exc.hint) from None


def between(lo: float, hi: float, *, integer: bool = True) -> Check:
    """An integer (or, integer=False, a finite number) in lo..hi; booleans are refused."""

    def check(value: Any) -> int | float:
        shown = f"{lo}..{hi}" if integer else f"{lo:g}..{hi:g}"
        ok = isinstance(value, int) or (not integer and isinstance(value, float))
        if isinstance(value, bool) or not ok:
            what = "an integer" if integer else "a number"
            raise Invalid(f"expected {what} {shown}, got {kind(value)}")
        assert isinstance(value, int | float)
        if not (lo <= value <= hi):  # NaN fails this too
            raise Invalid(f"{value} is out of range {shown}")
        return value if integer else float(value)

    return Check(check)


def one_of(choices: type[StrEnum] | Sequence[str]) -> Check:
    """A string among `choices` (a StrEnum's values, converted to the member)."""
    values = [str(c.value) for c in choices] if isinstance(choices, type) else list(choices)

    def check(value: Any) -> Any:
        if not isinstance(value, str):
            raise Invalid(f"expected one of {', '.join(values)}, got {kind(value)}")
        if value not in values:
            raise Invalid(f"{value!r} is not one of {', '.join(values)}")
        return choices(value) if isinstance(choices, type) else value

    return Check(check)


def matching(pattern: str, help: str) -> Check:
    """A string matching `pattern` (fullmatch); `help` says what is accepted."""
    rx = re.compile(pattern)

    def check(value: Any) -> str:
        if not isinstance(value, str):
            raise Invalid(f"expected a string, got {kind(value)}")
        if not rx.fullmatch(value):
            raise Invalid(f"{value!r}: {help}")
        return value

    return Check(check)


def boolean(value: Any) -> bool:
    """YAML's true/false only (no 0/1 or 'yes' strings: those stay errors)."""
    if not isinstance(value, bool):
        raise Invalid(f"expected true or false, got {kind(value)}")
    return value


def finite(value: float) -> bool:
    return not (math.isnan(value) or math.isinf(value))


# -- mapping pydantic's errors to one line ---------------------------------------------------

_BUILTIN: dict[str, str] = {
    "string_type": "expected a string, got {got}",
    "bool_type": "expected true or false, got {got}",
    "int_type": "expected an integer, got {got}",
    "float_type": "expected a number, got {got}",
    "list_type": "expected a list, got {got}",
    "tuple_type": "expected a list, got {got}",
    "dict_type": "expected a mapping, got {got}",
    "model_type": "expected a mapping, got {got}",
    "too_short": "expected a non-empty list",
    "missing": "missing required field",
    "extra_forbidden": "unknown field",
}


def data_path(data: Any, loc: Sequence[str | int]) -> PathKey:
    """The part of a pydantic location that exists in `data` (tags and the like drop out)."""
    path: list[str | int] = []
    node = data
    for part in loc:
        in_dict = isinstance(node, dict) and isinstance(part, str) and part in node
        in_list = isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node)
        if in_dict or in_list:
            node = node[part]
            path.append(part)
    return tuple(path)


def first_error(exc: ValidationError, data: Any) -> tuple[PathKey, str, str | None]:
    """(path in the data, message, hint) of a validation error's first problem."""
    err = exc.errors(include_url=False)[0]
    ctx = err.get("ctx") or {}
    path = data_path(data, err["loc"])
    if err["type"] == ERROR_TYPE:
        return (*path, *ctx.get(_AT, ())), err["msg"], ctx.get(_HINT)
    template = _BUILTIN.get(err["type"])
    message = template.format(got=kind(err.get("input"))) if template else err["msg"]
    return path, message, None


def validate(model: type[M], data: Any, src: Source) -> M:
    """`model` validated from `data`; the first problem as src's error type, with file/line."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        path, message, hint = first_error(exc, data)
        raise src.error(path, message, hint) from None


def raise_at(src: Source, path: PathKey, exc: Invalid) -> NoReturn:
    """An Invalid raised outside a model (post-validation checks), as src's error."""
    raise src.error((*path, *exc.at), exc.message, exc.hint)
