"""The real `mlx_redrafter.server` in a child process, for the server tests: a free port on
127.0.0.1, a tiny model folder, pinned speculation (no tuning runs), output to files."""

from __future__ import annotations

import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import openai

from mlx_redrafter.benchmarks.server import ServerFailed, ServerProcess

# beam shape pinned: the tuner never runs; the guard off: every step drafts
PINNED = ["--beam-width", "2", "--beam-length", "3", "--prompt-lookup", "0", "--no-guard"]
API_KEY = "test-key"


def openai_client(
    server: ServerProcess, api_key: str = API_KEY, timeout: float = 120
) -> openai.OpenAI:
    """OpenAI's client on the server's /v1, without retries: a failed request fails the test."""
    return openai.OpenAI(
        base_url=server.url + "/v1", api_key=api_key, max_retries=0, timeout=timeout
    )


def port_is_free(port: int) -> bool:
    """True when a new server could listen on `port`: bound with SO_REUSEADDR as uvicorn binds,
    so the closed connections' TIME_WAIT entries (left whenever the server hangs up first, as
    it does mid-stream on a signal) do not count, while a socket still listening does."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def start_server(model_dir: Path, log_dir: Path, *extra: str) -> ServerProcess:
    """The server on a free port of 127.0.0.1, its stdout and stderr in `log_dir`."""
    command = [sys.executable, "-m", "mlx_redrafter.server", "--model", str(model_dir)]
    command += ["--log-level", "WARNING", *PINNED, *extra]
    return ServerProcess(command, log_dir=log_dir).start()


@contextmanager
def running(process: ServerProcess) -> Iterator[ServerProcess]:
    """The started server once /health says ready; stopped however the block ends."""
    try:
        try:
            process.wait_ready()
        except ServerFailed as failure:
            raise ServerFailed(f"{failure}:\n{process.log_tail()}") from None
        yield process
    finally:
        process.close()
