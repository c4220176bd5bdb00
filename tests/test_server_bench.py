"""The server benchmark (`mlx_redrafter.benchmarks.server`): its figures by hand, its report, and
its client and process code end to end against a small OpenAI-style SSE server started as a
subprocess (standard library only), as the benchmark starts mlx_lm.server or ours."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from mlx_redrafter.benchmarks import server as bench
from mlx_redrafter.benchmarks.prompts import load_questions
from mlx_redrafter.benchmarks.server import Prompt, RequestRecord, Row

# The fake server: /health is 503 for its first `--not-ready-for` seconds; a chat completion
# streams a role-only chunk at once, then waits `--delay-per-word` x the prompt's words before
# the first content, then echoes the prompt's words upper-cased (one chunk each, up to
# max_tokens), a finish chunk, the usage chunk and [DONE]. A prompt containing "fail" gets 500.
FAKE_SERVER = textwrap.dedent(
    """
    import argparse, json, time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    p = argparse.ArgumentParser()
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--not-ready-for", type=float, default=0.5)
    p.add_argument("--delay-per-word", type=float, default=0.1)
    args = p.parse_args()
    started = time.monotonic()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):
            ready = time.monotonic() - started > args.not_ready_for
            code = 200 if self.path == "/health" and ready else 503
            self.send_response(code)
            self.end_headers()
            self.wfile.write(json.dumps({"status": "ok" if code == 200 else "loading"}).encode())

        def send(self, obj):
            self.wfile.write(f"data: {json.dumps(obj)}\\n\\n".encode())
            self.wfile.flush()

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            assert body["stream"] and body["stream_options"] == {"include_usage": True}
            assert body["temperature"] == 0.0
            words = body["messages"][-1]["content"].split()
            if "fail" in words:
                self.send_response(500)
                self.end_headers()
                self.wfile.write(b"fake failure")
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            self.send({"choices": [{"index": 0, "delta": {"role": "assistant"}}]})
            time.sleep(args.delay_per_word * len(words))
            out = [w.upper() for w in words][: body["max_tokens"]]
            for w in out:
                self.send({"choices": [{"index": 0, "delta": {"content": w + " "}}]})
            reason = "length" if len(out) < len(words) else "stop"
            self.send({"choices": [{"index": 0, "delta": {}, "finish_reason": reason}]})
            usage = {"prompt_tokens": len(words), "completion_tokens": len(out)}
            self.send({"choices": [], "usage": usage})
            self.wfile.write(b"data: [DONE]\\n\\n")

    ThreadingHTTPServer((args.host, args.port), Handler).serve_forever()
    """
)


def _record(client, index, start, first, end, tokens, text="", error=None) -> dict:
    rec = RequestRecord(client, index, f"q{client}{index}", "cat", start_s=start)
    rec.first_token_s, rec.end_s, rec.completion_tokens = first, end, tokens
    rec.text, rec.error = text, error
    return rec.to_json()


def _requests() -> list[dict]:
    return [
        _record(0, 0, 0.0, 0.5, 2.0, 10, "a"),
        _record(0, 1, 2.0, 2.2, 4.0, 30, "b"),
        _record(1, 0, 0.0, 1.0, 3.0, 12, "c"),
        _record(1, 1, 3.0, None, 3.5, None, error="HTTP 500: boom"),
    ]


# ---------------------------------------------------------------------------- figures
def test_request_records_give_ttft_and_wall_time():
    r = _requests()[1]
    assert r["ok"] and r["ttft_s"] == pytest.approx(0.2) and r["wall_s"] == pytest.approx(2.0)
    failed = _requests()[3]
    assert not failed["ok"] and failed["ttft_s"] is None and failed["wall_s"] == 0.5


def test_row_figures_by_hand():
    s = bench.summarize_requests(_requests(), burst_s=5.0)
    assert (s["requests_ok"], s["requests_failed"]) == (3, 1)
    # TTFTs of the ok requests: 0.5, 0.2, 1.0
    assert s["ttft_median_s"] == pytest.approx(0.5)
    assert s["ttft_p90_s"] == pytest.approx(0.5 + 0.8 * 0.5)  # 90% lies 0.8 of the way 0.5 -> 1
    # client 0: 40 tokens over 0..4 s; client 1: 12 tokens over 0..3.5 s (its failure included)
    assert s["client_tps"] == {"0": pytest.approx(10.0), "1": pytest.approx(12 / 3.5)}
    assert s["client_tps_median"] == pytest.approx((10.0 + 12 / 3.5) / 2)
    assert s["completion_tokens"] == 52 and s["total_tps"] == pytest.approx(52 / 5.0)


def test_a_row_with_no_successful_request_has_no_rates():
    failed = [_record(0, 0, 0.0, None, 1.0, None, error="x")]
    s = bench.summarize_requests(failed, burst_s=1.0)
    assert s["total_tps"] is None and s["ttft_median_s"] is None and s["client_tps"] == {"0": None}


def test_percentile_interpolates_like_numpy():
    from mlx_redrafter.benchmarks import metrics

    values = [3.0, None, 1.0, 10.0, 4.0]
    assert metrics.percentile(values, 90) == pytest.approx(np.percentile([1, 3, 4, 10], 90))
    assert metrics.percentile([], 50) is None


def test_texts_are_compared_per_slot_and_rows_get_ratios():
    ref = _requests()
    other = _requests()
    other[0]["text"] = "different"
    other[2]["error"], other[2]["ok"] = "broken stream", False  # not compared
    assert bench.text_matches(ref, other) == {"compared": 2, "exact": 1, "differing": ["q00"]}
    other[2]["error"], other[2]["ok"] = None, True
    assert bench.text_matches(ref, other) == {"compared": 3, "exact": 2, "differing": ["q00"]}

    rows = {
        "mlx_lm": {"status": "ok", "requests": ref, "summary": bench.summarize_requests(ref, 5.0)},
        "ours": {"status": "ok", "requests": other, "summary": bench.summarize_requests(ref, 4.0)},
        "plain": {"status": "failed", "error": "exited"},
    }
    bench.compare_rows(rows)
    vs = rows["ours"]["vs_mlx_lm"]
    assert vs["total_tps"] == pytest.approx((52 / 4.0) / (52 / 5.0))
    assert vs["client_tps_median"] == pytest.approx(1.0) and vs["ttft_median"] == 1.0
    assert vs["text"]["exact"] == 2 and rows["mlx_lm"]["vs_mlx_lm"]["text"] is None
    assert "vs_mlx_lm" not in rows["plain"]

    no_reference = {"ours": {"status": "ok", "requests": other, "summary": {}}}
    bench.compare_rows(no_reference)
    assert "vs_mlx_lm" not in no_reference["ours"]


def test_prompts_are_distinct_across_clients_until_they_run_out():
    prompts = [Prompt(str(i), "c", []) for i in range(6)]
    ids = lambda a: [[p.question_id for p in ps] for ps in a]  # noqa: E731
    assert ids(bench.assign_prompts(prompts, 3, 2)) == [["0", "3"], ["1", "4"], ["2", "5"]]
    assert ids(bench.assign_prompts(prompts, 4, 2)) == [
        ["0", "4"],
        ["1", "5"],
        ["2", "0"],
        ["3", "1"],
    ]
    with pytest.raises(ValueError, match="no prompts"):
        bench.assign_prompts([], 1, 1)
    loaded = bench.load_prompts(str(bench.DEFAULT_PROMPTS), 8)
    assert len({p.question_id for p in loaded}) == 8 and len({p.category for p in loaded}) == 8
    first_turns = {q.question_id: q.turns[0] for q in load_questions(bench.DEFAULT_PROMPTS)}
    for p in loaded:
        assert p.messages == [{"role": "user", "content": first_turns[p.question_id]}]


# ---------------------------------------------------------------------------- CLI and rows
def test_rows_and_flags():
    args = bench.setup_arg_parser().parse_args(
        ["--quick", "--rows", "ours, plain", "--server-arg=--beam-width 1 --beam-length 4"]
        + ["--server-arg=--no-guard"]
    )
    bench.resolve_defaults(args)
    assert (args.clients, args.requests, args.max_tokens, args.name) == (2, 1, 64, "server-quick")
    assert args.server_args == ["--beam-width", "1", "--beam-length", "4", "--no-guard"]
    ours, plain = bench.build_rows(args.rows, "/m", args.server_args)
    assert ours.command[1:] == ["-m", "mlx_redrafter.server", "--model", "/m"] + args.server_args
    assert plain.command[-1] == "--no-speculation" and "--beam-width" not in plain.command
    [lm] = bench.build_rows(["mlx_lm"], "/m", args.server_args)
    assert lm.command[3:] == ["server", "--model", "/m"]
    assert "preload_openblas" in lm.command[2]  # same BLAS as our rows
    # no --model: ours starts as a user's plain start does (the bundled drafter is found)
    [ours] = bench.build_rows(["ours"], None, [])
    assert "--model" not in ours.command
    for bad in (["nope"], [], ["ours", "ours"]):
        with pytest.raises(ValueError, match="--rows"):
            bench.build_rows(bad, "/m", [])


def test_cli_reports_bad_input(capsys):
    assert bench.main(["--rows", "mlx_lm,vllm"]) == 2
    assert "--rows must name some of mlx_lm, plain, ours" in capsys.readouterr().err
    assert bench.main(["--clients", "0", "--rows", "ours"]) == 2
    assert "--clients must be at least 1" in capsys.readouterr().err


# ---------------------------------------------------------------------------- end to end
@pytest.fixture
def fake_server(tmp_path):
    script = tmp_path / "fake_server.py"
    script.write_text(FAKE_SERVER)
    return [sys.executable, str(script)]


def test_a_row_against_a_streaming_server(fake_server):
    # client 0: 1 word then 6 words; client 1: 3 words then a failing request
    words = lambda n: " ".join(f"w{i}" for i in range(n))  # noqa: E731
    msg = lambda text: [{"role": "user", "content": text}]  # noqa: E731
    assignment = [
        [Prompt("a", "x", msg(words(1))), Prompt("b", "x", msg(words(6)))],
        [Prompt("c", "y", msg(words(3))), Prompt("d", "y", msg("please fail"))],
    ]
    row = Row("fake", "fake server", fake_server)
    result = bench.run_row(row, assignment, max_tokens=4, startup_timeout=30, warmup_tokens=2)

    assert result["status"] == "ok", result
    assert result["startup_s"] >= 0.4  # /health answered 503 first: the poll waited for 200
    assert result["exit_code"] == -15  # stopped by SIGTERM
    reqs = {r["question_id"]: r for r in result["requests"]}
    assert [(r["client"], r["index"]) for r in result["requests"]] == [
        (0, 0),
        (0, 1),
        (1, 0),
        (1, 1),
    ]
    assert reqs["a"]["text"] == "W0 " and reqs["a"]["completion_tokens"] == 1
    assert reqs["b"]["text"] == "W0 W1 W2 W3 " and reqs["b"]["completion_tokens"] == 4  # max_tokens
    assert reqs["b"]["finish_reason"] == "length" and reqs["c"]["finish_reason"] == "stop"
    assert reqs["c"]["chunks"] == 3 and reqs["c"]["prompt_tokens"] == 3
    # TTFT is the first content, not the role-only chunk sent at once: at least the delay, and
    # ordered as the delays (0.1 s per prompt word) although the clients ran side by side
    for qid, n in (("a", 1), ("b", 6), ("c", 3)):
        assert reqs[qid]["ttft_s"] >= 0.1 * n
    assert reqs["a"]["ttft_s"] < reqs["c"]["ttft_s"] < reqs["b"]["ttft_s"]
    assert reqs["c"]["start_s"] < reqs["a"]["end_s"]  # client 1 did not wait for client 0
    assert reqs["b"]["start_s"] >= reqs["a"]["end_s"]  # a client's requests run in turn
    assert not reqs["d"]["ok"] and reqs["d"]["error"].startswith("HTTP 500: fake failure")

    s = result["summary"]
    assert (s["requests_ok"], s["requests_failed"], s["completion_tokens"]) == (3, 1, 8)
    assert s["total_tps"] == pytest.approx(8 / s["burst_s"])
    assert s["burst_s"] >= max(r["end_s"] for r in result["requests"])
    assert "log_tail" in result  # a failed request keeps the server's log


def test_a_server_that_exits_fails_its_row_with_its_log(tmp_path):
    code = "import sys; print('cannot load the model', file=sys.stderr); sys.exit(3)"
    row = Row("broken", "broken", [sys.executable, "-c", code])
    result = bench.run_row(row, [[Prompt("a", "x", [])]], max_tokens=4, startup_timeout=30)
    assert (
        result["status"] == "failed" and result["error"] == "exited with code 3 before it was ready"
    )
    assert "cannot load the model" in result["log_tail"] and result["exit_code"] == 3
    missing = Row("missing", "missing", [str(tmp_path / "no-such-server")])
    result = bench.run_row(missing, [[Prompt("a", "x", [])]], max_tokens=4, startup_timeout=30)
    assert result["status"] == "failed" and "FileNotFoundError" in result["error"]


def test_stop_kills_a_server_that_ignores_sigterm():
    code = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('handler set', flush=True); time.sleep(60)"
    )
    server = bench.ServerProcess([sys.executable, "-c", code])
    server.start()
    try:
        with pytest.raises(bench.ServerFailed, match="not ready after"):
            server.wait_ready(timeout=1.0)
        assert "handler set" in server.log_tail()
        assert server.stop(grace=0.5) == -9
    finally:
        server.close()


def test_report_files(tmp_path):
    requests = _requests()
    ok = {
        "label": "mlx_lm.server",
        "status": "ok",
        "requests": requests,
        "summary": bench.summarize_requests(requests, 5.0),
    }
    failed = {
        "label": "ours",
        "status": "failed",
        "error": "exited with code 1\n|x",
        "log_tail": "Traceback: boom",
    }
    results = {
        "environment": {
            "date": "2026-12-06 00:00:00 UTC",
            "machine": {"platform": "Linux", "processor": "cpu", "cpu_count": 2},
            "backend": "Device(cpu, 0)",
            "blas": "OpenBLAS",
            "versions": {"mlx": "0.32.4", "git": "abc1234"},
        },
        "config": {"model": "m", "clients": 2, "requests": 2, "max_tokens": 64, "server_args": []},
        "rows": {"mlx_lm": ok, "ours": failed},
        "wall_s": 12.0,
    }
    bench.compare_rows(results["rows"])
    paths = bench.write_outputs(results, tmp_path, "t")
    assert [p.suffix for p in paths][:2] == [".json", ".md"]
    back = json.loads(paths[0].read_text())
    assert back["rows"]["mlx_lm"]["requests"][0]["text"] == "a"
    assert back["rows"]["mlx_lm"]["summary"]["total_tps"] == pytest.approx(10.4)
    md = paths[1].read_text()
    assert "| mlx_lm.server | 3 / 1 | 0.500 | 0.900 | 6.7 | 10.4 | 1.000 | 1.000 | - |" in md
    assert "| ours | failed: exited with code 1 /x |" in md  # one table line, no stray column
    assert "Traceback: boom" in md and "Not shown:" in md and "git abc1234" in md
    pytest.importorskip("matplotlib")
    assert paths[2].suffix == ".png" and paths[2].stat().st_size > 0


def test_the_module_runs_as_a_script():
    proc = subprocess.run(
        [sys.executable, "-m", "mlx_redrafter.benchmarks.server", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0 and "--server-arg" in proc.stdout


def test_a_row_against_mlx_lm_server_on_a_tiny_model(tiny_model_dir):
    """The real reference server speaks what the client reads: health, content chunks, the
    usage chunk and [DONE], for two clients at once."""
    [row] = bench.build_rows(["mlx_lm"], str(tiny_model_dir), [])
    msg = lambda text: [{"role": "user", "content": text}]  # noqa: E731
    assignment = [[Prompt("a", "x", msg("t5 t6 t7"))], [Prompt("b", "x", msg("t8 t9"))]]
    result = bench.run_row(row, assignment, max_tokens=6, startup_timeout=120, warmup_tokens=2)
    assert result["status"] == "ok", result.get("log_tail")
    for r in result["requests"]:
        assert r["ok"], r["error"]
        assert 1 <= r["completion_tokens"] <= 6 and r["chunks"] >= 1 and r["text"]
        assert r["finish_reason"] in ("length", "stop") and r["prompt_tokens"] > 3
        assert 0 < r["ttft_s"] <= r["wall_s"]
    assert result["summary"]["completion_tokens"] == sum(
        r["completion_tokens"] for r in result["requests"]
    )
