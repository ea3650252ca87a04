"""Read the harness's YAML files (playbooks, inventories, scenarios) safely, keeping line numbers.

Every value's path (e.g. ("phases", 0, "steps", 2, "fill")) maps to the 1-based line it came
from, so validation errors name file, line and field (harness.validation). Careless or hostile
input is refused in one line, quickly and with bounded memory, before any of it is built:
- only regular files up to MAX_BYTES are read (a FIFO, /dev/zero or a directory is refused
  without reading or blocking), and only UTF-8 text;
- no anchors, aliases or merge keys (`<<`): a document is what it says, and an alias bomb or
  a merge key cannot expand it;
- nesting deeper than MAX_DEPTH, explicit tags (`!!python/object`, `!foo`, `!!str`) and scalars
  over MAX_SCALAR characters are refused; numbers over MAX_NUMBER characters too (Python's int()
  of thousands of digits is slow or refused).
The parse uses libyaml when PyYAML has it (a 256 KiB document in well under a second).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from harness.errors import HarnessError

PathKey = tuple[str | int, ...]
MAX_BYTES = 256 * 1024
MAX_DEPTH = 32
MAX_SCALAR = 4096
MAX_NUMBER = 64

_Loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_INT = "tag:yaml.org,2002:int"
_FLOAT = "tag:yaml.org,2002:float"
_MERGE = "tag:yaml.org,2002:merge"
_NODE_EVENTS = (yaml.ScalarEvent, yaml.SequenceStartEvent, yaml.MappingStartEvent)


def format_path(path: PathKey) -> str:
    """("phases", 0, "steps", 2, "fill") -> "phases[0].steps[2].fill"."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            # A key with a newline or other unprintable text is quoted: messages stay one line.
            name = part if part.isprintable() and part.strip() == part else repr(part)
            out += ("." if out else "") + name
    return out


@dataclass
class Source:
    """Where a document came from, and the line of every value in it.

    `error` builds the document kind's HarnessError subclass (PlaybookError, InventoryError,
    ScenarioError) reading `FILE:LINE: FIELD: message`; `hint` is the hint of errors that have
    none of their own.
    """

    file: str
    error_type: type[HarnessError] = HarnessError
    hint: str | None = None
    lines: dict[PathKey, int] = field(default_factory=dict)

    def line(self, path: PathKey) -> int:
        """The line of `path`, or of its nearest ancestor that has one."""
        p = tuple(path)
        while p:
            if p in self.lines:
                return self.lines[p]
            p = p[:-1]
        return self.lines.get((), 1)

    def error(self, path: PathKey, message: str, hint: str | None = None) -> HarnessError:
        """The error for `path`: `FILE:LINE: FIELD: message`, with a hint."""
        where = format_path(path) or "(top level)"
        return self.at_line(self.line(path), f"{where}: {message}", hint)

    def at_line(self, line: int, message: str, hint: str | None = None) -> HarnessError:
        """`FILE:LINE: message`; just `message` for data that came from no file."""
        prefix = f"{self.file}:{line}: " if self.file else ""
        return self.error_type(prefix + message, hint=hint or self.hint)


def read_text(path: Path, src: Source, what: str, max_bytes: int = MAX_BYTES) -> str:
    """The text of a regular UTF-8 file of at most max_bytes; src's error type otherwise."""

    def fail(problem: str, hint: str | None = None) -> HarnessError:
        return src.error_type(f"{path}: cannot read {what}: {problem}", hint=hint or src.hint)

    too_big = f"more than the {max_bytes // 1024} KiB a {what} may be"
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; it is refused just below.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as exc:
        raise fail(exc.strerror or str(exc)) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = _file_kind(st.st_mode)
            raise fail(f"it is {kind}, not a regular file", hint=f"pass a {what} YAML file")
        if st.st_size > max_bytes:
            raise fail(f"{st.st_size} bytes, {too_big}")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as exc:
        raise fail(exc.strerror or str(exc)) from None
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise fail(too_big)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise src.at_line(
            line,
            f"not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})",
            hint=f"save the {what} as UTF-8",
        ) from None


def _file_kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def load_text(text: str, src: Source, what: str) -> Any:
    """Parse YAML text into plain data (dict/list/str/int/float/bool/None), recording lines."""
    if len(text) > MAX_BYTES:
        raise src.at_line(1, f"the {what} is longer than {MAX_BYTES // 1024} KiB")
    _check_events(text, src)
    try:
        node = yaml.compose(text, Loader=_Loader)
    except yaml.YAMLError as exc:  # the event pass saw the same text; kept as a safety net
        raise _syntax_error(exc, src) from None
    if node is None:
        raise src.at_line(1, f"the {what} is empty", hint=src.hint)
    return _convert(node, (), src)


def _check_events(text: str, src: Source) -> None:
    """One pass over the parse events: syntax, depth, anchors/aliases, tags, scalar sizes."""
    depth = 0
    try:
        for event in yaml.parse(text, Loader=_Loader):
            line = event.start_mark.line + 1 if event.start_mark is not None else 1
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
                raise src.at_line(
                    line,
                    "YAML anchors and aliases (&name, *name) are not accepted",
                    hint="write the values out (an inventory's `defaults:` block shares fields)",
                )
            tag = getattr(event, "tag", None)
            if isinstance(event, _NODE_EVENTS) and tag not in (None, "!"):
                raise src.at_line(
                    line,
                    f"YAML tags ({tag}) are not accepted",
                    hint="remove the tag; quote a value to make it a string",
                )
            if isinstance(event, yaml.ScalarEvent) and len(event.value) > MAX_SCALAR:
                raise src.at_line(
                    line,
                    f"a value of {len(event.value)} characters is too long",
                    hint=f"values are at most {MAX_SCALAR} characters",
                )
            if isinstance(event, yaml.SequenceStartEvent | yaml.MappingStartEvent):
                depth += 1
                if depth > MAX_DEPTH:
                    raise src.at_line(line, f"nested more than {MAX_DEPTH} levels deep")
            elif isinstance(event, yaml.SequenceEndEvent | yaml.MappingEndEvent):
                depth -= 1
    except yaml.YAMLError as exc:
        raise _syntax_error(_python_parser_error(text) or exc, src) from None


def _python_parser_error(text: str) -> yaml.YAMLError | None:
    """The pure-Python parser's error for text libyaml refused (its wording is clearer)."""
    try:
        for _ in yaml.parse(text, Loader=yaml.SafeLoader):
            pass
    except yaml.YAMLError as exc:
        return exc
    return None


def _syntax_error(exc: yaml.YAMLError, src: Source) -> HarnessError:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    if isinstance(exc, yaml.reader.ReaderError):
        return src.at_line(
            1,
            f"not valid YAML: unacceptable character #x{exc.character:04x} "
            f"at offset {exc.position}",
            hint="remove control characters from the file",
        )
    problem = getattr(exc, "problem", None) or getattr(exc, "context", None) or "syntax error"
    line = mark.line + 1 if mark is not None else 1
    return src.at_line(
        line,
        f"not valid YAML: {' '.join(str(problem).split())}",
        hint="check indentation and quoting around that line",
    )


def _convert(node: yaml.Node, path: PathKey, src: Source) -> Any:
    src.lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            line = key_node.start_mark.line + 1
            if key_node.tag == _MERGE:
                raise src.at_line(
                    line,
                    f"{format_path(path) or '(top level)'}: YAML merge keys (<<) are not accepted",
                    hint="write the fields out (an inventory's `defaults:` block shares fields)",
                )
            key = _scalar(key_node, path, src) if isinstance(key_node, yaml.ScalarNode) else None
            if not isinstance(key, str):
                shown = key_node.value if isinstance(key_node, yaml.ScalarNode) else "a collection"
                raise src.at_line(
                    line,
                    f"{format_path(path) or '(top level)'}: key {shown!r} must be a string",
                    hint="quote the key",
                )
            if key in out:
                raise src.at_line(
                    line, f"{format_path((*path, key))}: duplicate key", hint="remove one of them"
                )
            out[key] = _convert(value_node, (*path, key), src)
            src.lines[(*path, key)] = line
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_convert(item, (*path, i), src) for i, item in enumerate(node.value)]
    return _scalar(node, path, src)


def _scalar(node: yaml.Node, path: PathKey, src: Source) -> Any:
    """Resolve a scalar's type (int, float, bool, null, str) exactly as yaml.safe_load does."""
    if node.tag in (_INT, _FLOAT) and len(node.value) > MAX_NUMBER:
        raise src.error(
            path,
            f"a number of {len(node.value)} characters is too long",
            hint="quote it if it is text",
        )
    try:
        # A fresh constructor: one keeps every node it built (memory, and not thread-safe).
        return yaml.constructor.SafeConstructor().construct_object(node)
    except (yaml.YAMLError, ValueError) as exc:
        # PyYAML's message spans lines (problem, then "in <unicode string>, line 1"): the
        # problem alone, on one line; the location is ours.
        problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
        raise src.error(path, f"cannot read {node.value[:40]!r}: {problem}") from None
