"""The real `mlx_redrafter.server` in a child process, for the server tests: a free port on
127.0.0.1, a tiny model folder, pinned speculation (no tuning runs), output to files."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from mlx_redrafter.benchmarks.server import free_port

# beam shape pinned: the tuner never runs; the guard off: every step drafts
PINNED = ["--beam-width", "2", "--beam-length", "3", "--prompt-lookup", "0", "--no-guard"]
API_KEY = "test-key"


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    port: int
    log_dir: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stdout(self) -> str:
        return (self.log_dir / "stdout.txt").read_text()

    def stderr(self) -> str:
        return (self.log_dir / "stderr.txt").read_text()

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=10).json()

    def wait_ready(self, timeout: float = 120.0) -> list[int]:
        """Poll /health until 200; the statuses seen on the way."""
        seen = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}:\n{self.stderr()}")
            try:
                status = httpx.get(self.url + "/health", timeout=5).status_code
            except httpx.TransportError:
                status = None
            if status is not None:
                seen.append(status)
            if status == 200:
                return seen
            time.sleep(0.05)
        raise RuntimeError(f"server not ready after {timeout} s:\n{self.stderr()}")

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        return self.proc.wait(timeout)


def start_server(model_dir: Path, log_dir: Path, *extra: str) -> ServerProcess:
    port = free_port()
    log_dir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "mlx_redrafter.server", "--model", str(model_dir)]
    command += ["--port", str(port), "--log-level", "WARNING", *PINNED, *extra]
    proc = subprocess.Popen(
        command,
        stdout=(log_dir / "stdout.txt").open("w"),
        stderr=(log_dir / "stderr.txt").open("w"),
        cwd=log_dir,  # not the repository: nothing there shadows the installed package
    )
    return ServerProcess(proc, port, log_dir)


@contextmanager
def running(process: ServerProcess) -> Iterator[ServerProcess]:
    """The started server once /health says ready; stopped however the block ends."""
    try:
        process.wait_ready()
        yield process
    finally:
        process.stop()
