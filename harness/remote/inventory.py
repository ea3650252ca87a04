"""Inventory files: the hosts of a fleet, validated with errors that name file, line and field.

Format (YAML)::

    known_hosts: ~/.ssh/known_hosts      # checked for every host key (relative: to this file)
    defaults:                            # any host field except address
      user: ksm
      key_file: ~/.ssh/ksmh_ed25519
    hosts:
      kvm-a:
        address: 10.0.0.11
        port: 22
        libvirt_uri: qemu+ssh://ksm@10.0.0.11/system   # this is the default
        labels: {rack: r1, ksm_expected: "true"}
        trust_on_first_use: false                        # the default
        exporter: {listen: "10.0.0.11:9712"}            # default 127.0.0.1:9712
        prefix: /opt/ksm-harness                        # where `hosts prepare` installs
        python: python3                                 # interpreter the venv is made from

There is deliberately no password field: authentication is by key file only.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from harness.errors import HarnessError

DEFAULT_PREFIX = "/opt/ksm-harness"
DEFAULT_LISTEN = "127.0.0.1:9712"
DEFAULT_KNOWN_HOSTS = "~/.ssh/known_hosts"

# Label names the monitoring config sets itself; an inventory label may not shadow them.
RESERVED_LABELS = frozenset({"host", "instance", "job", "source", "counter", "pid", "name"})
_LABEL_RE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_ADDRESS_RE = re.compile(r"^[A-Za-z0-9_:][A-Za-z0-9_.:-]*$")  # DNS name, IPv4 or bare IPv6
_SECRET_FIELDS = ("password", "passphrase", "sudo_password", "become_password")

HOST_FIELDS = (
    "address",
    "port",
    "user",
    "key_file",
    "libvirt_uri",
    "labels",
    "trust_on_first_use",
    "exporter",
    "prefix",
    "python",
)
TOP_FIELDS = ("known_hosts", "defaults", "hosts")


class InventoryError(HarnessError):
    """The inventory file is invalid; the message names file, line and field."""


@dataclass(frozen=True)
class Host:
    """One machine of the fleet, as the inventory describes it."""

    name: str
    address: str
    user: str
    key_file: Path
    port: int = 22
    libvirt_uri: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    trust_on_first_use: bool = False
    exporter_listen: str = DEFAULT_LISTEN
    prefix: str = DEFAULT_PREFIX
    python: str = "python3"

    @property
    def known_hosts_name(self) -> str:
        """How OpenSSH and paramiko name this host in known_hosts."""
        return self.address if self.port == 22 else f"[{self.address}]:{self.port}"

    @property
    def exporter_target(self) -> str:
        """HOST:PORT Prometheus scrapes: the listen address, a wildcard replaced by address."""
        host, _, port = self.exporter_listen.rpartition(":")
        host = host.strip("[]")
        if host in ("", "0.0.0.0", "::"):
            host = self.address
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True)
class Inventory:
    """A validated inventory: hosts in file order, and the known_hosts file to check keys with."""

    path: Path
    hosts: tuple[Host, ...]
    known_hosts: Path

    def with_prefix(self, prefix: str | None) -> Inventory:
        """The same inventory with every host's prefix replaced (the CLI's --prefix)."""
        if prefix is None:
            return self
        _check_prefix(prefix, f"{self.path}: --prefix")
        hosts = tuple(dataclasses.replace(h, prefix=prefix) for h in self.hosts)
        return Inventory(self.path, hosts, self.known_hosts)


def load_inventory(path: Path | str) -> Inventory:
    """Read and validate an inventory file; raise InventoryError naming file, line and field."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise InventoryError(
            f"{path}: cannot read inventory ({exc.strerror})",
            hint="see playbooks/inventory.example.yaml for the format",
        ) from None
    return parse_inventory(text, path)


def parse_inventory(text: str, path: Path) -> Inventory:
    """Validate inventory text; `path` names the file in errors and anchors relative paths."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise InventoryError(f"{where}: not valid YAML: {problem}") from None
    if root is None:
        raise InventoryError(f"{path}: the inventory is empty", hint="it needs a `hosts:` mapping")
    v = _Validator(path)
    top = v.mapping(root, "inventory", TOP_FIELDS)
    base = path.parent
    kh_node = top.get("known_hosts")
    known_hosts = _resolve(
        base, v.string(kh_node, "known_hosts") if kh_node else DEFAULT_KNOWN_HOSTS
    )
    defaults: dict[str, yaml.Node] = {}
    if "defaults" in top:
        defaults = v.mapping(top["defaults"], "defaults", HOST_FIELDS)
        if "address" in defaults:
            v.fail(defaults["address"], "defaults.address", "address cannot have a default")
    if "hosts" not in top:
        v.fail(root, "hosts", "missing: the inventory needs a `hosts:` mapping")
    hosts_node = top["hosts"]
    if not isinstance(hosts_node, yaml.MappingNode) or not hosts_node.value:
        v.fail(hosts_node, "hosts", "must be a non-empty mapping of host name to fields")
    hosts: list[Host] = []
    key_nodes: list[yaml.Node] = []
    for key_node, value_node in hosts_node.value:
        name = v.string(key_node, "hosts")
        if any(h.name == name for h in hosts):
            v.fail(key_node, f"hosts.{name}", "given twice")
        if not _NAME_RE.match(name):
            v.fail(key_node, f"hosts.{name}", "host names are letters, digits, '.', '_', '-'")
        fields = {**defaults, **v.mapping(value_node, f"hosts.{name}", HOST_FIELDS)}
        hosts.append(_host(v, name, fields, value_node, base))
        key_nodes.append(key_node)
    _check_unique(v, hosts, key_nodes)
    return Inventory(path=path, hosts=tuple(hosts), known_hosts=known_hosts)


def _host(v: _Validator, name: str, f: dict[str, yaml.Node], node: yaml.Node, base: Path) -> Host:
    where = f"hosts.{name}"
    for required in ("address", "user", "key_file"):
        if required not in f:
            v.fail(node, f"{where}.{required}", "missing (set it on the host or in defaults)")
    address = v.string(f["address"], f"{where}.address")
    if not _ADDRESS_RE.match(address):
        # It ends up in known_hosts lines, the libvirt URI and the ssh-keyscan hint.
        v.fail(f["address"], f"{where}.address", f"not a host name or IP address: {address!r}")
    user = v.string(f["user"], f"{where}.user")
    if not re.match(r"^[a-z_][a-z0-9_.-]*$", user):
        v.fail(f["user"], f"{where}.user", f"not a valid user name: {user!r}")
    port = v.integer(f["port"], f"{where}.port", 1, 65535) if "port" in f else 22
    key_file = _resolve(base, v.string(f["key_file"], f"{where}.key_file"))
    uri_default = f"qemu+ssh://{user}@{address}{'' if port == 22 else f':{port}'}/system"
    uri = v.string(f["libvirt_uri"], f"{where}.libvirt_uri") if "libvirt_uri" in f else uri_default
    if "://" not in uri:
        v.fail(f["libvirt_uri"], f"{where}.libvirt_uri", f"not a libvirt URI: {uri!r}")
    labels = v.labels(f["labels"], f"{where}.labels") if "labels" in f else {}
    tofu = False
    if "trust_on_first_use" in f:
        tofu = v.boolean(f["trust_on_first_use"], f"{where}.trust_on_first_use")
    listen = DEFAULT_LISTEN
    if "exporter" in f:
        ex = v.mapping(f["exporter"], f"{where}.exporter", ("listen",))
        if "listen" in ex:
            listen = v.listen(ex["listen"], f"{where}.exporter.listen")
    prefix = DEFAULT_PREFIX
    if "prefix" in f:
        prefix = v.string(f["prefix"], f"{where}.prefix")
        _check_prefix(prefix, f"{v.path}:{f['prefix'].start_mark.line + 1}: {where}.prefix")
    python = v.string(f["python"], f"{where}.python") if "python" in f else "python3"
    return Host(
        name=name,
        address=address,
        user=user,
        key_file=key_file,
        port=port,
        libvirt_uri=uri,
        labels=labels,
        trust_on_first_use=tofu,
        exporter_listen=listen,
        prefix=prefix,
        python=python,
    )


def _check_prefix(prefix: str, where: str) -> None:
    p = PurePosixPath(prefix)
    if not p.is_absolute() or ".." in p.parts or str(p) == "/":
        raise InventoryError(
            f"{where}: must be an absolute directory path other than /: {prefix!r}",
            hint="see playbooks/inventory.example.yaml for the format",
        )


def _check_unique(v: _Validator, hosts: list[Host], nodes: list[yaml.Node]) -> None:
    """No two hosts share address:port, or an exporter address on one machine; an error
    names the later host's line."""
    seen: dict[tuple[str, int], str] = {}
    listens: dict[tuple[str, str], str] = {}
    for h, node in zip(hosts, nodes, strict=True):
        other = seen.setdefault((h.address, h.port), h.name)
        if other != h.name:
            v.fail(node, f"hosts.{h.name}", f"same address:port as host {other!r}")
        # Two exporters on one machine must not fight over one port (loopback fleets in tests).
        lkey = (h.address, h.exporter_listen)
        other = listens.setdefault(lkey, h.name)
        if other != h.name:
            v.fail(node, f"hosts.{h.name}.exporter.listen", f"same as host {other!r}")


def _resolve(base: Path, value: str) -> Path:
    p = Path(os.path.expanduser(value))
    return p if p.is_absolute() else (base / p)


class _Validator:
    """Typed accessors over YAML nodes that fail with file:line: field: problem."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, node: yaml.Node, where: str, problem: str) -> Any:
        line = node.start_mark.line + 1
        raise InventoryError(
            f"{self.path}:{line}: {where}: {problem}",
            hint="see playbooks/inventory.example.yaml for the format",
        )

    def mapping(
        self, node: yaml.Node, where: str, allowed: tuple[str, ...]
    ) -> dict[str, yaml.Node]:
        if not isinstance(node, yaml.MappingNode):
            self.fail(node, where, "must be a mapping")
        out: dict[str, yaml.Node] = {}
        for k, val in node.value:
            key = self.string(k, where)
            if key in _SECRET_FIELDS:
                self.fail(
                    k,
                    f"{where}.{key}",
                    "passwords are not accepted in inventory files; use key_file",
                )
            if key not in allowed:
                self.fail(k, f"{where}.{key}", f"unknown field (known: {', '.join(allowed)})")
            if key in out:
                self.fail(k, f"{where}.{key}", "given twice")
            out[key] = val
        return out

    def _scalar(self, node: yaml.Node, where: str) -> Any:
        if not isinstance(node, yaml.ScalarNode):
            self.fail(node, where, "must be a single value")
        return yaml.SafeLoader("").construct_object(node)

    def string(self, node: yaml.Node, where: str) -> str:
        value = self._scalar(node, where)
        if not isinstance(value, str) or not value.strip():
            self.fail(node, where, f"must be a non-empty string, got {value!r}")
        return str(value)

    def integer(self, node: yaml.Node, where: str, lo: int, hi: int) -> int:
        value = self._scalar(node, where)
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            self.fail(node, where, f"must be an integer {lo}-{hi}, got {value!r}")
        return int(value)

    def boolean(self, node: yaml.Node, where: str) -> bool:
        value = self._scalar(node, where)
        if not isinstance(value, bool):
            self.fail(node, where, f"must be true or false, got {value!r}")
        return bool(value)

    def listen(self, node: yaml.Node, where: str) -> str:
        value = self.string(node, where)
        host, sep, port = value.rpartition(":")
        host = host.strip("[]")
        ok = bool(sep) and port.isdigit() and 1 <= int(port) <= 65535 and bool(host)
        if ok:
            try:
                ipaddress.ip_address(host)
            except ValueError:
                ok = False
        if not ok:
            self.fail(node, where, f"must be IP:PORT, e.g. 10.0.0.11:9712, got {value!r}")
        return value

    def labels(self, node: yaml.Node, where: str) -> dict[str, str]:
        if not isinstance(node, yaml.MappingNode):
            self.fail(node, where, "must be a mapping of label name to value")
        out: dict[str, str] = {}
        for k, val in node.value:
            key = self.string(k, where)
            if not _LABEL_RE.match(key) or key.startswith("__"):
                self.fail(k, f"{where}.{key}", "not a Prometheus label name")
            if key in RESERVED_LABELS:
                self.fail(k, f"{where}.{key}", "reserved: the monitoring config sets it")
            value = self._scalar(val, f"{where}.{key}")
            if isinstance(value, bool):
                value = "true" if value else "false"
            if not isinstance(value, str | int | float):
                self.fail(val, f"{where}.{key}", "label values are strings")
            out[key] = str(value)
        return out
