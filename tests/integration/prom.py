"""Start the Debian `prometheus` binary for a test: loopback port, temp storage, always stopped."""

from __future__ import annotations

import json
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.run import Popen, spawn
from tests.integration.conftest import free_port


@dataclass
class Prometheus:
    url: str
    proc: Popen[bytes]

    def query(self, expr: str) -> list[dict[str, Any]]:
        q = urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(f"{self.url}/api/v1/query?{q}", timeout=5) as resp:
            body = json.load(resp)
        assert body["status"] == "success", body
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def wait_for(self, expr: str, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Poll until the query returns at least one series."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(expr)
            if result or time.monotonic() > deadline:
                return result
            time.sleep(0.25)


def wait_http(
    url: str, proc: Popen[bytes], timeout: float, why: Callable[[], str] = lambda: ""
) -> None:
    """Poll url until it answers; fail at once if proc exits, or after timeout seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not answer: {why()}") from None
            time.sleep(0.1)


@contextmanager
def prometheus(config: str, workdir: Path) -> Iterator[Prometheus]:
    """Run prometheus with `config` (YAML text) until the with-block ends."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "prometheus.yml").write_text(config)
    port = free_port()
    log = (workdir / "prometheus.log").open("wb")
    proc = spawn(
        [
            "prometheus",
            f"--config.file={workdir / 'prometheus.yml'}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=log,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        log_path = workdir / "prometheus.log"
        wait_http(
            f"{url}/-/ready", proc, 30, lambda: "prometheus did not start: " + log_path.read_text()
        )
        yield Prometheus(url, proc)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except Exception:
            proc.kill()
            proc.wait(10)
        log.close()
