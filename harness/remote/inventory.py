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
        # exporter: {twin: true, what_if: ["mps16:max_page_sharing=16"], twin_cpu: 5%}
        #   adds the live twin (`ksmh export --twin`; runs as root, see monitoring/)
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
from typing import Annotated, Any

from pydantic import model_validator

from harness.errors import HarnessError
from harness.validation import Check, Invalid, Model, between, boolean, fail, kind, validate
from harness.yamlfile import Source, load_text, read_text

DEFAULT_PREFIX = "/opt/ksm-harness"
DEFAULT_LISTEN = "127.0.0.1:9712"
DEFAULT_KNOWN_HOSTS = "~/.ssh/known_hosts"

# Label names the monitoring config sets itself; an inventory label may not shadow them.
RESERVED_LABELS = frozenset({"host", "instance", "job", "source", "counter", "pid", "name"})
_LABEL_RE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}", re.ASCII)
_ADDRESS_RE = re.compile(r"[A-Za-z0-9_:][A-Za-z0-9_.:-]{0,252}", re.ASCII)  # DNS, IPv4, IPv6
_USER_RE = re.compile(r"[a-z_][a-z0-9_.-]{0,31}", re.ASCII)
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
# Characters systemd expands in unit files (specifiers, variables): never in a unit's paths.
_UNIT_SPECIAL = ("%", "$")
_SECRET_FIELDS = ("password", "passphrase", "sudo_password", "become_password")
HINT = "see playbooks/inventory.example.yaml for the format"


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
    exporter_twin: bool = False  # `ksmh export --twin`: the live model beside the kernel
    exporter_what_if: tuple[str, ...] = ()  # --what-if NAME:KNOB=VALUE,...
    exporter_twin_cpu: str = "5%"  # --twin-cpu
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
    src = _source(path)
    return _parse(load_text(read_text(path, src, "inventory"), src, "inventory"), src, path)


def parse_inventory(text: str, path: Path) -> Inventory:
    """Validate inventory text; `path` names the file in errors and anchors relative paths."""
    src = _source(path)
    return _parse(load_text(text, src, "inventory"), src, path)


def _source(path: Path) -> Source:
    return Source(file=str(path), error_type=InventoryError, hint=HINT)


# -- field checks -----------------------------------------------------------------------------


def _text(value: Any) -> str:
    """A non-empty single-line string (it ends up in commands, known_hosts and unit files)."""
    if not isinstance(value, str) or not value.strip():
        raise Invalid(f"expected a non-empty string, got {kind(value)}")
    if _CONTROL_RE.search(value):
        raise Invalid(f"{value!r} contains a newline or another control character")
    return value


def _address(value: Any) -> str:
    # It ends up in known_hosts lines, the libvirt URI and the ssh-keyscan hint.
    if not _ADDRESS_RE.fullmatch(_text(value)):
        raise Invalid(f"not a host name or IP address: {value!r}")
    return str(value)


def _user(value: Any) -> str:
    if not _USER_RE.fullmatch(_text(value)):
        raise Invalid(f"not a valid user name: {value!r}", hint="lower-case letters, digits, _.-")
    return str(value)


def _uri(value: Any) -> str:
    if "://" not in _text(value):
        raise Invalid(f"not a libvirt URI: {value!r}", hint="e.g. qemu+ssh://ksm@10.0.0.11/system")
    return str(value)


def _prefix(value: Any) -> str:
    check_prefix(_text(value))
    return str(value)


def check_prefix(prefix: str) -> None:
    """An absolute directory other than /, without `..` or characters systemd would expand."""
    p = PurePosixPath(prefix)
    if not p.is_absolute() or ".." in p.parts or str(p) == "/":
        raise Invalid(f"must be an absolute directory path other than /: {prefix!r}")
    bad = [c for c in _UNIT_SPECIAL if c in prefix] or _CONTROL_RE.findall(prefix)
    if bad:
        raise Invalid(
            f"{prefix!r} contains {bad[0]!r}, which systemd would expand in the exporter's unit",
            hint="choose a directory name without %, $ or control characters",
        )


def _listen(value: Any) -> str:
    text = _text(value)
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    ok = bool(sep) and port.isascii() and port.isdigit() and 1 <= int(port) <= 65535
    if ok:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            ok = False
    if not ok:
        raise Invalid(f"must be IP:PORT, e.g. 10.0.0.11:9712, got {value!r}")
    return text


def _labels(value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        raise Invalid(f"expected a mapping of label name to value, got {kind(value)}")
    out: dict[str, str] = {}
    for key, v in value.items():
        problem = label_name_problem(key)
        if problem is not None:
            raise Invalid(problem, at=(key,))
        if isinstance(v, bool):
            v = "true" if v else "false"
        if not isinstance(v, str | int | float):
            raise Invalid(f"label values are strings, got {kind(v)}", at=(key,))
        out[key] = str(v)
    return out


def label_name_problem(key: object) -> str | None:
    """Why `key` cannot be a label name (inventory labels, the doctor's --label), or None."""
    if not isinstance(key, str) or not _LABEL_RE.match(key) or key.startswith("__"):
        return "not a Prometheus label name"
    if key in RESERVED_LABELS:
        return "reserved: the monitoring config sets it"
    return None


def _hosts(value: Any) -> Any:
    if not isinstance(value, dict):
        raise Invalid(f"expected a mapping of host name to fields, got {kind(value)}")
    if not value:
        raise Invalid("names no host", hint="e.g. hosts: {kvm-a: {address: 10.0.0.11}}")
    for name in value:
        if not _NAME_RE.fullmatch(name):
            raise Invalid("host names are letters, digits, '.', '_', '-'", at=(name,))
    return value


Text = Annotated[str, Check(_text)]


# -- the document -----------------------------------------------------------------------------


def _what_ifs(value: Any) -> tuple[str, ...]:
    from harness.twin.knobs import what_if

    if not isinstance(value, list):
        raise Invalid(f"expected a list of NAME:KNOB=VALUE,..., got {kind(value)}")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise Invalid(f"expected NAME:KNOB=VALUE,..., got {kind(item)}", at=(i,))
        try:
            what_if(item)
        except HarnessError as exc:
            raise Invalid(exc.message, exc.hint, at=(i,)) from None
    return tuple(value)


def _share(value: Any) -> str:
    from harness.units import share

    text = str(value) if isinstance(value, int | float) and not isinstance(value, bool) else value
    if not isinstance(text, str):
        raise Invalid(f"expected a share like 5% or 0.05, got {kind(value)}")
    try:
        share(text, "twin_cpu")
    except HarnessError as exc:
        raise Invalid(exc.message) from None
    return text


class ExporterDoc(Model):
    what = "exporter settings"
    listen: Annotated[str, Check(_listen)] = DEFAULT_LISTEN
    twin: Annotated[bool, Check(boolean)] = False
    what_if: Annotated[tuple[str, ...], Check(_what_ifs)] = ()
    twin_cpu: Annotated[str, Check(_share)] = "5%"


class HostDefaults(Model):
    """Fields a `defaults:` block may give every host (all but address)."""

    what = "host fields"
    example = "set it on the host or in defaults:"
    port: Annotated[int, between(1, 65535)] = 22
    user: Annotated[str | None, Check(_user)] = None
    key_file: Text | None = None
    libvirt_uri: Annotated[str | None, Check(_uri)] = None
    labels: Annotated[dict[str, str], Check(_labels)] = {}  # noqa: RUF012
    trust_on_first_use: Annotated[bool, Check(boolean)] = False
    exporter: ExporterDoc = ExporterDoc()
    prefix: Annotated[str, Check(_prefix)] = DEFAULT_PREFIX
    python: Text = "python3"

    @classmethod
    def unknown_field(cls, key: str, data: dict[str, Any]) -> Invalid:
        if key in _SECRET_FIELDS:
            return Invalid(
                "passwords are not accepted in inventory files; use key_file",
                hint="authentication is by key file only",
            )
        if key == "address":
            return Invalid("address cannot have a default", hint="give each host its address")
        return super().unknown_field(key, data)


class HostDoc(HostDefaults):
    address: Annotated[str, Check(_address)]
    user: Annotated[str, Check(_user)]
    key_file: Text


class InventoryDoc(Model):
    what = "an inventory"
    example = "the inventory needs a `hosts:` mapping; " + HINT
    known_hosts: Text = DEFAULT_KNOWN_HOSTS
    defaults: HostDefaults = HostDefaults()
    hosts: Annotated[dict[str, HostDoc], Check(_hosts)]

    @classmethod
    def unknown_field(cls, key: str, data: dict[str, Any]) -> Invalid:
        if {"phases", "fleet"} & set(data):
            return Invalid(
                f"unknown field {key!r}: this looks like a playbook, not an inventory",
                hint="run a playbook on an inventory's hosts with "
                "`ksmh run --inventory INVENTORY PLAYBOOK`",
            )
        return super().unknown_field(key, data)

    @model_validator(mode="after")
    def _unique(self) -> InventoryDoc:
        """No two hosts share address:port, or an exporter address on one machine."""
        seen: dict[tuple[str, int], str] = {}
        listens: dict[tuple[str, str], str] = {}
        for name, h in self.hosts.items():
            other = seen.setdefault((h.address, h.port), name)
            if other != name:
                raise fail(f"same address:port as host {other!r}", at=("hosts", name))
            # Two exporters on one machine must not fight over one port (loopback fleets).
            other = listens.setdefault((h.address, h.exporter.listen), name)
            if other != name:
                raise fail(f"same as host {other!r}", at=("hosts", name, "exporter", "listen"))
        return self


def _merge_defaults(data: Any, src: Source) -> Any:
    """Each host's fields over the defaults; a defaulted field keeps the line it came from."""
    if not isinstance(data, dict):
        return data
    defaults, hosts = data.get("defaults"), data.get("hosts")
    if not isinstance(defaults, dict) or not isinstance(hosts, dict):
        return data
    merged: dict[str, Any] = {}
    for name, fields in hosts.items():
        if not isinstance(fields, dict):
            merged[name] = fields
            continue
        merged[name] = {**{k: v for k, v in defaults.items() if k != "address"}, **fields}
        for path, line in list(src.lines.items()):
            if path[:1] == ("defaults",) and len(path) > 1 and path[1] not in fields:
                src.lines.setdefault(("hosts", name, *path[1:]), line)
    return {**data, "hosts": merged}


def _parse(data: Any, src: Source, path: Path) -> Inventory:
    doc = validate(InventoryDoc, _merge_defaults(data, src), src)
    base = path.parent
    hosts = []
    for name, h in doc.hosts.items():
        where = f"{h.user}@{h.address}{'' if h.port == 22 else f':{h.port}'}"
        hosts.append(
            Host(
                name=name,
                address=h.address,
                user=h.user,
                key_file=_resolve(base, h.key_file),
                port=h.port,
                libvirt_uri=h.libvirt_uri or f"qemu+ssh://{where}/system",
                labels=dict(h.labels),
                trust_on_first_use=h.trust_on_first_use,
                exporter_listen=h.exporter.listen,
                exporter_twin=h.exporter.twin or bool(h.exporter.what_if),
                exporter_what_if=tuple(h.exporter.what_if),
                exporter_twin_cpu=h.exporter.twin_cpu,
                prefix=h.prefix,
                python=h.python,
            )
        )
    return Inventory(path=path, hosts=tuple(hosts), known_hosts=_resolve(base, doc.known_hosts))


def _check_prefix(prefix: str, where: str) -> None:
    try:
        check_prefix(prefix)
    except Invalid as exc:
        raise InventoryError(f"{where}: {exc.message}", hint=exc.hint or HINT) from None


def _resolve(base: Path, value: str) -> Path:
    p = Path(os.path.expanduser(value))
    return p if p.is_absolute() else (base / p)
