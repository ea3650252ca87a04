"""Pure parts of harness.remote: host keys, SSH config, fetch, unit file, argv, table, bundle."""

from __future__ import annotations

import io
import json
import stat
import tarfile
from pathlib import Path

import paramiko
import pytest

from harness.errors import RemoteCommandFailed
from harness.fleet_result import FleetResult, MemberResult
from harness.remote.bundle import Bundle, build_bundle, local_soabi
from harness.remote.check import HostCheck, format_table, rows
from harness.remote.inventory import Host, Inventory
from harness.remote.prepare import (
    REMOTE_PACKAGES,
    Layout,
    exporter_argv,
    prepare_host,
    render_unit,
)
from harness.remote.ssh import (
    CommandResult,
    HostKeyRefused,
    KnownHostsPolicy,
    Session,
    configure,
    fingerprint,
)

ROOT = Path(__file__).resolve().parents[2]


def _host(**kw: object) -> Host:
    base: dict[str, object] = {
        "name": "kvm-a",
        "address": "10.0.0.1",
        "user": "ksm",
        "key_file": Path("/k"),
        "port": 2222,
    }
    return Host(**{**base, **kw})  # type: ignore[arg-type]


KEY = paramiko.RSAKey.generate(1024)  # any server key will do; generated in-process


def test_unknown_key_refused_without_tofu(tmp_path: Path) -> None:
    kh = tmp_path / "known_hosts"
    policy = KnownHostsPolicy(_host(), kh)
    with pytest.raises(HostKeyRefused) as exc:
        policy.missing_host_key(paramiko.SSHClient(), "[10.0.0.1]:2222", KEY)
    assert exc.value.message == (
        f"kvm-a: unknown host key ssh-rsa {fingerprint(KEY)} for [10.0.0.1]:2222 (not in {kh})"
    )
    assert exc.value.hint is not None
    assert f"`ssh-keyscan -p 2222 10.0.0.1 >> {kh}`" in exc.value.hint
    assert not kh.exists()


def test_tofu_records_the_key_once(tmp_path: Path) -> None:
    kh = tmp_path / "sub" / "known_hosts"
    client = paramiko.SSHClient()
    KnownHostsPolicy(_host(trust_on_first_use=True), kh).missing_host_key(
        client, "[10.0.0.1]:2222", KEY
    )
    assert kh.read_text() == f"[10.0.0.1]:2222 ssh-rsa {KEY.get_base64()}\n"
    assert client.get_host_keys().lookup("[10.0.0.1]:2222") is not None
    # What paramiko reads back matches the key, so the next connection is a known host.
    keys = paramiko.HostKeys(str(kh))
    assert keys.check("[10.0.0.1]:2222", KEY)


def test_fingerprint_is_openssh_sha256() -> None:
    assert fingerprint(KEY).startswith("SHA256:") and len(fingerprint(KEY)) == 7 + 43


def test_exporter_argv_binds_the_inventory_address() -> None:
    h = _host(exporter_listen="10.0.0.1:9712")
    assert exporter_argv(h, Layout("/opt/k")) == [
        "/opt/k/venv/bin/python",
        "-m",
        "harness.cli",
        "export",
        "--backend",
        "kernel",
        "--listen",
        "10.0.0.1:9712",
        "--host",
        "kvm-a",
    ]


def test_twin_turns_on_in_the_argv_and_runs_the_unit_as_root() -> None:
    h = _host(
        exporter_listen="10.0.0.1:9712",
        exporter_twin=True,
        exporter_what_if=("mps16:max_page_sharing=16", "slow:pages_to_scan=50"),
        exporter_twin_cpu="3%",
    )
    argv = exporter_argv(h, Layout("/opt/k"))
    assert argv[:10] == exporter_argv(_host(exporter_listen="10.0.0.1:9712"), Layout("/opt/k"))
    assert argv[10:] == [
        "--twin",
        "--twin-cpu",
        "3%",
        "--what-if",
        "mps16:max_page_sharing=16",
        "--what-if",
        "slow:pages_to_scan=50",
    ]
    unit = render_unit(h, Layout("/opt/k"))
    assert "User=root\nCapabilityBoundingSet=CAP_SYS_PTRACE CAP_SYS_ADMIN\n" in unit
    assert "DynamicUser" not in unit.split("[Service]")[1].split("#")[0]
    assert "--twin --twin-cpu 3% --what-if mps16:max_page_sharing=16" in unit
    plain = render_unit(_host(exporter_listen="10.0.0.1:9712"), Layout("/opt/k"))
    assert "\nDynamicUser=yes\n" in plain and "User=root" not in plain


def test_unit_file_is_rendered_with_quoted_exec() -> None:
    h = _host(exporter_listen="10.0.0.1:9712")
    unit = render_unit(h, Layout("/opt/my dir"))
    assert (
        "ExecStart='/opt/my dir/venv/bin/python' -m harness.cli export --backend kernel "
        "--listen 10.0.0.1:9712 --host kvm-a\n"
    ) in unit
    assert "ReadOnlyPaths='/opt/my dir'\n" in unit  # one path to systemd, not two
    assert "@" not in unit.replace("WantedBy", "")


def test_table_shows_every_host_and_its_problems() -> None:
    ok = HostCheck(
        "a",
        "10.0.0.1:22",
        reachable=True,
        kernel="6.1.0",
        ksm_present=True,
        ksm_writable=True,
        ksm_run="1",
        kvm="rw",
        missing_packages=[],
        harness="abc123",
        exporter="up (pid 7)",
    )
    dead = HostCheck("b", "10.0.0.2:22", problems=["b: cannot connect to 10.0.0.2:22: refused"])
    lines = format_table([ok, dead]).splitlines()
    assert lines[0].split() == [
        "HOST",
        "ADDRESS",
        "SSH",
        "KERNEL",
        "KSM",
        "WRITABLE",
        "KVM",
        "PACKAGES",
        "HARNESS",
        "EXPORTER",
        "USABLE",
    ]
    assert lines[1].split() == [
        "a",
        "10.0.0.1:22",
        "ok",
        "6.1.0",
        "run=1",
        "yes",
        "rw",
        "ok",
        "abc123",
        "up",
        "(pid",
        "7)",
        "yes",
    ]
    assert lines[2].split() == ["b", "10.0.0.2:22", "FAIL", "-", "-", "?", "-", "-", "-", "-", "NO"]
    assert lines[3] == "b: cannot connect to 10.0.0.2:22: refused"
    assert ok.usable and not dead.usable


def test_bundle_ships_pure_deps_everywhere_and_compiled_ones_only_to_same_abi() -> None:
    other = build_bundle("cpython-39-aarch64-linux-gnu")
    pure = (
        "pydantic",
        "annotated-types",
        "typing-inspection",
        "typing-extensions",
        "qemu.qmp",
        "rich",
        "markdown-it-py",
        "mdurl",
        "Pygments",
    )
    assert other.distributions == ("prometheus-client", *pure)
    assert other.skipped == ("PyYAML", "libvirt-python", "numpy", "xxhash", "pydantic-core")
    same = build_bundle(local_soabi())
    assert same.distributions == (
        "prometheus-client",
        "PyYAML",
        "libvirt-python",
        "numpy",
        "xxhash",
        "pydantic",
        "pydantic-core",
        "annotated-types",
        "typing-inspection",
        "typing-extensions",
        "qemu.qmp",
        "rich",
        "markdown-it-py",
        "mdurl",
        "Pygments",
    )
    with tarfile.open(fileobj=io.BytesIO(same.data)) as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    assert "harness/cli.py" in names and "ksm_model/__init__.py" in names
    assert "prometheus_client/__init__.py" in names and "yaml/__init__.py" in names
    assert "ksm_harness-0.1.0.dist-info/entry_points.txt" in names
    assert "numpy/__init__.py" in names  # the runner's shadow capture needs it
    # Package data travels with the package: the host compiles the agent from it.
    assert "harness/guests/data/ksmh-agent.c" in names and "harness/guests/data/init" in names
    assert "harness/monitoring/templates/ksmh-exporter.service" in names
    assert not [n for n in names if n.startswith("guest-images/")]
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    assert all(m.mtime == 0 and m.uid == 0 for m in members)  # reproducible: digest = version


class FakeSession:
    """Stands in for an SSH session: answers commands from a table, records what was run."""

    def __init__(self, host: Host, facts: dict[str, object], installed: set[str]) -> None:
        self.host = host
        self.facts = facts
        self.installed = installed
        self.ran: list[list[str]] = []
        self.files: dict[str, bytes] = {}

    def run(self, argv: list[str], *, check: bool = True, **kw: object) -> CommandResult:
        self.ran.append(list(argv))
        out, code = "", 0
        if argv[:2] == [self.host.python, "-c"] and "sysconfig" in argv[2]:
            out = json.dumps(self.facts)
        elif argv[0] == "dpkg-query":
            out = "".join(f"{p} installed\n" for p in argv[3:] if p in self.installed)
        elif argv[:2] == ["systemctl", "is-active"]:
            code = 3
        elif argv[0] == "cat":
            code = 1
        result = CommandResult(tuple(argv), code, out, "")
        if check and code:
            raise RemoteCommandFailed(f"{argv} failed")
        return result

    def put_bytes(self, data: bytes, path: str, mode: int = 0o644) -> None:
        self.files[path] = data

    def http_get(self, address: str, path: str = "/metrics", timeout: float = 5.0) -> str:
        return 'ksm_run{host="kvm-a",source="kernel"} 1.0\n'


FACTS: dict[str, object] = {
    "version": [3, 11],
    "soabi": "cpython-311-x86_64-linux-gnu",
    "machine": "x86_64",
    "uid": 0,
    "systemd": True,
    "ksm_present": True,
    "ksm_writable": True,
    "ksm_run": "1",
    "kvm_exists": True,
    "kvm_rw": True,
    "digest": None,
    "venv": False,
    "supervisor": None,
    "state": None,
}
BUNDLE = Bundle(b"tarball", "ab" * 32, ("prometheus-client",), ("PyYAML",))


def test_prepare_on_a_systemd_host_installs_the_unit(tmp_path: Path) -> None:
    s = FakeSession(_host(prefix="/opt/k"), FACTS, set(REMOTE_PACKAGES) | {"python3-yaml"})
    report = prepare_host(s, lambda soabi: BUNDLE)  # type: ignore[arg-type]
    assert report.service == "systemd"
    assert report.steps == [
        ("packages", "unchanged: all present"),
        ("install", "done: bundle abababababab into /opt/k/venv (prometheus-client)"),
        ("exporter", "started: systemd unit ksmh-exporter.service on 127.0.0.1:9712"),
    ]
    unit = s.files["/etc/systemd/system/ksmh-exporter.service"].decode()
    assert unit == render_unit(s.host, Layout("/opt/k"))
    assert s.files["/opt/k/.bundle-sha256"] == b"ab" * 32 + b"\n"
    assert ["systemctl", "daemon-reload"] in s.ran
    assert ["systemctl", "restart", "ksmh-exporter.service"] in s.ran
    # The compiled dependency that could not be shipped is asked of the system instead.
    dpkg = next(a for a in s.ran if a[0] == "dpkg-query")
    assert dpkg[-1] == "python3-yaml"


def test_prepare_refuses_to_install_packages_as_non_root() -> None:
    facts = {**FACTS, "uid": 1000}
    s = FakeSession(_host(), facts, set(REMOTE_PACKAGES) - {"qemu-system-x86"})
    with pytest.raises(RemoteCommandFailed) as exc:
        prepare_host(s, lambda soabi: BUNDLE)  # type: ignore[arg-type]
    assert exc.value.message == (
        "kvm-a: missing packages qemu-system-x86 python3-yaml and ksm is not root"
    )
    assert exc.value.hint == "on the host: sudo apt-get install -y qemu-system-x86 python3-yaml"
    assert not [a for a in s.ran if "apt-get" in a]


def test_prepare_refuses_an_old_python() -> None:
    s = FakeSession(_host(), {**FACTS, "version": [3, 9]}, set(REMOTE_PACKAGES))
    with pytest.raises(RemoteCommandFailed, match=r"python3 is 3\.9, ksm-harness needs 3\.11\+"):
        prepare_host(s, lambda soabi: BUNDLE)  # type: ignore[arg-type]


def test_connection_ignores_fabric_config_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A ~/.fabric.yaml must not add a key, forward the agent or route through a gateway.
    (tmp_path / ".fabric.yaml").write_text(
        "connect_kwargs: {key_filename: /other/id}\nforward_agent: true\ngateway: jump\n"
    )
    monkeypatch.setenv("HOME", str(tmp_path))
    conn = configure(_host(), timeout=10.0)
    assert conn.connect_kwargs == {
        "key_filename": ["/k"],
        "look_for_keys": False,
        "allow_agent": False,
        "banner_timeout": 10.0,
        "auth_timeout": 10.0,
    }
    assert conn.forward_agent is False and conn.gateway is None
    assert (conn.host, conn.user, conn.port) == ("10.0.0.1", "ksm", 2222)


class _Entry:
    def __init__(self, name: str, mode: int) -> None:
        self.filename, self.st_mode = name, mode


class _Sftp:
    """listdir_attr/get over a dict of remote dir -> entries (what a server may claim)."""

    def __init__(self, tree: dict[str, list[_Entry]]) -> None:
        self.tree = tree
        self.got: list[str] = []

    def listdir_attr(self, path: str) -> list[_Entry]:
        return self.tree[path]

    def get(self, remote: str, local: str) -> None:
        self.got.append(remote)
        Path(local).write_text(remote)


def test_fetch_dir_copies_regular_files_and_never_leaves_local_dir(tmp_path: Path) -> None:
    reg, lnk, dr = stat.S_IFREG | 0o644, stat.S_IFLNK | 0o777, stat.S_IFDIR | 0o755
    sftp = _Sftp(
        {
            "/r": [
                _Entry("run.json", reg),
                _Entry("link", lnk),
                _Entry("..", dr),
                _Entry("../escape", reg),
                _Entry("sub", dr),
            ],
            "/r/sub": [_Entry("a.csv", reg)],
        }
    )
    conn = type("Conn", (), {"sftp": lambda self: sftp, "close": lambda self: None})()
    local = tmp_path / "out" / "run"
    copied = Session(_host(), conn).fetch_dir("/r", local)
    assert copied == ["run.json", "sub/a.csv"]
    assert sftp.got == ["/r/run.json", "/r/sub/a.csv"]
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == [
        "out", "out/run", "out/run/run.json", "out/run/sub", "out/run/sub/a.csv",
    ]  # fmt: skip


def test_check_rows_keep_the_hint_of_a_host_that_failed() -> None:
    refused = HostKeyRefused("kvm-a: unknown host key", hint="ssh-keyscan it")
    result: FleetResult[HostCheck] = FleetResult("check", [MemberResult("kvm-a", error=refused)])
    (row,) = rows(Inventory(Path("/inv.yaml"), (_host(),), Path("/kh")), result)
    assert (row.host, row.address, row.reachable) == ("kvm-a", "10.0.0.1:2222", False)
    assert row.problems == ["kvm-a: unknown host key (hint: ssh-keyscan it)"]
    assert format_table([row]).splitlines()[-1] == "kvm-a: unknown host key (hint: ssh-keyscan it)"
