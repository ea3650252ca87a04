"""The guest agent built natively in its stdio mode (-DKSMH_AGENT_STDIO: requests on stdin,
replies on stdout) and the AgentClient Channel over its pipes, shared by the tests that drive
the real C agent without booting a guest."""

from __future__ import annotations

import os
import select
import subprocess
from pathlib import Path

from harness.paths import data_path

DATA = "harness.guests"
AGENT_SOURCE = data_path(DATA, "data/ksmh-agent.c")
WORKER_SOURCE = data_path(DATA, "data/ksmh-worker.c")


def build(source: Path, out: Path, *defines: str) -> Path:
    """gcc -O2 -Wall `source` into `out` (raises CalledProcessError on a compile error)."""
    subprocess.run(["gcc", "-O2", "-Wall", *defines, "-o", str(out), str(source)], check=True)
    return out


def build_stdio_agent(out_dir: Path) -> Path:
    return build(AGENT_SOURCE, out_dir / "ksmh-agent-stdio", "-DKSMH_AGENT_STDIO")


class PipeChannel:
    """The AgentClient's Channel over the stdio agent's pipes."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdin is not None and proc.stdout is not None
        self.proc, self.out, self.inp = proc, proc.stdout.fileno(), proc.stdin

    def send(self, data: bytes) -> None:
        self.inp.write(data)
        self.inp.flush()

    def recv(self, timeout: float) -> bytes:
        ready, _, _ = select.select([self.out], [], [], timeout)
        if not ready:
            raise TimeoutError
        return os.read(self.out, 65536)

    def close(self) -> None:
        pass
