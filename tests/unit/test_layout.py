"""Where things live: the model never imports the harness; every benchmark speaks --json."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from harness.run import run

ROOT = Path(__file__).resolve().parents[2]
BENCHES = sorted((ROOT / "bench").glob("bench_*.py"))


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_nothing_under_kernel_model_imports_the_harness() -> None:
    files = sorted((ROOT / "kernel-model").rglob("*.py"))
    assert len(files) > 15
    offenders = {
        str(f.relative_to(ROOT)): sorted(
            m for m in imported_modules(f) if m.split(".")[0] == "harness"
        )
        for f in files
    }
    assert {f: m for f, m in offenders.items() if m} == {}


def test_benchmarks_live_in_bench_only() -> None:
    assert [p.name for p in BENCHES] == [
        "bench_density.py", "bench_doctor.py", "bench_guests.py", "bench_model_memory.py",
        "bench_model_vs_kernel.py", "bench_shadow.py", "bench_twin.py",
    ]  # fmt: skip
    strays = [
        str(p.relative_to(ROOT))
        for p in ROOT.rglob("*bench*.py")
        if p.parent.name != "bench" and ".venv" not in p.parts
    ]
    assert strays == []


@pytest.mark.parametrize("bench", BENCHES, ids=lambda p: p.stem)
def test_every_benchmark_takes_json(bench: Path) -> None:
    import sys

    out = run([sys.executable, str(bench), "--help"], cwd="/", timeout=120).stdout
    assert "--json FILE" in out
    makefile = (ROOT / "Makefile").read_text()
    assert f"bench/{bench.name} --json $(BENCH_OUT)/" in makefile


TOP = ("harness", "bench", "tests", "kernel-model", "guest-images", "monitoring", "playbooks",
       "scripts")  # fmt: skip
_ALT = "|".join(map(re.escape, TOP))
_PATH = re.compile(rf"(?<![\w./-])((?:{_ALT})/[\w./-]*[\w/])(?![\w*])")  # not a glob
# Paths that name no file on purpose: the example file of an error message.
EXAMPLES = {"playbooks/x.yaml"}


def cited_paths(text: str) -> set[str]:
    """Repository paths a text cites: a top-level directory, then more path."""
    return {m.group(1) for m in _PATH.finditer(text)} - EXAMPLES


def test_readme_and_docstrings_cite_only_files_in_the_repo() -> None:
    sources = [ROOT / "README.md", *ROOT.glob("harness/**/*.py"), *ROOT.glob("bench/*.py"),
               ROOT / "Makefile", ROOT / "guest-images" / "Makefile"]  # fmt: skip
    missing = {
        f"{src.relative_to(ROOT)}: {p}"
        for src in sources
        for p in cited_paths(src.read_text())
        if not (ROOT / p.rstrip("/")).exists()
    }
    assert sorted(missing) == []
