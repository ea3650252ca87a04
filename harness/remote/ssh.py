"""SSH sessions to inventory hosts (fabric over paramiko) with host keys checked.

Security rules enforced here, not left to callers:
- the server's key must be in the inventory's known_hosts file; an unknown key is refused
  unless the host says `trust_on_first_use: true`, in which case it is recorded there; a key
  that differs from the recorded one is always refused;
- authentication is by the inventory's key file only (no agent, no ~/.ssh guessing, no
  passwords), and neither ~/.ssh/config nor fabric's config files are read, so what runs
  is what the inventory says;
- remote commands are argv lists, joined with shlex.join for the remote shell.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import io
import logging
import shlex
import stat
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paramiko

from harness.errors import RemoteCommandFailed
from harness.remote.inventory import Host

CONNECT_TIMEOUT = 10.0

# paramiko logs what it also raises, e.g. "Secsh channel 1 open FAILED: Connection refused" at
# ERROR when the exporter is not listening; with no handler configured, Python's last-resort
# handler would print that to stderr beside our own one-line report of the same failure. A
# NullHandler stops that and leaves paramiko's records to an application that wants them.
logging.getLogger("paramiko").addHandler(logging.NullHandler())


class HostUnreachable(RemoteCommandFailed):
    """No SSH session could be opened (network, refused, authentication)."""


class HostKeyRefused(RemoteCommandFailed):
    """The server's host key is unknown (and TOFU is off) or differs from known_hosts."""


@dataclass(frozen=True)
class CommandResult:
    """What one remote command did."""

    argv: tuple[str, ...]
    exit_code: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


def fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH-style SHA256 fingerprint, as `ssh-keygen -lf` prints it."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


_KNOWN_HOSTS_LOCK = threading.Lock()  # parallel hosts may record keys in the same file


class KnownHostsPolicy(paramiko.MissingHostKeyPolicy):
    """Refuse unknown keys, or record them when the host allows trust on first use."""

    def __init__(self, host: Host, known_hosts: Path) -> None:
        self.host = host
        self.known_hosts = known_hosts

    def missing_host_key(
        self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey
    ) -> None:
        fp = fingerprint(key)
        if not self.host.trust_on_first_use:
            port = [] if self.host.port == 22 else ["-p", str(self.host.port)]
            scan = shlex.join(["ssh-keyscan", *port, self.host.address])
            raise HostKeyRefused(
                f"{self.host.name}: unknown host key {key.get_name()} {fp} for {hostname} "
                f"(not in {self.known_hosts})",
                hint=f"check the fingerprint out of band, then `{scan} >> {self.known_hosts}`, "
                "or set trust_on_first_use: true for this host",
            )
        line = f"{hostname} {key.get_name()} {key.get_base64()}\n"
        with _KNOWN_HOSTS_LOCK:
            self.known_hosts.parent.mkdir(parents=True, exist_ok=True)
            with self.known_hosts.open("a") as f:
                fcntl.flock(f, fcntl.LOCK_EX)  # other ksmh processes may append too
                f.write(line)
        client.get_host_keys().add(hostname, key.get_name(), key)


class Session:
    """An open SSH connection to one inventory host. Use as a context manager."""

    def __init__(self, host: Host, connection: Any) -> None:
        self.host = host
        self._conn = connection  # fabric.Connection (untyped library)

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._conn.close()

    def run(
        self,
        argv: Sequence[str],
        *,
        check: bool = True,
        timeout: float | None = 120.0,
        stdin: str | None = None,
        on_stderr: Callable[[str], None] | None = None,
    ) -> CommandResult:
        """Run argv on the host (quoted with shlex.join); raise RemoteCommandFailed if check.

        on_stderr, when given, is called with each line of the command's stderr as it arrives
        (progress of a long command); the result still holds all of it.
        """
        from invoke.exceptions import CommandTimedOut

        if isinstance(argv, str) or not argv:
            raise TypeError("argv must be a non-empty list of arguments, not a command string")
        args = tuple(str(a) for a in argv)
        command = shlex.join(args)
        err = None if on_stderr is None else _LineWriter(on_stderr)
        try:
            r = self._conn.run(
                command,
                hide=True if on_stderr is None else "out",
                err_stream=err,
                warn=True,
                timeout=timeout,
                in_stream=io.StringIO(stdin) if stdin is not None else False,
            )
        except CommandTimedOut:
            raise RemoteCommandFailed(
                f"{self.host.name}: `{command}` timed out after {timeout} s"
            ) from None
        except (paramiko.SSHException, OSError) as exc:
            raise RemoteCommandFailed(f"{self.host.name}: `{command}`: {exc}") from None
        finally:
            if err is not None:
                err.close()  # a last line without its newline
        result = CommandResult(args, int(r.exited), str(r.stdout), str(r.stderr))
        if check and not result.ok:
            last = (result.stderr.strip().splitlines() or [""])[-1]
            raise RemoteCommandFailed(
                f"{self.host.name}: `{command}` exited {result.exit_code}: {last}"
            )
        return result

    def put_bytes(self, data: bytes, remote_path: str, mode: int = 0o644) -> None:
        """Write data to remote_path over SFTP (replaced atomically via a temp name)."""
        sftp = self._conn.sftp()
        tmp = f"{remote_path}.tmp-ksmh"
        try:
            with sftp.open(tmp, "wb") as f:
                f.set_pipelined(True)
                f.write(data)
            sftp.chmod(tmp, mode)
            sftp.posix_rename(tmp, remote_path)
        except OSError as exc:
            raise RemoteCommandFailed(
                f"{self.host.name}: cannot write {remote_path}: {exc}"
            ) from None

    def listdir(self, remote_dir: str) -> list[str]:
        """Names in remote_dir (SFTP), sorted; [] when it does not exist."""
        try:
            return sorted(self._conn.sftp().listdir(remote_dir))
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise RemoteCommandFailed(
                f"{self.host.name}: cannot list {remote_dir}: {exc}"
            ) from None

    def fetch_dir(self, remote_dir: str, local_dir: Path) -> list[str]:
        """Copy the regular files under remote_dir into local_dir over SFTP, recursively.

        Returns the relative paths copied. Symlinks, special files and names with a "/" or
        of "."/".." are skipped, so a remote tree cannot make us write outside local_dir.
        """
        sftp = self._conn.sftp()
        copied: list[str] = []

        def walk(rdir: str, ldir: Path, rel: str) -> None:
            ldir.mkdir(parents=True, exist_ok=True)
            for entry in sorted(sftp.listdir_attr(rdir), key=lambda e: e.filename):
                name = entry.filename
                if "/" in name or name in (".", ".."):
                    continue  # a server's name must not climb out of local_dir
                mode = entry.st_mode or 0
                if stat.S_ISDIR(mode):
                    walk(f"{rdir}/{name}", ldir / name, f"{rel}{name}/")
                elif stat.S_ISREG(mode):
                    sftp.get(f"{rdir}/{name}", str(ldir / name))
                    copied.append(f"{rel}{name}")

        try:
            walk(remote_dir, local_dir, "")
        except OSError as exc:
            raise RemoteCommandFailed(
                f"{self.host.name}: cannot fetch {remote_dir}: {exc}"
            ) from None
        return copied

    def http_get(self, address: str, path: str = "/metrics", timeout: float = 5.0) -> str:
        """GET http://address/path as seen from the host, through an SSH direct-tcpip channel.

        So `hosts check` tests the exporter on exactly the address the inventory names, even
        when that address is the host's loopback. Returns the body; raises on non-200.
        """
        host, _, port = address.rpartition(":")
        host = host.strip("[]")
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        transport = self._conn.client.get_transport()
        try:
            chan = transport.open_channel("direct-tcpip", (host, int(port)), ("127.0.0.1", 0))
        except (paramiko.SSHException, OSError) as exc:
            raise RemoteCommandFailed(
                f"{self.host.name}: nothing answers on {address}: {exc}"
            ) from None
        chan.settimeout(timeout)
        try:
            req = f"GET {path} HTTP/1.0\r\nHost: {address}\r\nConnection: close\r\n\r\n"
            chan.sendall(req.encode())
            chunks = []
            while True:
                data = chan.recv(65536)
                if not data:
                    break
                chunks.append(data)
        except (TimeoutError, OSError) as exc:
            raise RemoteCommandFailed(f"{self.host.name}: {address}{path}: {exc}") from None
        finally:
            chan.close()
        head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
        status = head.split(b"\r\n", 1)[0].decode(errors="replace")
        if " 200 " not in f"{status} ":
            raise RemoteCommandFailed(f"{self.host.name}: {address}{path} answered {status!r}")
        return body.decode(errors="replace")


class _LineWriter:
    """A write()-able stream that hands complete lines to a callback (invoke's err_stream)."""

    def __init__(self, emit: Callable[[str], None]) -> None:
        self.emit = emit
        self.partial = ""

    def write(self, data: str) -> int:
        self.partial += data
        *lines, self.partial = self.partial.split("\n")
        for line in lines:
            self.emit(line.rstrip("\r"))
        return len(data)

    def flush(self) -> None:
        pass  # a partial line waits for its newline; Session.run closes us at the end

    def close(self) -> None:
        if self.partial:
            self.emit(self.partial)
            self.partial = ""


def connect(host: Host, known_hosts: Path, *, timeout: float = CONNECT_TIMEOUT) -> Session:
    """Open a session to host, checking its key against known_hosts (see module docstring)."""
    return open_session(configure(host, timeout=timeout), host, known_hosts)


def open_session(conn: Any, host: Host, known_hosts: Path) -> Session:
    """Open an unopened fabric Connection made by `configure` with our host key policy."""
    if not host.key_file.is_file():
        raise HostUnreachable(
            f"{host.name}: key file {host.key_file} does not exist",
            hint="generate one with ssh-keygen -t ed25519 and install its .pub on the host",
        )
    client = paramiko.SSHClient()
    if known_hosts.exists():
        client.load_host_keys(str(known_hosts))
    client.set_missing_host_key_policy(KnownHostsPolicy(host, known_hosts))
    conn.client = client  # replaces fabric's default AutoAddPolicy client
    try:
        _open(conn, host, known_hosts)
    except BaseException:
        client.close()  # a half-open transport would keep the server's session alive
        raise
    return Session(host, conn)


def configure(host: Host, cls: Any = None, *, timeout: float = CONNECT_TIMEOUT) -> Any:
    """The (unopened) fabric.Connection (or subclass `cls`) for host, from the inventory alone.

    An empty ssh_config reads no ~/.ssh/config; lazy=True reads no /etc/fabric.yaml or
    ~/.fabric.yaml, whose connect_kwargs.key_filename, forward_agent or gateway would
    otherwise be merged in (another key tried, the agent forwarded to every fleet host).
    """
    from fabric import Config, Connection

    return (cls or Connection)(
        host.address,
        user=host.user,
        port=host.port,
        config=Config(ssh_config=paramiko.SSHConfig(), lazy=True),
        connect_timeout=int(timeout),
        connect_kwargs={
            "key_filename": str(host.key_file),
            "look_for_keys": False,
            "allow_agent": False,
            "banner_timeout": timeout,
            "auth_timeout": timeout,
        },
    )


def _open(conn: Any, host: Host, known_hosts: Path) -> None:
    """conn.open() with paramiko's exceptions turned into HostKeyRefused / HostUnreachable."""
    try:
        conn.open()
    except HostKeyRefused:
        raise
    except paramiko.BadHostKeyException as exc:
        raise HostKeyRefused(
            f"{host.name}: host key for {host.known_hosts_name} CHANGED: got "
            f"{fingerprint(exc.key)}, {known_hosts} has {fingerprint(exc.expected_key)}",
            hint="this can be an attack; if the host was reinstalled, remove the old line "
            f"with `ssh-keygen -R '{host.known_hosts_name}' -f {known_hosts}`",
        ) from None
    except paramiko.AuthenticationException as exc:
        raise HostUnreachable(
            f"{host.name}: authentication as {host.user} with {host.key_file} failed: {exc}",
            hint="is the key's .pub in the user's authorized_keys on the host?",
        ) from None
    except (paramiko.SSHException, OSError, EOFError) as exc:
        raise HostUnreachable(
            f"{host.name}: cannot connect to {host.address}:{host.port}: "
            f"{exc or type(exc).__name__}",
            hint="is sshd running there and the address/port right?",
        ) from None
