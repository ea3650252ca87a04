"""README.md's Python blocks run as written, so they cannot rot.

Every ```python block is extracted and run in a fresh interpreter from a scratch directory:
on the real kernel's KSM and with real guests where the block uses them (never a fake), under
the host KSM lock (taken by the block itself where the README shows it, else held here while
the block runs), with every knob compared before and after. A comment `# -> VALUE` after an
expression is checked: the block is rewritten (AST) so that the expression's value must equal
VALUE (a Python literal; `...` in a dict means "these keys at least"). A block the table below
does not know fails the suite until someone says how it runs.
"""

from __future__ import annotations

import ast
import io
import re
import sys
import tokenize
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness.errors import ScanTimeout
from harness.ksm.lock import ksm_lock
from harness.ksm.sysfs import SysfsBackend
from harness.ksm.types import Tunables
from harness.procfs import ksm_users
from harness.run import run

README = Path(__file__).resolve().parents[2] / "README.md"
ARROW = "# -> "


@dataclass(frozen=True)
class Block:
    """One fenced code block: the headings above it, where it starts, its text."""

    where: str  # "H2 > H3", the headings it sits under
    line: int  # README line of its first code line
    lang: str
    code: str


def blocks(text: str) -> list[Block]:
    found: list[Block] = []
    heads: dict[int, str] = {}
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^(#{2,4}) (.+)$", lines[i])
        if m:
            level = len(m.group(1))
            heads = {k: v for k, v in heads.items() if k < level} | {level: m.group(2)}
        fence = re.match(r"^```(\w*)\s*$", lines[i])
        if fence:
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            where = " > ".join(heads[k] for k in sorted(heads))
            found.append(Block(where, i + 2, fence.group(1), "\n".join(lines[i + 1 : end]) + "\n"))
            i = end
        i += 1
    return found


@dataclass(frozen=True)
class Way:
    """How a block runs: `lock` "self" (it takes the host lock), "held" (held here while it
    runs: it boots mergeable guests) or "none" (no real KSM); `pytest`: it is a test file."""

    lock: str
    marks: tuple[pytest.MarkDecorator, ...] = ()
    pytest: bool = False
    arrows: int = 0  # `# -> ` checks it must contain (so a check cannot silently vanish)

    @property
    def kernel(self) -> bool:
        return self.lock != "none"


GUESTS = (pytest.mark.ksm_kernel, pytest.mark.qemu, pytest.mark.fleet)
WAYS = {
    "Python API": Way("self", (pytest.mark.ksm_kernel,), arrows=1),
    "Guest fleets (`harness/guests/`, `guest-images/`) > Python API": Way("held", GUESTS, arrows=1),
    "The KSM model (`kernel-model/`, import package `ksm_model`)": Way("none", arrows=2),
    "Scenarios: the same workload on the real kernel and on the model > Running": Way(
        "self", (pytest.mark.ksm_kernel,), arrows=1
    ),
    "Writing KSM test suites: the pytest plugin": Way("self", GUESTS, pytest=True),
}
PYTHON = [b for b in blocks(README.read_text()) if b.lang == "python"]


def test_every_python_block_is_known() -> None:
    assert sorted(b.where for b in PYTHON) == sorted(WAYS)


# -- `# -> VALUE` checks ----------------------------------------------------------------------
PREAMBLE = """
import ast as _ast

def _readme_check(value, expected_text, line):
    subset = "..." in expected_text
    text = expected_text.replace(", ...", "").replace("..., ", "")
    expected = _ast.literal_eval(text)
    if subset:
        ok = isinstance(value, dict) and all(
            k in value and value[k] == v for k, v in expected.items())
    else:
        ok = value == expected
    if not ok:
        raise AssertionError(f"README.md:{line}: {value!r} is not {expected_text}")
    print(f"checked README.md:{line}")
    return value
"""


def expected_literal(comment: str) -> str:
    """The literal after `# -> `: the longest prefix that parses (text may follow it)."""
    rest = comment.split(ARROW, 1)[1]
    for end in range(len(rest), 0, -1):
        candidate = rest[:end].strip()
        if end < len(rest) and rest[end] not in ": ":
            continue
        try:
            ast.literal_eval(candidate.replace(", ...", "").replace("..., ", ""))
        except (ValueError, SyntaxError):
            continue
        return candidate
    raise AssertionError(f"no Python literal after '# -> ' in {comment!r}")


def with_checks(block: Block) -> tuple[str, int]:
    """The block's code with every `expr  # -> VALUE` wrapped in _readme_check; how many."""
    comments = {
        tok.start[0]: tok.string
        for tok in tokenize.generate_tokens(io.StringIO(block.code).readline)
        if tok.type == tokenize.COMMENT and tok.string.startswith(ARROW)
    }
    tree = ast.parse(block.code)
    checked = 0
    for node in ast.walk(tree):
        if isinstance(node, ast.Expr) and node.end_lineno in comments:
            line = block.line + node.end_lineno - 1
            node.value = ast.Call(
                func=ast.Name("_readme_check", ast.Load()),
                args=[node.value, ast.Constant(expected_literal(comments[node.end_lineno])),
                      ast.Constant(line)],
                keywords=[],
            )  # fmt: skip
            checked += 1
    assert checked == len(comments), f"README.md:{block.line}: a '# -> ' not after an expression"
    return PREAMBLE + ast.unparse(ast.fix_missing_locations(tree)) + "\n", checked


def test_arrow_checks_parse_and_fail_on_a_wrong_value(tmp_path: Path) -> None:
    assert expected_literal('x  # -> "62\\n": 63 pages merged') == '"62\\n"'
    assert expected_literal("y  # -> {'a': 1, ...}") == "{'a': 1, ...}"
    wrong = Block("t", 10, "python", 'd = {"a": 1, "b": 2}\nd  # -> {"a": 1, ...}\n1 + 1  # -> 3\n')
    code, n = with_checks(wrong)
    assert n == 2
    out = run([sys.executable, "-c", code], cwd=tmp_path, check=False)
    assert out.stdout == "checked README.md:11\n"
    assert out.stderr.strip().endswith("AssertionError: README.md:12: 2 is not 3")


# -- running the blocks ------------------------------------------------------------------------
def _knobs() -> Tunables:
    with ksm_lock():
        return SysfsBackend().read_tunables()


def _settle(before: Tunables) -> Tunables:
    """Under the lock: drop merges the block's exited processes left counted (the pytest
    `ksm` fixture does the same), then put the knobs back; return what they were."""
    backend = SysfsBackend()
    with ksm_lock():
        after = backend.read_tunables()
        c = backend.read_counters()
        if (c.pages_shared or c.ksm_zero_pages) and not ksm_users():
            backend.apply({"run": 2}, force=True)
        assert backend.restore(before) == []
    return after


def _run_block(block: Block, way: Way, tmp: Path) -> str:
    if way.pytest:
        (tmp / "test_readme_block.py").write_text(block.code)
        argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                "test_readme_block.py"]  # fmt: skip
        proc = run(argv, cwd=tmp, check=False, timeout=600)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert re.search(r"^1 passed in ", proc.stdout, re.M), proc.stdout  # not skipped
        return proc.stdout
    code, checked = with_checks(block)
    assert checked == way.arrows
    argv = [sys.executable, "-c", code]
    if way.lock == "held":
        with ksm_lock():
            proc = run(argv, cwd=tmp, check=False, timeout=600)
    else:
        proc = run(argv, cwd=tmp, check=False, timeout=600)
    assert proc.returncode == 0, f"README.md:{block.line}:\n{proc.stdout}{proc.stderr}"
    assert proc.stdout.count("checked README.md:") == way.arrows
    return proc.stdout


@pytest.mark.parametrize(
    "block",
    [pytest.param(b, marks=WAYS[b.where].marks, id=f"line{b.line}") for b in PYTHON
     if b.where in WAYS],
)  # fmt: skip
def test_python_block_runs_as_written(block: Block, tmp_path: Path) -> None:
    way = WAYS[block.where]
    before = _knobs() if way.kernel else None
    try:
        _run_block(block, way, tmp_path)
    finally:
        if before is not None:
            assert _settle(before) == before, "the block left KSM knobs changed"


@pytest.mark.ksm_kernel
def test_the_documented_scan_timeout_is_what_an_empty_host_gets() -> None:
    """README "Python API": without mergeable memory, wait_full_scans says why it gave up."""
    text = README.read_text()
    start = text.index("whose `message` and\n`hint` say so:")
    message, hint = (ln.strip() for ln in text[start:].split("\n\n")[1].splitlines())
    backend = SysfsBackend()
    with ksm_lock():
        users = ksm_users()
        if users:
            pytest.skip(f"another process uses KSM: {users[0].describe()}")
        with backend.saved():
            backend.write_tunables(pages_to_scan=1000, sleep_millisecs=20, run=1)
            with pytest.raises(ScanTimeout) as info:
                backend.wait_full_scans(2, timeout=1.5)
    assert info.value.message == message.replace("in 60 s", "in 1.5 s")
    assert info.value.hint == hint
