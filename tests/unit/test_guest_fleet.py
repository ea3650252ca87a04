"""Fleet logic against a fake backend whose guests are fake agents on real unix sockets:
parallel boot, per-guest results, partial failure, a guest dying mid-run, teardown, attach."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.errors import GuestBootTimeout, GuestError, HarnessError
from harness.guests.accel import AccelChoice
from harness.guests.backend import Leftover
from harness.guests.fleet import Fleet, guest_name, list_runs, wait_ksm_registered
from harness.guests.qemu_backend import QemuBackend, guest_name_of
from harness.guests.spec import FleetSpec, GuestImage, GuestSpec, default_concurrency
from harness.guests.thp import set_thp_disable, thp_disabled, thp_off_for_children
from harness.kinds import AccelKind, GuestBackendKind, ImageKind

IMAGE = GuestImage(Path("/k"), Path("/i"), "busybox", "6.1.0-t", "d1")


class FakeGuest:
    def __init__(self, spec: GuestSpec, ready: bool) -> None:
        self.spec = spec
        self.ready = ready
        self.alive = True
        self.conns: list[socket.socket] = []
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(spec.agent_socket))
        self.server.listen(4)
        self.said_ready = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        # Like QEMU's chardev socket: one client at a time, the next waits in the backlog.
        while self.alive:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            self.conns.append(conn)
            self._serve(conn)

    def _serve(self, conn: socket.socket) -> None:
        try:
            if self.ready and not self.said_ready:
                self.said_ready = True
                conn.sendall(f"ready index={self.spec.index} version=1\n".encode())
            buf = b""
            while True:
                data = conn.recv(4096)
                if not data:
                    return
                buf += data
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    rid, cmd, *_args = line.decode().split()
                    if cmd == "ping":
                        conn.sendall(f"{rid} ok pong index={self.spec.index}\n".encode())
                    else:
                        conn.sendall(f"{rid} err unknown command '{cmd}'\n".encode())
        except OSError:
            return

    def kill(self) -> None:
        self.alive = False
        for c in [self.server, *self.conns]:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
            c.close()


class FakeBackend:
    name = "fake"

    def __init__(self, never_ready: set[int] = frozenset(), fail_start: set[int] = frozenset()):  # type: ignore[assignment]
        self.never_ready = never_ready
        self.fail_start = fail_start
        self.guests: dict[str, FakeGuest] = {}
        self.stopped: list[str] = []

    def start(self, spec: GuestSpec) -> int:
        if spec.index in self.fail_start:
            raise GuestError(f"{spec.name}: cannot start (fake)")
        spec.runtime_dir.mkdir(parents=True, exist_ok=True)
        self.guests[spec.name] = FakeGuest(spec, spec.index not in self.never_ready)
        return 1000 + spec.index

    def alive(self, spec: GuestSpec) -> bool:
        g = self.guests.get(spec.name)
        return g is not None and g.alive

    def exit_reason(self, spec: GuestSpec) -> str:
        return "killed by the test"

    def stop(self, spec: GuestSpec, timeout: float = 5.0) -> None:
        g = self.guests.pop(spec.name, None)
        if g is not None:
            g.kill()
            self.stopped.append(spec.name)
        with contextlib.suppress(FileNotFoundError):
            spec.agent_socket.unlink()

    def leftovers(self) -> list[Leftover]:
        return []

    def remove_leftover(self, leftover: Leftover) -> None:
        pass


@pytest.fixture
def root() -> Iterator[Path]:
    # Short path: unix socket paths are limited to 108 bytes.
    path = Path(tempfile.mkdtemp(prefix="kf", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def make_fleet(
    root: Path, backend: FakeBackend, count: int = 3, ready_timeout: float = 5.0
) -> Fleet:
    return Fleet(
        FleetSpec(count, 128, ready_timeout=ready_timeout),
        backend=backend,  # type: ignore[arg-type]
        image=IMAGE,
        runtime_root=root,
        run_id="rtest",
        progress=False,
        accel_resolver=lambda req, img: AccelChoice(AccelKind.TCG, "test"),
    )


def test_boot_all_ready_records_pids_accel_and_run_file(root: Path) -> None:
    backend = FakeBackend()
    with make_fleet(root, backend) as fleet:
        assert fleet.pids() == {guest_name("rtest", i): 1000 + i for i in range(3)}
        result = fleet.run("ping")
        assert result.ok
        assert fleet.accel == AccelChoice(AccelKind.TCG, "test")
        assert result.field("index") == {guest_name("rtest", i): i for i in range(3)}
        [run] = list_runs(root)
        assert run["run_id"] == "rtest"
        assert [g["state"] for g in run["guests"]] == ["ready"] * 3
    assert sorted(backend.stopped) == [guest_name("rtest", i) for i in range(3)]
    assert not (root / "rtest").exists()


class SlowStartBackend(FakeBackend):
    """Guest 0 takes a while to start (as a QEMU setting up), guest 1 a little less; records
    when each start() began and returned."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: dict[int, tuple[float, float]] = {}

    def start(self, spec: GuestSpec) -> int:
        t0 = time.monotonic()
        time.sleep({0: 0.3, 1: 0.1}.get(spec.index, 0.0))
        pid = super().start(spec)
        self.calls[spec.index] = (t0, time.monotonic())
        return pid


def test_guests_start_one_after_another_in_index_order(root: Path) -> None:
    # ksmd walks mms in registration order and the model's shadow in start order (issue 12):
    # each guest starts only once the one before it has (and has registered with KSM).
    backend = SlowStartBackend()
    with make_fleet(root, backend, count=4):
        calls = backend.calls
        assert sorted(calls) == [0, 1, 2, 3]
        for i in range(3):
            assert calls[i + 1][0] >= calls[i][1], (i, calls)


def fake_proc(tmp: Path, pid: int, cmdline: str, ksm_stat: str, maps: str) -> Path:
    d = tmp / str(pid)
    d.mkdir(parents=True)
    (d / "stat").write_text(f"{pid} (qemu) S 1 " + " ".join(["0"] * 20) + "\n")
    (d / "cmdline").write_bytes(cmdline.replace(" ", "\0").encode())
    (d / "comm").write_text("qemu-ksmh\n")
    (d / "ksm_stat").write_text(ksm_stat)
    (d / "maps").write_text(maps)
    return tmp


NOT_YET = "ksm_rmap_items 0\nksm_zero_pages 0\nksm_merge_any: no\nksm_mergeable: no\n"
RAM_128M = "7f0000000000-7f0008000000 rw-p 00000000 00:00 0 \n"


def test_wait_ksm_registered(tmp_path: Path) -> None:
    ksm = tmp_path / "run"
    ksm.write_text("0\n")
    spec = GuestSpec(name="ksmh-rtest-g00", memory_mib=128, image=IMAGE, runtime_dir=tmp_path)
    qemu = "qemu-system-x86_64 -name guest=ksmh-rtest-g00 -machine pc,mem-merge=on"
    yes = NOT_YET.replace("mergeable: no", "mergeable: yes")
    proc = fake_proc(tmp_path / "a", 7, qemu, yes, RAM_128M)
    assert wait_ksm_registered(7, spec, 5.0, proc, ksm) is True
    # No wait at all: not our guest (a fake or remote pid), no KSM on this host, mem-merge
    # off, or RAM KSM never registers (shared memfd, hugetlbfs).
    t0 = time.monotonic()
    other = fake_proc(tmp_path / "b", 7, "sleep 100", NOT_YET, RAM_128M)
    assert wait_ksm_registered(7, spec, 5.0, other, ksm) is False
    assert wait_ksm_registered(7, spec, 5.0, proc, tmp_path / "none") is False
    off = qemu.replace("mem-merge=on", "mem-merge=off")
    memfd = RAM_128M.replace("rw-p", "rw-s").rstrip() + " /memfd:ram0 (deleted)\n"
    for i, (line, maps) in enumerate(((off, ""), (qemu, memfd))):
        never = fake_proc(tmp_path / f"c{i}", 7, line, NOT_YET, maps)
        assert wait_ksm_registered(7, spec, 5.0, never, ksm) is False
    assert time.monotonic() - t0 < 0.5
    # Right after Popen returns, the new image's command line can still read empty (about
    # one start in five here): that is not "someone else's process", keep waiting.
    mid_exec = fake_proc(tmp_path / "x", 7, "", NOT_YET, "")

    def exec_then_register() -> None:
        time.sleep(0.1)
        (mid_exec / "7" / "cmdline").write_bytes(qemu.replace(" ", "\0").encode())
        time.sleep(0.1)
        (mid_exec / "7" / "ksm_stat").write_text(yes)

    t0 = time.monotonic()
    threading.Thread(target=exec_then_register).start()
    assert wait_ksm_registered(7, spec, 5.0, mid_exec, ksm) is True
    assert 0.2 <= time.monotonic() - t0 < 1.0
    # Private anonymous RAM not madvised yet (a descheduled QEMU), or no RAM yet: the timeout.
    for i, maps in enumerate((RAM_128M, "")):
        t0 = time.monotonic()
        early = fake_proc(tmp_path / f"e{i}", 7, qemu, NOT_YET, maps)
        assert wait_ksm_registered(7, spec, 0.3, early, ksm) is False
        assert 0.3 <= time.monotonic() - t0 < 1.5


def test_guest_that_never_says_ready_fails_alone(root: Path) -> None:
    backend = FakeBackend(never_ready={1})
    fleet = make_fleet(root, backend, ready_timeout=0.5)
    try:
        boot = fleet.up()
        assert [r.ok for r in boot.values()] == [True, False, True]
        assert isinstance(boot["ksmh-rtest-g01"].error, GuestBootTimeout)
        assert "ksmh-rtest-g01" in backend.stopped  # a failed boot is stopped at once
        ping = fleet.run("ping")
        assert [n for n, r in ping.items() if not r.ok] == ["ksmh-rtest-g01"]
        with pytest.raises(GuestError, match=r"ping failed on 1 of 3 guests: ksmh-rtest-g01"):
            ping.raise_if_failed()
    finally:
        fleet.down()


def test_start_failure_is_reported_per_guest(root: Path) -> None:
    fleet = make_fleet(root, FakeBackend(fail_start={0}))
    try:
        boot = fleet.up()
        assert str(boot["ksmh-rtest-g00"].error) == "ksmh-rtest-g00: cannot start (fake)"
        assert [r.name for r in boot.succeeded] == ["ksmh-rtest-g01", "ksmh-rtest-g02"]
    finally:
        fleet.down()


def test_guest_killed_mid_run_fails_alone_and_stays_failed(root: Path) -> None:
    backend = FakeBackend()
    with make_fleet(root, backend) as fleet:
        assert fleet.run("ping").ok
        backend.guests["ksmh-rtest-g02"].kill()
        result = fleet.run("ping")
        assert [r.ok for r in result.values()] == [True, True, False]
        assert (
            str(result["ksmh-rtest-g02"].error) == "ksmh-rtest-g02: guest died: killed by the test"
        )
        again = fleet.run("ping")
        assert again["ksmh-rtest-g02"].error is result["ksmh-rtest-g02"].error
        assert "ksmh-rtest-g02" not in fleet.pids()
        assert fleet.run("ping", guests="0-1").ok


def test_agent_error_is_a_per_guest_error_not_a_death(root: Path) -> None:
    with make_fleet(root, FakeBackend(), count=2) as fleet:
        result = fleet.run("bogus")
        assert not result.ok and len(result.failed) == 2
        assert fleet.run("ping").ok  # guests still usable


def test_selection(root: Path) -> None:
    with make_fleet(root, FakeBackend(), count=4) as fleet:
        names = lambda sel: [g.spec.name[-3:] for g in fleet.select(sel)]  # noqa: E731
        assert names(None) == ["g00", "g01", "g02", "g03"]
        assert names("0,2") == ["g00", "g02"]
        assert names("1-2,2") == ["g01", "g02"]
        assert names(["ksmh-rtest-g03"]) == ["g03"]
        assert list(fleet.run("ping", guests="3")) == ["ksmh-rtest-g03"]
        with pytest.raises(HarnessError, match="no guest 'zz' in run rtest"):
            fleet.select("zz")
        with pytest.raises(HarnessError, match="no guest with index 9"):
            fleet.select("9")


def test_exception_inside_tears_everything_down(root: Path) -> None:
    backend = FakeBackend()
    with pytest.raises(RuntimeError), make_fleet(root, backend):
        raise RuntimeError("boom")
    assert len(backend.stopped) == 3 and backend.guests == {}
    assert not (root / "rtest").exists()


def test_sigterm_inside_tears_everything_down(root: Path) -> None:
    backend = FakeBackend()
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt), make_fleet(root, backend):
        os.kill(os.getpid(), signal.SIGTERM)
    assert len(backend.stopped) == 3
    assert signal.getsignal(signal.SIGTERM) == before


def test_detach_and_attach_from_run_file(root: Path) -> None:
    backend = FakeBackend()
    fleet = make_fleet(root, backend, count=2)
    fleet.up()
    fleet.detach()
    again = Fleet.attach("rtest", root, backend=backend, progress=False)
    assert [g.state for g in again.guests] == ["ready", "ready"]
    assert again.accel is not None and again.accel.accel == "tcg"
    assert again.run("ping").ok  # a fresh connection, without a second `ready`
    again.down()
    assert backend.guests == {}
    with pytest.raises(HarnessError, match="no fleet run 'rtest'"):
        Fleet.attach("rtest", root, backend=backend)


def test_guest_name_of_qemu_argv() -> None:
    argv = ["qemu-system-x86_64", "-name", "guest=ksmh-r1-g00,process=qemu-ksmh-r1-g00"]
    assert guest_name_of(argv) == "ksmh-r1-g00"
    assert guest_name_of(["qemu-system-x86_64", "-m", "1G"]) is None


def test_leftovers_are_found_by_name_prefix_in_proc(tmp_path: Path) -> None:
    procs = {
        "100": ["/usr/bin/qemu-system-x86_64", "-name", "guest=ksmh-rdead-g00,process=x"],
        "101": ["/usr/bin/qemu-system-x86_64", "-name", "guest=someone-else"],
        "102": ["/usr/bin/qemu-system-x86_64", "-name", "guest=ksmh-rlv-g00,debug-threads=on",
                "-object", "secret,file=/var/lib/libvirt/qemu/domain-1/master-key.aes"],
        "103": ["python3", "-name", "guest=ksmh-rx-g00"],
        "104": ["/usr/bin/qemu-system-x86_64", "-name", "guest=ksmh-rnobody-g00"],
    }  # fmt: skip
    for pid, argv in procs.items():
        (tmp_path / pid).mkdir()
        (tmp_path / pid / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
    (tmp_path / "self").mkdir()
    # Another user's guest (each user has its own runtime directory) is theirs to stop.
    if os.geteuid() == 0:
        os.chown(tmp_path / "104", 65534, 65534)
    else:
        shutil.rmtree(tmp_path / "104")  # no chown without root
    found = QemuBackend(proc=tmp_path).leftovers()
    assert found == [Leftover(name="ksmh-rdead-g00", pid=100, backend="qemu")]


def test_sigterm_while_booting_stops_guests_without_waiting_for_the_deadline(root: Path) -> None:
    backend = FakeBackend(never_ready={0, 1, 2})
    timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM))
    t0 = time.monotonic()
    timer.start()
    with pytest.raises(KeyboardInterrupt), make_fleet(root, backend, ready_timeout=30.0):
        pass
    assert time.monotonic() - t0 < 5.0
    assert backend.guests == {}
    assert sorted(backend.stopped) == [guest_name("rtest", i) for i in range(3)]
    assert not (root / "rtest").exists()


def test_second_client_is_told_the_channel_is_taken(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = FakeBackend()
    monkeypatch.setattr(Fleet, "reconnect_timeout", 0.3)
    with make_fleet(root, backend, count=1) as fleet:
        other = Fleet.attach("rtest", root, backend=backend, progress=False)
        [r] = other.run("ping").values()
        assert "its agent does not answer a new connection" in str(r.error)
        assert r.error is not None and r.error.hint is not None
        assert "one client at a time" in r.error.hint
        assert fleet.run("ping").ok  # the first client is unaffected


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"count": 0}, "--count 0: a fleet needs at least one guest"),
        ({"memory_mib": 32}, "--memory 32: a guest needs at least 64 MiB"),
        ({"vcpus": 0}, "--vcpus 0: a guest needs at least one"),
    ],
)
def test_bad_sizes_are_one_line_errors_before_anything_is_built(
    kw: dict[str, int], message: str
) -> None:
    # Before the fix --memory 32 was a ValueError traceback from GuestSpec, after the build.
    args: dict[str, int] = {"count": 1, "memory_mib": 128, "vcpus": 1, **kw}
    with pytest.raises(HarnessError) as err:
        FleetSpec(**args)
    assert err.value.message == message


@pytest.mark.parametrize(
    ("kw", "message", "hint"),
    [
        ({"image": "alpine"}, "unknown image kind 'alpine'", "use busybox or debian"),
        ({"backend": "xen"}, "unknown guest backend 'xen'", "use qemu or libvirt"),
        ({"accel": "hvf"}, "unknown accelerator 'hvf'", "use auto, kvm or tcg"),
        ({"concurrency": 0}, "--concurrency 0: must be at least 1", None),
    ],
)
def test_spec_refuses_unknown_kinds_with_the_choices(
    kw: dict[str, object], message: str, hint: str | None
) -> None:
    with pytest.raises(HarnessError) as err:
        FleetSpec(1, **kw)  # type: ignore[arg-type]
    assert (err.value.message, err.value.hint) == (message, hint)


def test_spec_turns_strings_into_kinds_and_round_trips_through_json() -> None:
    spec = FleetSpec(2, 128, image="debian", backend="libvirt", accel="tcg", uri="qemu:///x")  # type: ignore[arg-type]
    assert (spec.image, spec.backend, spec.accel) == (
        ImageKind.DEBIAN, GuestBackendKind.LIBVIRT, AccelKind.TCG,
    )  # fmt: skip
    data = spec.as_json()
    assert data == {
        "count": 2, "memory_mib": 128, "image": "debian", "backend": "libvirt",
        "uri": "qemu:///x", "accel": "tcg", "vcpus": 1, "mem_merge": True, "thp": True,
        "concurrency": default_concurrency(), "ready_timeout": 180.0, "command_timeout": 600.0,
        "machine": "auto",
    }  # fmt: skip
    assert type(data["image"]) is str
    assert FleetSpec.from_json(data) == spec


def test_fleet_takes_its_description_from_the_spec_only(root: Path) -> None:
    with pytest.raises(TypeError, match="a FleetSpec, not int"):
        Fleet(3)  # type: ignore[arg-type]
    fleet = make_fleet(root, FakeBackend(), count=2)
    assert fleet.spec == FleetSpec(2, 128, ready_timeout=5.0)
    # A prebuilt image of another kind makes the spec say so (what run.json records).
    debian = GuestImage(Path("/k"), Path("/i"), "debian")
    other = Fleet(FleetSpec(1), image=debian, backend=FakeBackend(), runtime_root=root)  # type: ignore[arg-type]
    assert other.spec.image is ImageKind.DEBIAN


def test_attach_restores_the_spec_from_run_json(root: Path) -> None:
    backend = FakeBackend()
    fleet = Fleet(
        FleetSpec(2, 96, vcpus=2, mem_merge=False, thp=False, ready_timeout=5.0),
        backend=backend,  # type: ignore[arg-type]
        image=IMAGE,
        runtime_root=root,
        run_id="rspec",
        progress=False,
        accel_resolver=lambda req, img: AccelChoice(AccelKind.TCG, "test"),
    )
    fleet.up()
    fleet.detach()
    again = Fleet.attach("rspec", root, backend=backend, progress=False)
    try:
        assert again.spec == fleet.spec
        assert [g.spec for g in again.guests] == [g.spec for g in fleet.guests]
    finally:
        again.down()


class ThpRecordingBackend(FakeBackend):
    """Records whether THP was disabled for this process (so for QEMU) at each start."""

    def __init__(self) -> None:
        super().__init__()
        self.thp_off_at_start: list[bool | None] = []

    def start(self, spec: GuestSpec) -> int:
        self.thp_off_at_start.append(thp_disabled())
        return super().start(spec)


@pytest.fixture
def thp_allowed() -> Iterator[None]:
    """THP allowed for this process during the test (another test module may disable it)."""
    before = thp_disabled()
    assert set_thp_disable(False)
    yield
    set_thp_disable(bool(before))


@pytest.mark.usefixtures("thp_allowed")
@pytest.mark.parametrize("thp", [False, True])
def test_spec_thp_decides_what_qemu_inherits_and_the_process_gets_it_back(
    root: Path, thp: bool
) -> None:
    backend = ThpRecordingBackend()
    fleet = Fleet(
        FleetSpec(2, 128, thp=thp, ready_timeout=5.0),
        backend=backend,  # type: ignore[arg-type]
        image=IMAGE,
        runtime_root=root,
        run_id="rthp",
        progress=False,
        accel_resolver=lambda req, img: AccelChoice(AccelKind.TCG, "test"),
    )
    try:
        assert fleet.up().ok
        assert backend.thp_off_at_start == [not thp, not thp]
        assert thp_disabled() is False
    finally:
        fleet.down()


@pytest.mark.usefixtures("thp_allowed")
def test_thp_already_off_stays_off_after_boot() -> None:
    assert set_thp_disable(True)
    with thp_off_for_children():
        assert thp_disabled() is True
    assert thp_disabled() is True  # not switched on behind the caller's back
