"""Read a playbook YAML file into plain data, remembering the line of every field.

PyYAML's composer keeps a mark (line, column) on every node; we walk the node tree ourselves so
each value's path (e.g. ("phases", 0, "steps", 2, "fill")) maps to the 1-based line it came
from. Validation errors then name the file, the line and the field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from harness.errors import PlaybookError

PathKey = tuple[str | int, ...]


@dataclass
class Source:
    """Where a playbook came from, and the line of every value in it."""

    file: str
    lines: dict[PathKey, int] = field(default_factory=dict)

    def line(self, path: PathKey) -> int:
        """The line of `path`, or of its nearest ancestor that has one."""
        p = tuple(path)
        while p:
            if p in self.lines:
                return self.lines[p]
            p = p[:-1]
        return self.lines.get((), 1)

    def error(self, path: PathKey, message: str, hint: str | None = None) -> PlaybookError:
        """A PlaybookError reading `FILE:LINE: FIELD: message`."""
        where = format_path(path) or "(top level)"
        return PlaybookError(f"{self.file}:{self.line(path)}: {where}: {message}", hint=hint)


def format_path(path: PathKey) -> str:
    """("phases", 0, "steps", 2, "fill") -> "phases[0].steps[2].fill"."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + part
    return out


def _convert(node: yaml.Node, path: PathKey, src: Source) -> Any:
    src.lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            key = _scalar(key_node)
            if not isinstance(key, str):
                raise src.error(path, f"key {key!r} must be a string")
            if key in out:
                line = key_node.start_mark.line + 1
                raise PlaybookError(
                    f"{src.file}:{line}: {format_path((*path, key))}: duplicate key"
                )
            out[key] = _convert(value_node, (*path, key), src)
            src.lines[(*path, key)] = key_node.start_mark.line + 1
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_convert(item, (*path, i), src) for i, item in enumerate(node.value)]
    return _scalar(node)


def _scalar(node: yaml.Node) -> Any:
    """Resolve a scalar's type (int, float, bool, null, str) exactly as yaml.safe_load does."""
    constructor = yaml.constructor.SafeConstructor()
    return constructor.construct_object(node, deep=True)


def load_text(text: str, file: str = "<string>") -> tuple[Any, Source]:
    """Parse YAML text; return (data, source). YAML syntax errors become PlaybookError."""
    src = Source(file=file)
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        line = mark.line + 1 if mark is not None else 1
        raise PlaybookError(
            f"{file}:{line}: not valid YAML: {exc.problem}",
            hint="check indentation and quoting around that line",
        ) from None
    except yaml.YAMLError as exc:
        raise PlaybookError(f"{file}: not valid YAML: {exc}") from None
    if node is None:
        raise PlaybookError(
            f"{file}:1: the playbook is empty", hint="see playbooks/quickstart.yaml"
        )
    return _convert(node, (), src), src


def load_file(path: Path) -> tuple[Any, Source]:
    """Read and parse a playbook file."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise PlaybookError(
            f"{path}: cannot read playbook: {exc.strerror or exc}",
            hint="shipped playbooks are in playbooks/",
        ) from None
    return load_text(text, str(path))
