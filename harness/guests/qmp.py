"""A minimal QMP client: greeting, capabilities negotiation, execute, skip events.

Used by the plain QEMU backend for a clean `quit` and for `query-status`; every read has a
deadline so a wedged QEMU cannot hang teardown (the caller then falls back to signals).
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

from harness.errors import GuestError


class QmpClient:
    """One QMP connection (QEMU allows one client per monitor socket at a time)."""

    def __init__(self, path: Path, timeout: float = 5.0) -> None:
        self.path = path
        self.timeout = timeout
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self._buf = b""
        try:
            self.sock.connect(str(path))
            greeting = self._read()
            if "QMP" not in greeting:
                raise GuestError(f"{path}: not a QMP greeting: {greeting}")
            self.execute("qmp_capabilities")
        except OSError as exc:
            self.sock.close()
            raise GuestError(f"QMP {path}: {exc}") from exc
        except GuestError:
            self.sock.close()
            raise

    def _read(self) -> dict[str, Any]:
        deadline = time.monotonic() + self.timeout
        while b"\n" not in self._buf:
            if time.monotonic() > deadline:
                raise GuestError(f"QMP {self.path}: no answer within {self.timeout} s")
            chunk = self.sock.recv(65536)
            if not chunk:
                raise GuestError(f"QMP {self.path}: connection closed")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        msg: dict[str, Any] = json.loads(line)
        return msg

    def execute(self, command: str, **arguments: Any) -> Any:
        """Run a command and return its `return` value; raise GuestError on `error`."""
        req: dict[str, Any] = {"execute": command}
        if arguments:
            req["arguments"] = arguments
        self.sock.sendall(json.dumps(req).encode() + b"\n")
        while True:
            msg = self._read()
            if "event" in msg:
                continue
            if "error" in msg:
                err = msg["error"]
                raise GuestError(f"QMP {command}: {err.get('class')}: {err.get('desc')}")
            return msg.get("return")

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> QmpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
