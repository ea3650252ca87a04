"""`ksmh fleet up / list / exec / down` end to end with one real guest (mem-merge off)."""

from __future__ import annotations

import argparse
import re

import pytest

from harness.errors import HarnessError
from harness.guests import cli

pytestmark = pytest.mark.qemu


def ksmh(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="ksmh")
    sub = parser.add_subparsers(dest="command")
    cli.register(sub)
    args = parser.parse_args(list(argv))
    return int(args.func(args))


def test_fleet_up_exec_list_down(capsys: pytest.CaptureFixture[str]) -> None:
    assert ksmh("fleet", "up", "--count", "1", "--memory", "128", "--accel", "tcg",
                "--no-mem-merge") == 0  # fmt: skip
    out = capsys.readouterr().out
    run_id = re.search(r"^run id: (\S+)$", out, re.M).group(1)  # type: ignore[union-attr]
    name = f"ksmh-{run_id}-g00"
    try:
        assert f"{name}  ok" in out
        assert ksmh("fleet", "exec", "--run", run_id, "--", "fill", "a", "4M", "byte:7") == 0
        assert f"{name}  ok" in capsys.readouterr().out
        assert ksmh("fleet", "exec", "--run", run_id, "--", "verify", "a") == 0
        assert "mismatched=0 bad_pages=0 pages=1024" in capsys.readouterr().out
        assert ksmh("fleet", "exec", "--run", run_id, "--", "nonsense") == 1
        assert "FAILED" in capsys.readouterr().out
        assert ksmh("fleet", "list") == 0
        assert re.search(rf"{name}  ready +pid \d+", capsys.readouterr().out)
    finally:
        assert ksmh("fleet", "down", "--run", run_id) == 0
    assert f"run {run_id}: 1 guest stopped" in capsys.readouterr().out
    with pytest.raises(HarnessError, match=f"no fleet run '{run_id}'"):
        ksmh("fleet", "exec", "--run", run_id, "--", "ping")
