"""`python -m mlx_redrafter.benchmarks.server`: mlx_redrafter.server against mlx_lm.server under
concurrent streaming clients.

Each row is one server, started as a subprocess on 127.0.0.1 with a free port, polled on
`GET /health` until it answers 200, warmed up with one short request, loaded, then stopped
(SIGTERM, then SIGKILL after a grace period) before the next row starts, so rows never overlap.
Rows: `mlx_lm` (mlx_lm.server), `plain` (ours with `--no-speculation`), `ours` (ours with
drafting, plus the `--server-arg` flags). All three batch concurrent requests (continuous
batching, at their default limits: 32 decoding rows, 8 prompts prefilled together); give
`--server-arg=--no-batching` for ours served one request at a time. A row whose server fails
to start reports its log's tail; the other rows still run.

The load: `--clients` clients at once, each sending `--requests` streaming chat completions one
after another (temperature 0), MT-Bench first turns, a different question for every request.
Per request: time to the first content chunk (TTFT), completion tokens (the usage chunk), wall
time and the text. Per row: TTFT median and p90, tokens/s per client (its completion tokens
over the time from its first request to the end of its last one, TTFT and queueing included),
total tokens/s (all completion tokens over the burst's wall time), and how many texts equal
mlx_lm.server's for the same question. Writes `<out>/<stamp>-<name>.json`, `.md` and `.png`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from . import metrics
from .prompts import DEFAULT_PROMPTS, load_questions, quick_subset, turn_messages

if TYPE_CHECKING:
    import httpx

# In a checkout: benchmarks/results/; installed (no results/ folder): ./benchmark_results/.
RESULTS_DIR = Path(__file__).resolve().parent / "results"
if not RESULTS_DIR.is_dir():
    RESULTS_DIR = Path("benchmark_results")
ROWS = ("mlx_lm", "plain", "ours")
REFERENCE_ROW = "mlx_lm"
QUICK_CLIENTS, QUICK_REQUESTS, QUICK_TOKENS = 2, 1, 64
# mlx_lm.server maps this name to its --model; a request naming another model loads that one.
REQUEST_MODEL = "default_model"
WARMUP_MESSAGES = [{"role": "user", "content": "Say hello."}]
LOG_TAIL_CHARS = 4000


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- rows
@dataclass
class Row:
    """One server to measure: `command` is its argv without host and port (added at start)."""

    name: str
    label: str
    command: list[str]


def build_rows(names: Sequence[str], model: str | None, server_args: Sequence[str]) -> list[Row]:
    """The rows asked for, in the order given. mlx_lm.server needs a model folder: without
    `model`, the package's default model (converted on first use); ours then gets no --model,
    so it finds the default model's bundled drafter as a user's plain start does."""
    unknown = [n for n in names if n not in ROWS]
    if unknown or not names:
        raise ValueError(f"--rows must name some of {', '.join(ROWS)}; got {list(names)}")
    if len(set(names)) != len(names):
        raise ValueError(f"--rows names a row twice: {list(names)}")
    ours = [sys.executable, "-m", "mlx_redrafter.server"]
    ours += ["--model", model] if model else []
    rows = {
        "mlx_lm": lambda: Row(
            "mlx_lm",
            "mlx_lm.server",
            [*MLX_LM_WITH_OUR_BLAS, "server", "--model", model or _default_model()],
        ),
        "plain": lambda: Row(
            "plain", "mlx_redrafter.server --no-speculation", ours + ["--no-speculation"]
        ),
        "ours": lambda: Row(
            "ours",
            " ".join(["mlx_redrafter.server", *server_args]),
            ours + list(server_args),
        ),
    }
    return [rows[n]() for n in names]


# mlx_lm's CLI in a process that first loads the BLAS our engine uses (mlx_redrafter._blas:
# OpenBLAS on Linux where installed). Started plainly, mlx_lm.server would run on the mlx[cpu]
# wheel's reference BLAS, many times slower, and the rows would compare BLAS libraries, not
# servers. On macOS this changes nothing.
MLX_LM_WITH_OUR_BLAS = [
    sys.executable,
    "-c",
    "import sys, runpy, mlx_redrafter._blas as b; b.preload_openblas(); sys.argv[0] = 'mlx_lm'; "
    "runpy.run_module('mlx_lm', run_name='__main__')",
]


def _default_model() -> str:
    from mlx_redrafter.default_model import default_model_path

    return str(default_model_path())


# ---------------------------------------------------------------------------- server processes
def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the OS picks it; the server binds it right after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerFailed(RuntimeError):
    """A server exited or never became ready; the message carries its log's tail."""


class ServerProcess:
    """A server subprocess with its output in files (no pipe to fill up): one temporary file,
    or stdout.txt and stderr.txt in `log_dir`, which is then also its working folder (the
    tests read each stream; nothing in the repository shadows the installed package there).

    It runs in its own session: Ctrl-C in the benchmark's terminal reaches the benchmark, whose
    `stop` then ends the server, instead of killing both halfway through a row."""

    def __init__(
        self,
        command: Sequence[str],
        host: str = "127.0.0.1",
        port: int | None = None,
        log_dir: Path | None = None,
    ):
        self.host = host
        self.port = port or free_port()
        self.command = [*command, "--host", host, "--port", str(self.port)]
        self.log_dir = log_dir
        if log_dir is None:
            self.log_file, self.err_file = tempfile.TemporaryFile(), None
        else:
            log_dir.mkdir(parents=True, exist_ok=True)
            self.log_file = (log_dir / "stdout.txt").open("w+b")
            self.err_file = (log_dir / "stderr.txt").open("w+b")
        self.proc: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    url = base_url

    def start(self) -> ServerProcess:
        self.proc = subprocess.Popen(
            self.command,
            stdin=subprocess.DEVNULL,
            stdout=self.log_file,
            stderr=self.err_file or subprocess.STDOUT,
            start_new_session=True,
            cwd=self.log_dir,
        )
        return self

    def wait_ready(self, timeout: float = 120.0, poll: float = 0.25) -> float:
        """Poll GET /health until 200; seconds it took. ServerFailed if it exits or times out
        (its output: `log_tail`)."""
        import httpx

        started = time.perf_counter()
        deadline = started + timeout
        with httpx.Client(timeout=5.0) as client:
            while True:
                code = self.proc.poll()
                if code is not None:
                    raise ServerFailed(f"exited with code {code} before it was ready")
                try:
                    if client.get(self.base_url + "/health").status_code == 200:
                        return time.perf_counter() - started
                except httpx.TransportError:
                    pass  # not listening yet
                if time.perf_counter() > deadline:
                    raise ServerFailed(f"not ready after {timeout:.0f} s")
                time.sleep(poll)

    def health(self) -> dict:
        import httpx

        return httpx.get(self.base_url + "/health", timeout=10).json()

    def stop(self, grace: float = 15.0) -> int | None:
        """SIGTERM, wait `grace` seconds, then SIGKILL; the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    @staticmethod
    def _read(file, chars: int | None = None) -> str:
        file.flush()
        size = file.seek(0, os.SEEK_END)
        file.seek(0 if chars is None else max(0, size - chars))
        return file.read().decode("utf-8", errors="replace")

    def stdout(self) -> str:
        """Everything the server printed (with stderr too when there is no `log_dir`)."""
        return self._read(self.log_file)

    def stderr(self) -> str:
        return self._read(self.err_file) if self.err_file is not None else self.stdout()

    def log_tail(self, chars: int = LOG_TAIL_CHARS) -> str:
        tail = self._read(self.log_file, chars)
        if self.err_file is not None:
            tail += self._read(self.err_file, chars)
        return tail

    def close(self) -> None:
        self.stop()
        self.log_file.close()
        if self.err_file is not None:
            self.err_file.close()


# ---------------------------------------------------------------------------- clients
@dataclass
class Prompt:
    question_id: str
    category: str
    messages: list[dict]


@dataclass
class RequestRecord:
    """One streamed request; times in seconds from the burst's start."""

    client: int
    index: int  # the request's place in its client's sequence
    question_id: str
    category: str
    start_s: float
    end_s: float | None = None
    first_token_s: float | None = None
    completion_tokens: int | None = None
    prompt_tokens: int | None = None
    finish_reason: str | None = None
    text: str = ""
    error: str | None = None
    chunks: int = 0  # content chunks received

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.start_s

    @property
    def wall_s(self) -> float | None:
        return None if self.end_s is None else self.end_s - self.start_s

    def to_json(self) -> dict:
        return asdict(self) | {"ok": self.ok, "ttft_s": self.ttft_s, "wall_s": self.wall_s}


def assign_prompts(prompts: Sequence[Prompt], clients: int, requests: int) -> list[list[Prompt]]:
    """prompts for each client: request r of client c gets prompt r * clients + c, so the
    clients' first requests are the first prompts; prompts repeat only when there are fewer
    than clients x requests."""
    if not prompts:
        raise ValueError("no prompts to send")
    return [
        [prompts[(r * clients + c) % len(prompts)] for r in range(requests)] for c in range(clients)
    ]


def chat_body(messages: list[dict], max_tokens: int) -> dict:
    return {
        "model": REQUEST_MODEL,
        "messages": messages,
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0.0,
        "max_tokens": max_tokens,
    }


async def stream_chat(
    client: httpx.AsyncClient,
    url: str,
    record: RequestRecord,
    body: dict,
    clock: Callable[[], float],
) -> None:
    """Send one streaming chat completion and fill `record` as the chunks arrive.

    TTFT stops at the first chunk with content (a role-only first chunk does not count).
    Errors (HTTP status, a broken stream, no usage chunk) go into `record.error`."""
    try:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                detail = (await response.aread()).decode("utf-8", errors="replace")
                record.error = f"HTTP {response.status_code}: {detail[:300]}"
                return
            done = False
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[len("data:") :].strip()
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if chunk.get("error"):
                    record.error = f"server error: {chunk['error']}"
                    return
                for choice in chunk.get("choices") or []:
                    content = (choice.get("delta") or {}).get("content")
                    if content:
                        if record.first_token_s is None:
                            record.first_token_s = clock()
                        record.text += content
                        record.chunks += 1
                    if choice.get("finish_reason"):
                        record.finish_reason = choice["finish_reason"]
                usage = chunk.get("usage")
                if usage:
                    record.completion_tokens = usage.get("completion_tokens")
                    record.prompt_tokens = usage.get("prompt_tokens")
            if not done:
                record.error = "stream ended without data: [DONE]"
            elif record.completion_tokens is None:
                record.error = "no usage chunk (stream_options.include_usage)"
    except Exception as e:  # any failure is this request's own, reported in its row
        record.error = f"{type(e).__name__}: {e}"
    finally:
        record.end_s = clock()


async def run_burst(
    base_url: str,
    assignment: list[list[Prompt]],
    max_tokens: int,
    timeout: float = 600.0,
) -> tuple[list[RequestRecord], float]:
    """All clients at once, each sending its prompts in turn; (records, burst wall seconds)."""
    import httpx

    url = base_url + "/v1/chat/completions"
    started = time.perf_counter()
    clock = lambda: time.perf_counter() - started
    records: list[RequestRecord] = []
    limits = httpx.Limits(max_connections=len(assignment) + 1)

    async with httpx.AsyncClient(timeout=timeout, limits=limits) as http:

        async def client_loop(c: int, prompts: list[Prompt]) -> None:
            for i, p in enumerate(prompts):
                rec = RequestRecord(c, i, p.question_id, p.category, start_s=clock())
                records.append(rec)
                await stream_chat(http, url, rec, chat_body(p.messages, max_tokens), clock)

        await asyncio.gather(*(client_loop(c, ps) for c, ps in enumerate(assignment)))
    wall = time.perf_counter() - started
    records.sort(key=lambda r: (r.client, r.index))
    return records, wall


# ---------------------------------------------------------------------------- figures
def client_tps(requests: Sequence[dict]) -> dict[int, float | None]:
    """Per client: its completion tokens over the time from its first start to its last end."""
    by_client: dict[int, list[dict]] = {}
    for r in requests:
        by_client.setdefault(r["client"], []).append(r)
    out = {}
    for c, rs in sorted(by_client.items()):
        ok = [r for r in rs if r["ok"]]
        if not ok:
            out[c] = None
            continue
        span = max(r["end_s"] for r in rs) - min(r["start_s"] for r in rs)
        tokens = sum(r["completion_tokens"] for r in ok)
        out[c] = tokens / span if span > 0 else None
    return out


def summarize_requests(requests: Sequence[dict], burst_s: float) -> dict:
    """A row's table figures from its per-request records (JSON form)."""
    ok = [r for r in requests if r["ok"]]
    ttfts = [r["ttft_s"] for r in ok]
    tokens = sum(r["completion_tokens"] for r in ok)
    per_client = client_tps(requests)
    return {
        "requests_ok": len(ok),
        "requests_failed": len(requests) - len(ok),
        "ttft_median_s": metrics.median(ttfts),
        "ttft_p90_s": metrics.percentile(ttfts, 90),
        "client_tps": {str(c): v for c, v in per_client.items()},
        "client_tps_median": metrics.median(per_client.values()),
        "completion_tokens": tokens,
        "burst_s": burst_s,
        "total_tps": tokens / burst_s if ok and burst_s > 0 else None,
    }


def text_matches(reference: Sequence[dict], other: Sequence[dict]) -> dict:
    """Requests whose text equals the reference's for the same (client, request) slot, i.e.
    the same question; only slots that succeeded in both rows are compared."""
    ref = {(r["client"], r["index"]): r for r in reference if r["ok"]}
    pairs = [
        (ref[(r["client"], r["index"])], r)
        for r in other
        if r["ok"] and (r["client"], r["index"]) in ref
    ]
    differing = [b["question_id"] for a, b in pairs if a["text"] != b["text"]]
    return {"compared": len(pairs), "exact": len(pairs) - len(differing), "differing": differing}


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def compare_rows(rows: dict[str, dict]) -> None:
    """Add each measured row's ratios and text matches against the reference row (in place)."""
    ref = rows.get(REFERENCE_ROW)
    if not ref or ref["status"] != "ok":
        return
    base = ref["summary"]
    for name, row in rows.items():
        if row["status"] != "ok":
            continue
        s = row["summary"]
        row["vs_mlx_lm"] = {
            "total_tps": ratio(s["total_tps"], base["total_tps"]),
            "client_tps_median": ratio(s["client_tps_median"], base["client_tps_median"]),
            "ttft_median": ratio(s["ttft_median_s"], base["ttft_median_s"]),
            "text": None
            if name == REFERENCE_ROW
            else text_matches(ref["requests"], row["requests"]),
        }


# ---------------------------------------------------------------------------- one row
def run_row(
    row: Row,
    assignment: list[list[Prompt]],
    *,
    max_tokens: int,
    startup_timeout: float,
    request_timeout: float = 600.0,
    warmup_tokens: int = 8,
) -> dict:
    """Start the row's server, wait until ready, warm it up, run the burst, stop it."""
    server = ServerProcess(row.command)
    result: dict = {"label": row.label, "command": server.command, "status": "failed"}
    log(f"[{row.name}] starting: {shlex.join(server.command)}")
    try:
        server.start()
        result["startup_s"] = server.wait_ready(startup_timeout)
        log(f"[{row.name}] ready after {result['startup_s']:.1f} s; warm-up")
        if warmup_tokens > 0:
            warm, _ = asyncio.run(
                run_burst(
                    server.base_url,
                    [[Prompt("warm-up", "warm-up", WARMUP_MESSAGES)]],
                    warmup_tokens,
                    request_timeout,
                )
            )
            if not warm[0].ok:
                raise ServerFailed(f"warm-up request failed: {warm[0].error}")
        clients, per_client = len(assignment), len(assignment[0])
        log(f"[{row.name}] {clients} clients x {per_client} requests, max_tokens {max_tokens}")
        records, burst_s = asyncio.run(
            run_burst(server.base_url, assignment, max_tokens, request_timeout)
        )
        requests = [r.to_json() for r in records]
        result.update(status="ok", requests=requests)
        result["summary"] = summarize_requests(requests, burst_s)
    except ServerFailed as e:
        result["error"] = str(e)
    except OSError as e:  # the command itself could not start
        result["error"] = f"{type(e).__name__}: {e}"
    finally:
        result["exit_code"] = server.stop()
        # after the stop: a failing server's last words are in the log by now
        if result["status"] != "ok" or result["summary"]["requests_failed"]:
            result["log_tail"] = server.log_tail()
        server.close()
    if result.get("error"):
        log(f"[{row.name}] failed: {result['error']}")
    return result


# ---------------------------------------------------------------------------- report
def _f(x, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def markdown(results: dict) -> str:
    env, cfg, rows = results["environment"], results["config"], results["rows"]
    machine = env["machine"]
    lines = [
        f"# Server benchmark {env['date']}",
        "",
        f"- model: {cfg['model']}; rows run one after another: {', '.join(rows)}",
        f"- load: {cfg['clients']} concurrent clients x {cfg['requests']} streaming chat "
        f"requests each, max_tokens {cfg['max_tokens']}, temperature 0, MT-Bench first turns "
        f"(a different question per request); one warm-up request per server first",
        f"- machine: {machine['processor']} ({machine['platform']}, {machine['cpu_count']} cores, "
        f"load average at start {_f((machine.get('load_average') or [None])[0])}); "
        f"back-end: {env['backend']}; BLAS: {env['blas']}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()),
        f"- ours' extra flags: {' '.join(cfg['server_args']) or 'none'}",
        f"- wall time: {_f(results.get('wall_s'), '.0f')} s",
        "",
        "| row | requests ok / failed | TTFT median s | TTFT p90 s | tok/s per client "
        "(median) | total tok/s | total tok/s vs mlx_lm.server | TTFT vs mlx_lm.server | "
        "same text as mlx_lm.server |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows.values():
        if row["status"] != "ok":
            error = " ".join(str(row.get("error")).split()).replace("|", "/")
            lines.append(f"| {row['label']} | failed: {error} |||||||")
            continue
        s, vs = row["summary"], row.get("vs_mlx_lm") or {}
        text = vs.get("text")
        lines.append(
            f"| {row['label']} | {s['requests_ok']} / {s['requests_failed']} | "
            f"{_f(s['ttft_median_s'], '.3f')} | {_f(s['ttft_p90_s'], '.3f')} | "
            f"{_f(s['client_tps_median'], '.1f')} | {_f(s['total_tps'], '.1f')} | "
            f"{_f(vs.get('total_tps'), '.3f')} | {_f(vs.get('ttft_median'), '.3f')} | "
            + (f"{text['exact']}/{text['compared']}" if text else "-")
            + " |"
        )
    lines += [
        "",
        "tok/s per client: a client's completion tokens over the time from its first request to "
        "the end of its last (TTFT and queueing included); total tok/s: all completion tokens "
        "over the burst's wall time. Texts are compared per question; every row batches "
        "concurrent requests (ours unless --no-batching is among its flags), which can change "
        "floating-point results and so the greedy text.",
        "",
        "Not shown: other loads (one burst per row, no repeats, so noise between rows counts "
        "in full), sampling (temperature 0 only), long prompts or multi-turn chats, memory use, "
        "and a machine not shared with the client (clients and server share these cores).",
    ]
    for name, row in rows.items():
        if row.get("log_tail") and (row["status"] != "ok" or row["summary"]["requests_failed"]):
            failures = [r["error"] for r in row.get("requests", []) if not r["ok"]]
            lines += ["", f"## {name}: {row.get('error') or f'{len(failures)} failed requests'}"]
            lines += [f"- {e}" for e in sorted(set(failures))[:5]]
            lines += ["", "```", row["log_tail"].strip()[-2000:], "```"]
    return "\n".join(lines) + "\n"


def plot(results: dict, out_dir: Path, stem: str) -> Path | None:
    """Bars of total tok/s and median TTFT per measured row; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    from .report import _save

    rows = {n: r for n, r in results["rows"].items() if r["status"] == "ok"}
    if not rows:
        return None
    labels = [r["label"] for r in rows.values()]
    fig, (left, right) = plt.subplots(1, 2, figsize=(max(7, 2.4 * len(rows)), 3.6))
    left.bar(range(len(rows)), [r["summary"]["total_tps"] or 0 for r in rows.values()])
    left.set_ylabel("total tokens/s")
    right.bar(range(len(rows)), [r["summary"]["ttft_median_s"] or 0 for r in rows.values()])
    right.set_ylabel("median time to first token (s)")
    for ax in (left, right):
        ax.set_xticks(range(len(rows)), labels, rotation=20, ha="right", fontsize=8)
    cfg = results["config"]
    fig.suptitle(
        f"{cfg['clients']} clients x {cfg['requests']} requests, {cfg['max_tokens']} tokens",
        fontsize=9,
    )
    fig.tight_layout()
    return _save(fig, out_dir / f"{stem}.png")


# ---------------------------------------------------------------------------- CLI
def _server_args(value: str) -> list[str]:
    return shlex.split(value)


def setup_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mlx_redrafter.benchmarks.server",
        description="Concurrent streaming clients against mlx_lm.server and "
        "mlx_redrafter.server, one server at a time.",
    )
    p.add_argument("--model", default=None, help="model folder (default: SmolLM2-135M-Instruct)")
    p.add_argument("--clients", type=int, default=None, help="concurrent clients (default 4)")
    p.add_argument("--requests", type=int, default=None, help="requests per client (default 2)")
    p.add_argument("--max-tokens", type=int, default=None, help="per request (default 128)")
    p.add_argument(
        "--rows",
        default=",".join(ROWS),
        help=f"comma-separated rows to run, in order (default {','.join(ROWS)})",
    )
    p.add_argument(
        "--server-arg",
        type=_server_args,
        action="append",
        default=[],
        metavar="ARGS",
        help="flags for the 'ours' row, e.g. --server-arg='--beam-width 1 --prompt-lookup 0' "
        "(repeatable; write it with '=' when the value starts with '-')",
    )
    p.add_argument("--prompts", default=str(DEFAULT_PROMPTS), help="JSONL (MT-Bench layout)")
    p.add_argument("--quick", action="store_true", help="2 clients x 1 request, 64 tokens")
    p.add_argument("--startup-timeout", type=float, default=900.0, help="seconds to /health 200")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--warmup-tokens", type=int, default=8, help="the warm-up request (0: none)")
    p.add_argument("--out", default=str(RESULTS_DIR), help="output folder")
    p.add_argument("--name", default=None, help="file name tag (default: server or server-quick)")
    return p


def resolve_defaults(args) -> None:
    quick = args.quick
    if args.clients is None:
        args.clients = QUICK_CLIENTS if quick else 4
    if args.requests is None:
        args.requests = QUICK_REQUESTS if quick else 2
    if args.max_tokens is None:
        args.max_tokens = QUICK_TOKENS if quick else 128
    if args.name is None:
        args.name = "server-quick" if quick else "server"
    for flag in ("clients", "requests", "max_tokens"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be at least 1")
    args.rows = [n.strip() for n in args.rows.split(",") if n.strip()]
    args.server_args = [a for chunk in args.server_arg for a in chunk]


def load_prompts(path: str, count: int) -> list[Prompt]:
    """`count` first-turn prompts spread over the categories (all of them when fewer)."""
    questions = quick_subset(load_questions(path), count)
    return [Prompt(q.question_id, q.category, turn_messages(q, 0, [])) for q in questions]


def write_outputs(results: dict, out: Path, name: str) -> list[Path]:
    from .report import write_json

    stem = f"{time.strftime('%Y%m%d-%H%M%S')}-{name}"
    written = [write_json(out / f"{stem}.json", results)]
    md = out / f"{stem}.md"
    md.write_text(markdown(results))
    written.append(md)
    png = plot(results, out, stem)
    return written + ([png] if png else [])


def main(argv: Sequence[str] | None = None) -> int:
    parser = setup_arg_parser()
    args = parser.parse_args(argv)
    try:
        resolve_defaults(args)
        rows = build_rows(args.rows, args.model, args.server_args)
        prompts = load_prompts(args.prompts, args.clients * args.requests)
    except (ValueError, FileNotFoundError) as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    try:
        return _main(args, rows, prompts, argv)
    except KeyboardInterrupt:  # the running row's server is stopped by run_row's `finally`
        from mlx_redrafter._cli import interrupted

        return interrupted(parser.prog)


def _main(args, rows: list[Row], prompts: list[Prompt], argv) -> int:
    from .report import environment

    wall = time.perf_counter()
    model_name = args.model or "default (SmolLM2-135M-Instruct)"
    env = environment(None, model_name)
    assignment = assign_prompts(prompts, args.clients, args.requests)
    measured = {}
    for row in rows:
        measured[row.name] = run_row(
            row,
            assignment,
            max_tokens=args.max_tokens,
            startup_timeout=args.startup_timeout,
            request_timeout=args.request_timeout,
            warmup_tokens=args.warmup_tokens,
        )
    compare_rows(measured)
    results = {
        "environment": env,
        "config": {
            "model": model_name,
            "clients": args.clients,
            "requests": args.requests,
            "max_tokens": args.max_tokens,
            "rows": args.rows,
            "server_args": args.server_args,
            "prompts": args.prompts,
            "distinct_prompts": len({p.question_id for ps in assignment for p in ps}),
            "quick": args.quick,
            "warmup_tokens": args.warmup_tokens,
            "argv": sys.argv[1:] if argv is None else list(argv),
        },
        "rows": measured,
        "wall_s": time.perf_counter() - wall,
    }
    paths = write_outputs(results, Path(args.out), args.name)
    print(markdown(results))
    log("wrote " + ", ".join(str(p) for p in paths))
    return 0 if all(r["status"] == "ok" for r in measured.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
