"""Inventory parsing: the shipped example, defaults, and errors that name file, line and field."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.remote.inventory import (
    DEFAULT_LISTEN,
    DEFAULT_PREFIX,
    Host,
    InventoryError,
    load_inventory,
    parse_inventory,
)

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "playbooks" / "inventory.example.yaml"
HOME = Path.home()


def test_example_inventory_parses_to_exact_hosts() -> None:
    inv = load_inventory(EXAMPLE)
    assert inv.known_hosts == HOME / ".ssh" / "known_hosts"
    assert inv.hosts == (
        Host(
            name="kvm-a",
            address="192.0.2.11",
            user="ksm",
            key_file=HOME / ".ssh" / "ksmh_ed25519",
            port=22,
            libvirt_uri="qemu+ssh://ksm@192.0.2.11/system",
            labels={"rack": "r1", "ksm_expected": "true"},
            trust_on_first_use=False,
            exporter_listen="192.0.2.11:9712",
            prefix="/opt/ksm-harness",
            python="python3",
        ),
        Host(
            name="kvm-b",
            address="192.0.2.12",
            user="root",
            key_file=HOME / ".ssh" / "ksmh_root_ed25519",
            port=2222,
            libvirt_uri="qemu+ssh://root@192.0.2.12:2222/system"
            "?keyfile=/root/.ssh/ksmh_root_ed25519",
            labels={"rack": "r2", "ksm_expected": "false"},
            trust_on_first_use=True,
            exporter_listen="0.0.0.0:9712",
            prefix="/opt/ksm-harness",
            python="/usr/bin/python3.11",
        ),
    )
    assert inv.hosts[0].known_hosts_name == "192.0.2.11"
    assert inv.hosts[1].known_hosts_name == "[192.0.2.12]:2222"
    assert inv.hosts[1].exporter_target == "192.0.2.12:9712"  # wildcard -> host address


def test_defaults_and_relative_paths(tmp_path: Path) -> None:
    text = """
known_hosts: kh
defaults: {user: ops, key_file: keys/id}
hosts:
  a: {address: 10.1.1.1, port: 2200}
"""
    inv = parse_inventory(text, tmp_path / "inv.yaml")
    (a,) = inv.hosts
    assert inv.known_hosts == tmp_path / "kh"
    assert a.key_file == tmp_path / "keys" / "id"
    assert a.libvirt_uri == "qemu+ssh://ops@10.1.1.1:2200/system"
    assert a.exporter_listen == DEFAULT_LISTEN and a.exporter_target == "127.0.0.1:9712"
    assert a.prefix == DEFAULT_PREFIX and a.trust_on_first_use is False and a.labels == {}
    assert inv.with_prefix("/tmp/x").hosts[0].prefix == "/tmp/x"
    assert inv.with_prefix(None) is inv


BASE = "defaults: {user: ops, key_file: /k}\nhosts:\n"
H = "  a:\n    address: h\n"  # host a; its next field is on line 5

FORMAT = "see playbooks/inventory.example.yaml for the format"
ALLOWED_HOST = (
    "allowed here: port, user, key_file, libvirt_uri, labels, trust_on_first_use, exporter, "
    "prefix, python, address"
)

# (inventory body after BASE, the exact error after "/x/", its hint)
HOST_ERRORS = [
    (
        "  a: {port: 22}\n",
        "inv.yaml:3: hosts.a: missing required field 'address'",
        "set it on the host or in defaults:",
    ),
    (H + "    port: 70000\n", "inv.yaml:5: hosts.a.port: 70000 is out of range 1..65535", FORMAT),
    (
        H + "    port: '22'\n",
        "inv.yaml:5: hosts.a.port: expected an integer 1..65535, got str '22'",
        FORMAT,
    ),
    (H + "    adress: x\n", "inv.yaml:5: hosts.a.adress: unknown field 'adress'", ALLOWED_HOST),
    (
        H + "    password: x\n",
        "inv.yaml:5: hosts.a.password: passwords are not accepted in inventory files; use key_file",
        "authentication is by key file only",
    ),
    (
        H + "    labels: {host: x}\n",
        "inv.yaml:5: hosts.a.labels.host: reserved: the monitoring config sets it",
        FORMAT,
    ),
    (
        H + "    labels: {9bad: x}\n",
        "inv.yaml:5: hosts.a.labels.9bad: not a Prometheus label name",
        FORMAT,
    ),
    (
        H + "    exporter: {listen: 'localhost:9'}\n",
        "inv.yaml:5: hosts.a.exporter.listen: must be IP:PORT, e.g. 10.0.0.11:9712, "
        "got 'localhost:9'",
        FORMAT,
    ),
    (
        H + "    exporter: {listen: '127.0.0.1:\u00b2'}\n",
        "inv.yaml:5: hosts.a.exporter.listen: must be IP:PORT, e.g. 10.0.0.11:9712, "
        "got '127.0.0.1:\u00b2'",
        FORMAT,
    ),
    (
        H + "    exporter: {what_if: ['mps:max_page_sharing=1']}\n",
        "inv.yaml:5: hosts.a.exporter.what_if[0]: 'max_page_sharing=1': max_page_sharing: 1 "
        "is out of range 2..2147483647",
        "max_page_sharing takes 2..2147483647",
    ),
    (
        H + "    exporter: {what_if: ['mps:run=1']}\n",
        "inv.yaml:5: hosts.a.exporter.what_if[0]: 'run=1': run is not a knob to compare",
        "leave run out",
    ),
    (
        H + "    exporter: {twin: true, twin_cpu: 150%}\n",
        "inv.yaml:5: hosts.a.exporter.twin_cpu: twin_cpu '150%': expected a share like 95% or "
        "0.95 (above 0, at most 100%)",
        FORMAT,
    ),
    (
        H + "    trust_on_first_use: maybe\n",
        "inv.yaml:5: hosts.a.trust_on_first_use: expected true or false, got str 'maybe'",
        FORMAT,
    ),
    (
        H + "    prefix: rel/dir\n",
        "inv.yaml:5: hosts.a.prefix: must be an absolute directory path other than /: 'rel/dir'",
        FORMAT,
    ),
    (
        "  a: {address: h}\n  b: {address: h}\n",
        "inv.yaml:4: hosts.b: same address:port as host 'a'",
        FORMAT,
    ),
    (
        "  a: {address: h, port: 1}\n  a: {address: i}\n",
        "inv.yaml:4: hosts.a: duplicate key",
        "remove one of them",
    ),
    (
        "  a b: {address: h}\n",
        "inv.yaml:3: hosts.a b: host names are letters, digits, '.', '_', '-'",
        FORMAT,
    ),
    ("  a: [1, 2]\n", "inv.yaml:3: hosts.a: expected host fields (a mapping), got a list", FORMAT),
    (
        "  a: {address: h, user: 'Bad User'}\n",
        "inv.yaml:3: hosts.a.user: not a valid user name: 'Bad User'",
        "lower-case letters, digits, _.-",
    ),
    (
        "  a: {address: '-oProxyCommand=x'}\n",
        "inv.yaml:3: hosts.a.address: not a host name or IP address: '-oProxyCommand=x'",
        FORMAT,
    ),
    (
        "  a: {address: 'u@h h'}\n",
        "inv.yaml:3: hosts.a.address: not a host name or IP address: 'u@h h'",
        FORMAT,
    ),
]


@pytest.mark.parametrize(("body", "message", "hint"), HOST_ERRORS)
def test_errors_name_file_line_and_field(body: str, message: str, hint: str) -> None:
    with pytest.raises(InventoryError) as exc:
        parse_inventory(BASE + body, Path("/x/inv.yaml"))
    assert (exc.value.message, exc.value.hint) == ("/x/" + message, hint)


DOCUMENT_ERRORS = [
    ("", "/x/inv.yaml:1: the inventory is empty", FORMAT),
    (
        "hosts: {}\n",
        "/x/inv.yaml:1: hosts: names no host",
        "e.g. hosts: {kvm-a: {address: 10.0.0.11}}",
    ),
    (
        "known_hosts: k\n",
        "/x/inv.yaml:1: (top level): missing required field 'hosts'",
        "the inventory needs a `hosts:` mapping; " + FORMAT,
    ),
    (
        "hosts:\n  a: {address: [\n",
        "/x/inv.yaml:3: not valid YAML: expected the node content, but found '<stream end>'",
        "check indentation and quoting around that line",
    ),
    (
        "defaults: {address: h}\nhosts: {a: {}}\n",
        "/x/inv.yaml:1: defaults.address: address cannot have a default",
        "give each host its address",
    ),
    (
        "hostz: {}\n",
        "/x/inv.yaml:1: hostz: unknown field 'hostz'",
        "allowed here: known_hosts, defaults, hosts",
    ),
    (
        "name: quickstart\nfleet: {count: 4}\nphases: []\n",
        "/x/inv.yaml:1: name: unknown field 'name': this looks like a playbook, not an inventory",
        "run a playbook on an inventory's hosts with `ksmh run --inventory INVENTORY PLAYBOOK`",
    ),
    (
        "defaults: {prefix: '/opt/k%h'}\nhosts: {a: {address: h}}\n",
        "/x/inv.yaml:1: defaults.prefix: '/opt/k%h' contains '%', which systemd would expand "
        "in the exporter's unit",
        "choose a directory name without %, $ or control characters",
    ),
    (
        "defaults: {user: u, key_file: k}\nhosts:\n  a: {address: h, prefix: '/opt/$HOME'}\n",
        "/x/inv.yaml:3: hosts.a.prefix: '/opt/$HOME' contains '$', which systemd would expand "
        "in the exporter's unit",
        "choose a directory name without %, $ or control characters",
    ),
    (
        'hosts:\n  a: {address: h, user: u, key_file: k, prefix: "/opt/a\\nExecStartPre=x"}\n',
        "/x/inv.yaml:2: hosts.a.prefix: '/opt/a\\nExecStartPre=x' contains a newline or another "
        "control character",
        FORMAT,
    ),
    (
        "base: &b {user: u, key_file: k}\nhosts: {a: {<<: *b, address: h}}\n",
        "/x/inv.yaml:1: YAML anchors and aliases (&name, *name) are not accepted",
        "write the values out (an inventory's `defaults:` block shares fields)",
    ),
    (
        "hosts: {a: {<<: {user: u}, address: h, key_file: k}}\n",
        "/x/inv.yaml:1: hosts.a: YAML merge keys (<<) are not accepted",
        "write the fields out (an inventory's `defaults:` block shares fields)",
    ),
]


@pytest.mark.parametrize(("text", "message", "hint"), DOCUMENT_ERRORS)
def test_document_level_errors(text: str, message: str, hint: str) -> None:
    with pytest.raises(InventoryError) as exc:
        parse_inventory(text, Path("/x/inv.yaml"))
    assert (exc.value.message, exc.value.hint) == (message, hint)


def test_defaulted_field_errors_name_the_defaults_line() -> None:
    text = "defaults:\n  user: u\n  key_file: k\n  port: 0\nhosts:\n  a: {address: h}\n"
    with pytest.raises(InventoryError) as exc:
        parse_inventory(text, Path("/x/inv.yaml"))
    assert exc.value.message == "/x/inv.yaml:4: defaults.port: 0 is out of range 1..65535"


def test_missing_file_is_an_inventory_error(tmp_path: Path) -> None:
    with pytest.raises(InventoryError, match=r"cannot read inventory: No such file or directory"):
        load_inventory(tmp_path / "nope.yaml")


def test_exporter_twin_settings() -> None:
    text = BASE + (
        "  a:\n    address: h\n    exporter:\n      twin: true\n      twin_cpu: 3%\n"
        "  b:\n    address: i\n    exporter: {what_if: ['mps16:max_page_sharing=16']}\n"
        "  c: {address: j}\n"
    )
    a, b, c = parse_inventory(text, Path("/x/inv.yaml")).hosts
    assert (a.exporter_twin, a.exporter_what_if, a.exporter_twin_cpu) == (True, (), "3%")
    # A what-if implies the twin it runs beside.
    assert (b.exporter_twin, b.exporter_what_if) == (True, ("mps16:max_page_sharing=16",))
    assert (c.exporter_twin, c.exporter_what_if, c.exporter_twin_cpu) == (False, (), "5%")


def test_two_exporters_on_one_port_of_one_machine_are_refused() -> None:
    body = (
        "  a: {address: h, port: 1, exporter: {listen: '127.0.0.1:9'}}\n"
        "  b: {address: h, port: 2, exporter: {listen: '127.0.0.1:9'}}\n"
    )
    with pytest.raises(InventoryError, match=r":4: hosts\.b\.exporter\.listen: same as host 'a'"):
        parse_inventory(BASE + body, Path("/x/inv.yaml"))


def test_addresses_may_be_names_ipv4_or_ipv6() -> None:
    body = "  a: {address: kvm-a.example.org}\n  b: {address: 10.0.0.2}\n  c: {address: '::1'}\n"
    inv = parse_inventory(BASE + body, Path("/x/inv.yaml"))
    assert [h.address for h in inv.hosts] == ["kvm-a.example.org", "10.0.0.2", "::1"]
