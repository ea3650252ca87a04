"""ksmh as a real unprivileged user (nobody, via setpriv; see tests/integration/nobody.py).

Every subcommand either works without root or fails with one line and a hint: never a
traceback, never stray output (libvirt's error handler, paramiko's logger, matplotlib's config
warnings). A model-only run (`--backend model`, and `auto`, which falls back to the model)
boots real guests as nobody: runtime files in a private per-user directory, the guest image
in nobody's cache, and, since the host lock and the run journals are root's, without them and
with one notice saying what that means. The test holds the host lock for nobody's runs: their
guests' RAM is mergeable, and other harness users on this host must not see it.
"""

from __future__ import annotations

import json
import re
import signal
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.journal import JOURNAL_DIR, journals
from harness.ksm.lock import ksm_lock
from harness.ksm.sysfs import SysfsBackend
from harness.playbook.runner import UNGUARDED
from tests.integration.conftest import free_port
from tests.integration.nobody import UID, Nobody, as_nobody
from tests.integration.test_run_quickstart import qemu_processes_of

pytestmark = pytest.mark.ksm_kernel  # root, to become nobody; a host with KSM

TINY = """\
name: tiny-nobody
fleet: {count: 1, memory_mib: 128, image: busybox, backend: qemu, accel: auto}
ksm: {pages_to_scan: 2000, sleep_millisecs: 10}
phases:
  - name: fill
    steps:
      - fill: {region: a, size: 16MiB, pattern: "byte:0x5a"}
      - ksm: {run: 1}
      - wait: {full_scans: +2}
      - expect:
          - "saved_bytes >= 15MiB"
          - "kernel.pages_sharing >= 1"
"""


@pytest.fixture(scope="module")
def nobody() -> Iterator[Nobody]:
    with as_nobody() as n:
        n.check()
        (n.home / "tiny.yaml").write_text(TINY)
        yield n


def clean(out: str, err: str) -> None:
    """Nothing that is not ours: no traceback, no library chatter."""
    for text in (out, err):
        assert "Traceback" not in text, text
        for noise in ("libvirt: ", "Secsh channel", "matplotlib", "Matplotlib", "MPLCONFIGDIR"):
            assert noise not in text, text


def one_line_error(err: str, first: str, hint: str) -> None:
    lines = err.splitlines()
    assert len(lines) == 2, err
    assert lines[0] == f"ksmh: error: {first}"
    assert lines[1] == f"  hint: {hint}"


# ksmh ARGS as nobody: (exit status, error line, hint) or (exit status, None, None) for success.
PLAYBOOK = "{repo}/playbooks/quickstart.yaml"
INVENTORY = "{repo}/playbooks/inventory.example.yaml"
AUDIT = [
    (["status"], 0, None, None),
    (["status", "--json"], 0, None, None),
    (["watch", "--count", "2", "--interval", "0.1"], 0, None, None),
    (["set", "run=1"], 2, "run: permission denied writing KSM tunables",
     "run as root (sysfs KSM knobs are root-only)"),
    (["recover"], 2, "ksmh recover undoes what root's runs left (their journals, guests and "
     "KSM knobs): it needs root",
     "sudo ksmh recover; your own guests: `ksmh fleet list`, `ksmh fleet down --run ID`"),
    (["doctor", "--window", "0", "--no-content"], None, None, None),  # 0 or 1: findings
    (["fleet", "list"], 0, None, None),
    (["fleet", "down", "--all"], 0, None, None),
    (["fleet", "exec", "--", "ping"], 2, "no fleet is running",
     "start one with `ksmh fleet up --count N`"),
    (["run", PLAYBOOK, "--check"], 0, None, None),
    (["run", PLAYBOOK, "--backend", "kernel"], 2,
     "real KSM at /sys/kernel/mm/ksm is not writable (not root)", "run as root"),
    (["report", "."], 2, ".: no run.json here",
     "pass a results/<run-id> directory written by `ksmh run`"),
    (["compare", ".", "."], 2, ".: no run.json here",
     "pass a results/<run-id> directory written by `ksmh run`"),
    (["trend", "."], 2, "no run.json under .",
     "pass the results directories `ksmh run` wrote into (default results/)"),
    # The example inventory's key files do not exist: each host's row or line says so.
    (["hosts", "check", INVENTORY], 1, None, None),
    (["hosts", "prepare", INVENTORY], 1, None, None),
    (["hosts", "stop-exporter", INVENTORY], 1, None, None),
    (["monitoring", "config", INVENTORY, "--out", "mon"], 0, None, None),
]  # fmt: skip


@pytest.mark.parametrize(("args", "code", "error", "hint"), AUDIT, ids=lambda v: None)
def test_every_subcommand_without_root(
    nobody: Nobody, args: list[str], code: int | None, error: str | None, hint: str | None
) -> None:
    argv = [a.format(repo=nobody.top / "repo") for a in args]
    proc = nobody.ksmh(*argv, timeout=120)
    clean(proc.stdout, proc.stderr)
    if code is None:
        assert proc.returncode in (0, 1), proc.stderr
    else:
        assert proc.returncode == code, proc.stdout + proc.stderr
    if error is not None and hint is not None:
        one_line_error(proc.stderr, error, hint)
    elif code == 0:
        assert proc.stderr == ""


def test_doctor_and_status_say_what_they_cannot_see(nobody: Nobody) -> None:
    doctor = nobody.ksmh("doctor", "--window", "0", "--no-content")
    (line,) = [ln for ln in doctor.stdout.splitlines() if ln.startswith("not checked:")]
    assert re.fullmatch(
        r"not checked: not root: other users' processes( \(\d+ examined\))?, page contents "
        r"\(would-merge counts, volatility\), page frames \(THP, KSM pages, the sharing "
        r"matrix\) and knob writers were not checked",
        line,
    )
    status = json.loads(nobody.ksmh("status", "--json").stdout)
    assert status["source"] == "kernel" and status["stale"] in (False, None)


def test_export_and_its_ctrl_c(nobody: Nobody) -> None:
    exporter = nobody.start("export", "--listen", f"127.0.0.1:{free_port()}", "--pid", "1")
    try:
        assert exporter.stdout is not None
        assert exporter.stdout.readline().startswith(b"ksmh: exporting kernel KSM metrics on ")
        exporter.send_signal(signal.SIGINT)
        _, err = exporter.communicate(timeout=20)
    finally:
        exporter.kill()
        exporter.wait(10)
    assert exporter.returncode == 130
    assert err.decode().splitlines() == ["ksmh: interrupted"]  # pid 1 exists: nothing to say


def test_unwritable_cache_is_one_line(nobody: Nobody) -> None:
    # No XDG_CACHE_HOME: the cache would be in nobody's home, /nonexistent.
    proc = nobody.ksmh("fleet", "up", "--count", "1", "--no-mem-merge",
                       env={"XDG_CACHE_HOME": ""})  # fmt: skip
    clean(proc.stdout, proc.stderr)
    assert proc.returncode == 2
    one_line_error(
        proc.stderr,
        "cannot build the guest image in /nonexistent/.cache/ksm-harness/guest-images: "
        "Permission denied",
        "set KSM_HARNESS_CACHE (or XDG_CACHE_HOME, or KSM_HARNESS_IMAGE_DIR for the images "
        "alone) to a directory you can write",
    )


@pytest.mark.libvirt
def test_libvirt_stays_quiet_and_says_it_is_roots(nobody: Nobody) -> None:
    from harness.guests.libvirt_backend import LibvirtBackend

    LibvirtBackend().close()  # as root: libvirtd runs (started if needed, as the fleets do)
    listing = nobody.ksmh("fleet", "list")  # connects to libvirt to look for leftovers
    assert (listing.returncode, listing.stdout, listing.stderr) == (0, "no fleets\n", "")
    up = nobody.ksmh("fleet", "up", "--backend", "libvirt", "--count", "1")
    clean(up.stdout, up.stderr)
    assert up.returncode == 2
    lines = up.stderr.splitlines()
    assert lines[0].startswith("ksmh: error: cannot connect to libvirt at qemu:///system: ")
    assert lines[1:] == [
        "  hint: qemu:///system is root's: run as root, or boot plain QEMU guests (backend "
        "qemu), which any user can"
    ]


def runtime_dir(nobody: Nobody) -> Path:
    return nobody.home / "tmp" / f"ksm-harness-{UID}"


@pytest.mark.qemu
@pytest.mark.fleet
def test_fleet_by_hand_without_root(nobody: Nobody) -> None:
    up = nobody.ksmh("fleet", "up", "--count", "1", "--memory", "128", "--no-mem-merge")
    clean(up.stdout, up.stderr)
    assert up.returncode == 0, up.stdout + up.stderr
    run_id = up.stdout.splitlines()[-1].removeprefix("run id: ")
    try:
        top = runtime_dir(nobody)
        for d in (top, top / "fleet"):  # private: guest sockets there take commands
            st = d.stat()
            assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (UID, 0o700), d
        assert (top / "fleet" / run_id / "run.json").is_file()
        listing = nobody.ksmh("fleet", "list")
        assert listing.stdout.splitlines()[0].startswith(f"run {run_id}  qemu  accel tcg  128 MiB")
        ping = nobody.ksmh("fleet", "exec", "--", "ping")
        assert (ping.returncode, ping.stdout.split()[-1]) == (0, "pong")
    finally:
        down = nobody.ksmh("fleet", "down", "--run", run_id)
    assert down.stdout.splitlines()[0] == f"run {run_id}: 1 guest stopped"
    assert qemu_processes_of(run_id) == []
    assert list((runtime_dir(nobody) / "fleet").iterdir()) == []


@pytest.mark.qemu
@pytest.mark.fleet
@pytest.mark.parametrize("backend", ["model", "auto"])
def test_model_only_run_without_root(nobody: Nobody, backend: str) -> None:
    sysfs = SysfsBackend()
    with ksm_lock():  # for nobody's guests, whose RAM is mergeable
        knobs = sysfs.read_tunables()
        proc = nobody.ksmh("run", "tiny.yaml", "--backend", backend, "--export", "off",
                           "--out", f"results-{backend}", timeout=600)  # fmt: skip
        assert sysfs.read_tunables() == knobs  # nobody changed no knob
    clean(proc.stdout, proc.stderr)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    err = proc.stderr.splitlines()
    banner = {
        "model": "*** KSM backend: the model alone (--backend model); no real KSM ***",
        "auto": "*** real KSM at /sys/kernel/mm/ksm is not writable (not root): running the "
        "model alone ***",
    }[backend]
    assert err[0] == banner
    assert [ln.split("] ", 1)[1] for ln in err if UNGUARDED in ln] == [UNGUARDED]
    assert not any("waiting for the host KSM lock" in ln for ln in err)
    assert proc.stdout.splitlines()[0] == "2 expectations: 1 held, 1 skipped"
    (results,) = (nobody.home / f"results-{backend}").iterdir()
    assert results.stat().st_uid == UID
    run = json.loads((results / "run.json").read_text())
    assert (run["backend"], run["unguarded"]) == ("model", UNGUARDED)
    assert run["verdict"]["expectations"] == {"passed": 1, "failed": 0, "skipped": 1}
    assert f"> {UNGUARDED}" in (results / "report.md").read_text()
    assert (results / "counters.png").stat().st_size > 5000
    assert qemu_processes_of(run["fleet_run_id"]) == []
    assert list((runtime_dir(nobody) / "fleet").iterdir()) == []
    assert [j for j in journals(JOURNAL_DIR) if "tiny-nobody" in j.name] == []  # none written
    report = nobody.ksmh("report", str(results))  # re-rendered by nobody, quietly
    clean(report.stdout, report.stderr)
    assert (report.returncode, report.stderr) == (0, "")
