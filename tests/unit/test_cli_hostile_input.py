"""Hostile and careless input through the real `ksmh` command (a subprocess each): one error
line plus a hint, exit status 2, no traceback, promptly and with bounded memory.

"Promptly" is CPU time (user + system, from wait4's rusage: wall time on a shared 2-core
machine measures the neighbours), against `ksmh --version` run just before: the handling must
add less than a second. A hang fails on the 20 s wall-clock limit. Memory is the child's peak
RSS."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MAX_RSS_KIB = 300 * 1024
BASE = "name: t\nfleet: {count: 2}\nphases:\n  - name: p\n    steps:\n"


# Runs ksmh as its grandchild and prints the grandchild's CPU seconds and peak RSS. Needed
# because a process exec'd by pytest inherits pytest's peak RSS: the kernel records the
# pre-exec mm's high-water mark (vfork shares pytest's mm) in the process's maxrss, which
# wait4 then reports. A child forked by this small launcher starts a fresh maxrss.
LAUNCHER = """
import os, sys
pid = os.fork()
if pid == 0:
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    os.execv(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
print(usage.ru_utime + usage.ru_stime, usage.ru_maxrss, os.waitstatus_to_exitcode(status))
"""


def ksmh(*args: str, cwd: Path | None = None) -> tuple[int, str, float, int]:
    """(exit status, stderr, CPU seconds, peak RSS KiB) of one `ksmh` run."""
    env = {**os.environ, "KSM_HARNESS_LOCK": os.environ.get("KSM_HARNESS_LOCK", "")}
    proc = subprocess.Popen(
        [sys.executable, "-S", "-c", LAUNCHER, sys.executable, "-m", "harness.cli", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=cwd or ROOT,
        env=env,
        start_new_session=True,  # a hang is killed with its launcher
    )
    # A hang is a failure, not a stuck suite.
    timer = threading.Timer(20, os.killpg, (proc.pid, 9))
    timer.start()
    try:
        out, err = proc.communicate()
    finally:
        timer.cancel()
    assert proc.returncode == 0, f"ksmh did not finish (launcher exit {proc.returncode})"
    seconds, rss, code = out.split()
    return int(code), err.decode(), float(seconds), int(rss)


@pytest.fixture(scope="module")
def baseline() -> float:
    """CPU seconds `ksmh --version` takes (interpreter start-up and the CLI's imports)."""
    return min(ksmh("--version")[2] for _ in range(2))


def check(baseline: float, args: list[str], message: str, hint: str) -> None:
    code, err, seconds, rss = ksmh(*args)
    assert (code, err) == (2, f"ksmh: error: {message}\n  hint: {hint}\n")
    assert seconds - baseline < 1.0, f"{seconds:.2f} s CPU (start-up {baseline:.2f} s)"
    assert rss < MAX_RSS_KIB, f"peak RSS {rss} KiB"


YAML_HINT = "check indentation and quoting around that line"
PB_HINT = "see playbooks/quickstart.yaml and the README's playbook format"


def _bomb() -> str:
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, 10):
        prev, cur = chr(ord("a") + i - 1), chr(ord("a") + i)
        lines.append(f"{cur}: &{cur} [{', '.join(['*' + prev] * 9)}]")
    return "\n".join(lines) + "\n"


CASES: list[tuple[str, bytes, str, str]] = [
    (
        "alias-bomb",
        _bomb().encode(),
        "{f}:1: YAML anchors and aliases (&name, *name) are not accepted",
        "write the values out (an inventory's `defaults:` block shares fields)",
    ),
    (
        "long-integer",
        ("name: t\nfleet: {count: " + "9" * 5000 + "}\n").encode(),
        "{f}:2: a value of 5000 characters is too long",
        "values are at most 4096 characters",
    ),
    (
        "long-number",
        ("name: t\nfleet: {count: " + "9" * 1000 + "}\n").encode(),
        "{f}:2: fleet.count: a number of 1000 characters is too long",
        "quote it if it is text",
    ),
    (
        "not-utf8",
        b"name: t\nfleet: {count: 2}\ndescription: caf\xe9\n",
        "{f}:3: not UTF-8 text (byte 0xe9 at offset 42)",
        "save the playbook as UTF-8",
    ),
    (
        "deep-nesting",
        ("name: " + "[" * 100_000 + "]" * 100_000 + "\n").encode(),
        "{f}:1: nested more than 32 levels deep",
        PB_HINT,
    ),
    (
        "python-tag",
        b"name: t\nfleet: !!python/object/apply:os.system ['true']\n",
        "{f}:2: YAML tags (tag:yaml.org,2002:python/object/apply:os.system) are not accepted",
        "remove the tag; quote a value to make it a string",
    ),
    (
        "huge-guest-range",
        (BASE + '      - verify: {guests: "0-999999999"}\n').encode(),
        "{f}:6: phases[0].steps[0].verify.guests: guest index 999999999 is outside any fleet "
        "(0..255)",
        "guests: all, an index, a range like 0-2 or a list of indices",
    ),
    (
        "too-big",
        b"# " + b"x" * (300 * 1024) + b"\n",
        "{f}: cannot read playbook: 307203 bytes, more than the 256 KiB a playbook may be",
        PB_HINT,
    ),
    (
        "decimal-size",
        (BASE + "      - fill: {size: 64MB, pattern: zero}\n").encode(),
        "{f}:6: phases[0].steps[0].fill.size: '64MB': MB is a decimal unit; write 64MiB "
        "(or 64M) for the binary size",
        "sizes take K/KiB, M/MiB, G/GiB, T/TiB (binary: 1M = 1024 KiB); a bare number means bytes",
    ),
    (
        "inventory-as-playbook",
        (ROOT / "playbooks" / "inventory.example.yaml").read_bytes(),
        "{f}:9: known_hosts: unknown field 'known_hosts': this looks like an inventory, not a "
        "playbook",
        "run a playbook on an inventory's hosts with `ksmh run --inventory FILE PLAYBOOK`",
    ),
]


@pytest.mark.parametrize(("name", "content", "message", "hint"), CASES, ids=[c[0] for c in CASES])
def test_bad_playbooks(
    tmp_path: Path, baseline: float, name: str, content: bytes, message: str, hint: str
) -> None:
    f = tmp_path / f"{name}.yaml"
    f.write_bytes(content)
    check(baseline, ["run", "--check", str(f)], message.format(f=f), hint)


def test_a_fifo_and_a_device_are_refused_without_reading(tmp_path: Path, baseline: float) -> None:
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)  # nobody ever writes to it: reading would block for ever
    what = "cannot read playbook: it is {}, not a regular file"
    check(baseline, ["run", "--check", str(fifo)], f"{fifo}: {what.format('a FIFO')}",
          "pass a playbook YAML file")  # fmt: skip
    device = what.format("a character device")
    check(baseline, ["run", "--check", "/dev/zero"], f"/dev/zero: {device}",
          "pass a playbook YAML file")  # fmt: skip


def test_inventory_merge_keys(tmp_path: Path, baseline: float) -> None:
    inv = tmp_path / "inv.yaml"
    inv.write_text("hosts:\n  a:\n    <<: {user: u, key_file: k}\n    address: h\n")
    check(baseline, ["hosts", "check", str(inv)],
          f"{inv}:3: hosts.a: YAML merge keys (<<) are not accepted",
          "write the fields out (an inventory's `defaults:` block shares fields)")  # fmt: skip


def test_bad_numbers_on_the_command_line(baseline: float) -> None:
    listen = "127.0.0.1:\u00b2"
    check(baseline, ["export", "--backend", "model", "--listen", listen],
          f"bad listen address {listen!r}", "use HOST:PORT, e.g. 127.0.0.1:9712")  # fmt: skip
    for value in ("nan", "inf", "-1", "0"):
        check(baseline, ["watch", "--backend", "model", "--interval", value],
              f"--interval {float(value)}: must be a number of seconds above 0",
              "e.g. --interval 1 (at most 86400.0)")  # fmt: skip
    check(baseline, ["fleet", "up", "--count", "1", "--memory", "256MB"],
          "'256MB': MB is a decimal unit; write 256MiB (or 256M) for the binary size",
          "sizes take K/KiB, M/MiB, G/GiB, T/TiB (binary: 1M = 1024 KiB); a bare number means "
          "MiB")  # fmt: skip


RESULTS_HINT = "pass a results/<run-id> directory written by `ksmh run`"


@pytest.mark.parametrize(
    ("run_json", "problem", "hint"),
    [
        (b"[1, 2]", ": not a ksmh run record: expected a JSON object, got list", RESULTS_HINT),
        (b'{"phases": 5}', ": not a ksmh run record: phases: expected a list", RESULTS_HINT),
        (
            b'{"phases": [{"counters": 1}]}',
            ": not a ksmh run record: phases[0]: expected an object with a name",
            RESULTS_HINT,
        ),
        (
            b"[" * 100_000,
            ": not valid JSON: maximum recursion depth exceeded while decoding a "
            "JSON array from a unicode string",
            RESULTS_HINT,
        ),
        (
            b'{"a": 1',
            ": not valid JSON: Expecting ',' delimiter: line 1 column 8 (char 7)",
            RESULTS_HINT,
        ),
        (
            b"\xff\xfe",
            ":1: not UTF-8 text (byte 0xff at offset 0)",
            "save the results file as UTF-8",
        ),
    ],
)
def test_malformed_run_json(
    tmp_path: Path, baseline: float, run_json: bytes, problem: str, hint: str
) -> None:
    d = tmp_path / "r"
    d.mkdir()
    (d / "run.json").write_bytes(run_json)
    check(baseline, ["report", str(d)], f"{d / 'run.json'}{problem}", hint)


def test_run_json_with_wrong_insides_and_an_empty_directory(
    tmp_path: Path, baseline: float
) -> None:
    d = tmp_path / "r"
    d.mkdir()
    (d / "run.json").write_text(json.dumps({"phases": [{"name": "p", "counters": 7}]}))
    code, err, _, _ = ksmh("compare", str(d), str(d))
    assert code == 2 and err.startswith(f"ksmh: error: {d} or {d}: run.json is not a ksmh run")
    (tmp_path / "empty").mkdir()
    check(baseline, ["compare", str(d), str(tmp_path / "empty")],
          f"{tmp_path / 'empty'}: no run.json here", RESULTS_HINT)  # fmt: skip
