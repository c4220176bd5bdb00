"""Starting and stopping mlx_redrafter.server: 503 until the model is ready, the URL printed
once it is, SIGTERM and Ctrl-C ending it cleanly (even mid-stream), the port released."""

from __future__ import annotations

import signal
import threading
import time

import httpx
import pytest
from serving import port_is_free, start_server

from mlx_redrafter.server.app import create_app
from mlx_redrafter.server.jobs import Worker


def test_health_is_503_until_the_model_is_ready():
    """In process, with a loader held on an event (no model needed): /health and the API
    answer 503 while loading, and name the failure if loading fails."""
    from starlette.testclient import TestClient

    release = threading.Event()

    def load():
        release.wait(30)
        raise FileNotFoundError("no such model folder")

    worker = Worker(load, lambda served, job: "completed")
    worker.start()
    with TestClient(create_app(worker)) as client:
        health = client.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "loading"
        chat = client.post("/v1/chat/completions", json={"messages": [{"role": "user"}]})
        assert chat.status_code == 503 and "not ready" in chat.json()["error"]["message"]
        release.set()
        deadline = time.monotonic() + 10
        while worker.stats.state == "loading" and time.monotonic() < deadline:
            time.sleep(0.01)
        failed = client.get("/health")
        assert failed.status_code == 503 and failed.json()["status"] == "failed"
        assert "no such model folder" in failed.json()["error"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_the_server_cleanly(tiny_model_dir, tmp_path, sig):
    server = start_server(tiny_model_dir, tmp_path)
    try:
        server.wait_ready()
        assert f"at http://127.0.0.1:{server.port}/v1" in server.stdout()
        body = {"messages": [{"role": "user", "content": "t5 t6"}], "max_tokens": 500}
        body["logit_bias"] = {"2": -100}  # no EOS: the reply runs until the signal
        lines, signalled = [], False
        with httpx.stream(
            "POST", server.url + "/v1/chat/completions", json=dict(body, stream=True), timeout=60
        ) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if line.startswith("data: "):
                    lines.append(line)
                if len(lines) == 3 and not signalled:  # once: a second Ctrl-C forces
                    server.proc.send_signal(sig)
                    signalled = True
        tic = time.monotonic()
        assert server.proc.wait(30) == 0
        assert time.monotonic() - tic < 20
        assert 3 <= len(lines) < 500
        assert "shutting down" in lines[-1] or lines[-1] == "data: [DONE]"
    finally:
        server.stop()
    assert "Traceback" not in server.stderr()
    assert port_is_free(server.port)
    server.close()
