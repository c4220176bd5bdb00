"""ReDrafter on a model sharded with mx.distributed (tensor parallel, mlx-lm's `shard`).

Two ranks run as two processes on 127.0.0.1 over MLX's ring back-end, as `mlx.launch -n 2
--backend ring` starts them (`tests/distributed_worker.py`, and the real `mlx.launch` for the
CLI). Rank 0's greedy output must equal single-process greedy decoding (mlx-lm's, on the
unsharded model), each rank must hold about half of the layers' parameters (so a rank that kept
an unsharded copy fails), and sampling must give the same tokens on both ranks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_redrafter.benchmarks.server import free_port
from mlx_redrafter.benchmarks.tiny import (
    CONFIGS,
    VOCAB,
    first_divergence_is_tie,
    make_drafter,
    make_model,
    reference_greedy,
    save_tiny_model_dir,
)
from mlx_redrafter.distributed import check_shardable, shardable_model_types

WORKER = Path(__file__).with_name("distributed_worker.py")
RANKS = 2
MAX_TOKENS = 24
SHAPES = ((1, 2), (4, 5))
LAUNCH_TIMEOUT = 180  # seconds; a hang (mismatched collectives) fails instead of blocking


def rank_env(rank: int, hostfile: Path) -> dict:
    """What `mlx.launch --backend ring` sets for one local rank."""
    return dict(
        os.environ, MLX_RANK=str(rank), MLX_HOSTFILE=str(hostfile), OPENBLAS_NUM_THREADS="1"
    )


def launch_workers(tmp_path: Path, spec: dict) -> list[dict]:
    """Run the worker on RANKS local ranks; each rank's JSON result."""
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{free_port()}"] for _ in range(RANKS)]))
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    out = tmp_path / "out"
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(tmp_path / "spec.json"), str(out)],
            env=rank_env(rank, hostfile),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(RANKS)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=LAUNCH_TIMEOUT)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for rank, p in enumerate(procs):
        assert p.returncode == 0, f"rank {rank} failed:\n{logs[rank] if rank < len(logs) else ''}"
    results = [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(RANKS)]
    for rank, result in enumerate(results):
        assert "error" not in result, f"rank {rank}: {result.get('trace')}"
    return results


def layer_parameters(model) -> int:
    return sum(v.size for _, v in tree_flatten([layer.parameters() for layer in model.layers]))


def assert_lossless(model, prompt, expected, got, what):
    ok, diff, gap = first_divergence_is_tie(model, prompt, expected, got)
    assert ok, f"{what}: differs from greedy at token {diff} (gap {gap:.2e})\n{expected}\n{got}"


@pytest.mark.slow  # two ranks on a shared 2-core machine: 8 s when quiet, 25 s under load
@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_sharded_greedy_matches_single_process(tmp_path, name):
    model = make_model(name)  # the unsharded model the folder holds
    model_dir = save_tiny_model_dir(tmp_path / "model", name)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, VOCAB, size=n).tolist() for n in (1, 13)]
    references = [reference_greedy(model, p, MAX_TOKENS) for p in prompts]
    spec = dict(
        mode="decode",
        model_dir=str(model_dir),
        prompts=prompts,
        references=references,
        shapes=SHAPES,
    )
    ranks = launch_workers(tmp_path, spec)

    # each rank holds about half of the layers (norms are replicated): no unsharded copies
    whole = layer_parameters(model)
    for rank, result in enumerate(ranks):
        share = result["layer_parameters"] / whole
        assert 1 / RANKS <= share < 1 / RANKS + 0.02, f"rank {rank} holds {share:.3f} of layers"

    zero, one = ranks
    for prompt, expected, got in zip(prompts, references, zero["mlx_lm"], strict=True):
        assert_lossless(model, prompt, expected, got, "mlx-lm on the sharded model")
    assert zero["no_drafter"] == one["no_drafter"]
    for prompt, expected, got in zip(prompts, references, zero["no_drafter"], strict=True):
        assert_lossless(model, prompt, expected, got, "no drafter")
    long_acceptance = False
    for width, length in SHAPES:
        key = f"{width}x{length}"
        assert zero["greedy"][key] == one["greedy"][key], f"{key}: ranks disagree"
        for prompt, expected, row in zip(prompts, references, zero["greedy"][key], strict=True):
            assert len(row["oracle"]) == MAX_TOKENS
            assert_lossless(model, prompt, expected, row["oracle"], f"{key} oracle drafter")
            assert_lossless(model, prompt, expected, row["drafter"], f"{key} drafter + guard")
            long_acceptance |= max(row["accepted"]) == length - 1
    assert long_acceptance, "the oracle drafter never had a whole beam accepted"

    # sampling: the same uniforms on every rank, with an explicit seed and with rank 0's
    for key in ("sampled_seeded", "sampled_unseeded"):
        assert len(zero[key]) == 24
        assert zero[key] == one[key], f"{key}: ranks sampled different tokens"


def test_ranks_that_disagree_are_refused(tmp_path):
    model_dir = save_tiny_model_dir(tmp_path / "model", "llama")
    other = tmp_path / "other-drafter"
    make_drafter(make_model("llama"), seed=5).save_pretrained(other)
    spec = dict(
        mode="mismatch",
        model_dir=str(model_dir),
        prompts=[[5, 6, 7], [5, 6, 8]],
        drafter_dirs=[str(model_dir / "drafter"), str(other)],
    )
    for rank, result in enumerate(launch_workers(tmp_path, spec)):
        assert "different prompts" in result.get("prompt_error", ""), (rank, result)
        assert "different drafters" in result.get("drafter_error", ""), (rank, result)


# ------------------------------------------------------------------ refusals, in one process
def group_of(size: int):
    """Stands in for an `mx.distributed.Group` of `size` ranks (check_shardable reads size)."""
    return SimpleNamespace(size=lambda: size, rank=lambda: 0)


def nine_head_model():
    """SmolLM2-135M's head layout (9 heads, 3 KV heads) at tiny width."""
    config = dict(
        CONFIGS["llama"],
        hidden_size=72,
        num_attention_heads=9,
        num_key_value_heads=3,
        intermediate_size=96,
    )
    from mlx_lm.utils import _get_classes

    model_class, args_class = _get_classes(config)
    return model_class(args_class.from_dict(config))


def test_heads_that_do_not_divide_are_refused():
    model = nine_head_model()
    with pytest.raises(ValueError) as e:
        check_shardable(model, group_of(2))
    message = str(e.value)
    for words in ("llama", "9 attention heads", "3 KV heads", "over 2 ranks", "[3]"):
        assert words in message, message
    check_shardable(model, group_of(3))  # 9 and 3 heads over 3 ranks: accepted


def test_architecture_mlx_lm_cannot_shard_is_refused():
    assert set(shardable_model_types()) >= {"llama", "qwen2", "qwen3"}
    assert "gemma3_text" not in shardable_model_types()
    with pytest.raises(ValueError, match="'gemma3_text' cannot be sharded"):
        check_shardable(make_model("gemma3_text"), group_of(2))


# ------------------------------------------------------------------ the CLI under mlx.launch
def mlx_launch(tmp_path: Path, args: list[str], ranks: int = RANKS) -> subprocess.CompletedProcess:
    """`mlx.launch -n RANKS --backend ring -- python -m mlx_redrafter.generate ARGS` on
    127.0.0.1 (the launcher's own entry point, run by this interpreter)."""
    launcher = "from mlx._distributed_utils.launch import main; main()"
    command = [sys.executable, "-c", launcher, "-n", str(ranks), "--backend", "ring"]
    command += ["-p", str(free_port()), "--env", "OPENBLAS_NUM_THREADS=1"]
    command += ["--", sys.executable, "-m", "mlx_redrafter.generate", *args]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT, cwd=tmp_path
    )


def save_nine_head_dir(path: Path) -> Path:
    from mlx_redrafter.benchmarks.tiny import make_tokenizer

    model = nine_head_model()
    path.mkdir(parents=True)
    weights = dict(tree_flatten(model.parameters()))
    import mlx.core as mx

    mx.save_safetensors(str(path / "model.safetensors"), weights)
    config = dict(CONFIGS["llama"], hidden_size=72, num_attention_heads=9, num_key_value_heads=3)
    (path / "config.json").write_text(json.dumps(config))
    make_tokenizer()._tokenizer.save_pretrained(str(path))
    return path


@pytest.mark.slow  # two launches of two ranks each: 30 to 90 s on a shared 2-core machine
def test_generate_cli_under_mlx_launch(tmp_path, tiny_model_dir):
    args = ["--model", str(tiny_model_dir), "--prompt", "t5 t6 t7", "--max-tokens", "12"]
    single = subprocess.run(
        [sys.executable, "-m", "mlx_redrafter.generate", *args, "--beam-width", "4"]
        + ["--beam-length", "5", "--prompt-lookup", "0"],
        capture_output=True,
        text=True,
        timeout=LAUNCH_TIMEOUT,
        env=dict(os.environ, OPENBLAS_NUM_THREADS="1"),
    )
    assert single.returncode == 0, single.stderr
    assert len(single.stdout.split()) == 12
    # 'auto' speculation on two ranks: no tuning (it would need every rank), rank 0 prints
    sharded = mlx_launch(tmp_path, [*args, "--verbose"])
    assert sharded.returncode == 0, sharded.stderr
    assert sharded.stdout == single.stdout  # one copy: only rank 0 prints
    assert "Sharded over 2 ranks" in sharded.stderr
    assert "ReDrafter W=4 L=5" in sharded.stderr

    nine = save_nine_head_dir(tmp_path / "nine-heads")
    refused = mlx_launch(tmp_path, ["--model", str(nine), "--no-drafter", "--max-tokens", "4"])
    # mlx.launch itself exits 0, reports each rank's status on stderr, and stops the other
    # ranks once one has exited: at least one rank exits with the CLI's error status
    assert "exited with code 2" in refused.stderr, refused.stderr
    assert "9 attention heads and 3 KV heads cannot be sharded over 2 ranks" in refused.stderr
    assert refused.stdout.strip() == ""


# ------------------------------------------------------------------ the server with ranks
@pytest.mark.slow  # two ranks start a server and answer: 16 s when quiet, 45 s under load
def test_server_answers_with_two_ranks(tmp_path, tiny_model_dir):
    import signal

    import httpx
    from serving import PINNED

    from mlx_redrafter.benchmarks.tiny import make_tokenizer

    port = free_port()
    launcher = "from mlx._distributed_utils.launch import main; main()"
    command = [sys.executable, "-c", launcher, "-n", str(RANKS), "--backend", "ring"]
    command += ["-p", str(free_port()), "--env", "OPENBLAS_NUM_THREADS=1", "--"]
    command += [sys.executable, "-m", "mlx_redrafter.server", "--model", str(tiny_model_dir)]
    command += ["--port", str(port), "--log-level", "WARNING", *PINNED]
    log = (tmp_path / "log.txt").open("w")
    proc = subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + LAUNCH_TIMEOUT
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        else:
            pytest.fail(f"server not ready:\n{(tmp_path / 'log.txt').read_text()}")
        prompt = [5, 6, 7, 8]
        expected = reference_greedy(make_model("llama"), prompt, 10)
        tokenizer = make_tokenizer()
        body = dict(prompt=prompt, max_tokens=10, temperature=0.0)
        for attempt in range(2):  # the second reuses the prompt cache, on both ranks alike
            reply = httpx.post(url + "/v1/completions", json=body, timeout=LAUNCH_TIMEOUT)
            assert reply.status_code == 200, reply.text
            data = reply.json()
            assert data["choices"][0]["text"] == tokenizer.decode(expected)
            assert data["usage"]["completion_tokens"] == 10
            if attempt:
                assert data["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
        refused = httpx.post(url + "/v1/completions", json=dict(body, max_tokens=10**6))
        assert refused.status_code == 400  # refused on rank 0 and on the follower alike
        # a client that leaves mid-stream: rank 0 cancels, and the follower stops at the
        # same step (else the next request's collectives would pair up wrongly and hang)
        long = dict(body, max_tokens=400, stream=True)
        with httpx.stream("POST", url + "/v1/completions", json=long, timeout=60) as stream:
            for line in stream.iter_lines():
                if line.startswith("data: {"):
                    break
        reply = httpx.post(url + "/v1/completions", json=body, timeout=LAUNCH_TIMEOUT)
        assert reply.json()["choices"][0]["text"] == tokenizer.decode(expected)
        counts = httpx.get(url + "/health", timeout=10).json()["requests"]
        assert counts["cancelled"] == 1, counts
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# ------------------------------------------------------------------ the link model
def test_link_model_by_hand():
    from mlx_redrafter.benchmarks.distributed import (
        Link,
        link_seconds_per_forward,
        predicted_tokens_per_second,
        ring_allreduce_seconds,
        tree_tokens_bound,
    )

    link = Link(latency_s=1e-5, bandwidth_bytes_s=1e9)
    assert ring_allreduce_seconds(4000, 1, link) == 0.0
    # 2 ranks: 2 steps of 10 us + 2000 bytes / 1e9 B/s (2 us) each
    assert ring_allreduce_seconds(4000, 2, link) == pytest.approx(24e-6)
    # a 1-token forward of a 30-layer model with hidden 1000 in float32: 60 all-reduces
    assert link_seconds_per_forward(1, 1000, 4, 30, 2, link) == pytest.approx(60 * 24e-6)
    # ReDrafter: fewer forwards per token pay for a bigger message
    assert tree_tokens_bound(4, 5) == 17
    ar = predicted_tokens_per_second(0.01, 1.0, 0.002)
    assert ar == pytest.approx(1 / 0.012)
    assert predicted_tokens_per_second(0.012, 0.5, 0.003) == pytest.approx(1 / 0.0075)
    with pytest.raises(ValueError, match="ranks"):
        ring_allreduce_seconds(1, 0, link)


def test_benchmark_harness_on_one_process(tmp_path, tiny_model_dir, capsys):
    """The harness end to end on the tiny model (one process, 2 prompts, 6 tokens): the
    figures it reports are there and consistent; their values are not checked (no timing)."""
    from mlx_redrafter.benchmarks.distributed import main

    out = tmp_path / "result.json"
    argv = ["--model", str(tiny_model_dir), "--prompts", "2", "--max-tokens", "6"]
    assert main([*argv, "--beam-width", "2", "--beam-length", "3", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["group_size"] == 1
    assert set(result["measured"]) == {"mlx_lm AR", "ours, no drafter", "ReDrafter"}
    assert result["measured"]["mlx_lm AR"]["forwards_per_token"] == pytest.approx(1.0)
    assert result["measured"]["ours, no drafter"]["forwards_per_token"] == pytest.approx(1.0)
    assert 0 < result["measured"]["ReDrafter"]["forwards_per_token"] <= 1.0
    layers = CONFIGS["llama"]["num_hidden_layers"]
    assert result["link_model"] == dict(ranks=2, allreduces_per_forward=2 * layers)
    assert len(result["predictions"]) == 3  # three latencies x one bandwidth
    assert "predicts nothing about a real link" in capsys.readouterr().out
    # greedy, float32, one process: every decoder gives mlx-lm's tokens
    assert all(m["same_as_mlx_lm"] == 2 for m in result["measured"].values())
    page = out.with_suffix(".md").read_text()
    assert "| ReDrafter |" in page and "2/2 |" in page and "predicts nothing" in page


def test_chat_refuses_ranks(monkeypatch):
    import mlx_redrafter.distributed as distributed
    from mlx_redrafter.chat import refuse_on_ranks

    refuse_on_ranks()  # one process: nothing to refuse
    monkeypatch.setattr(distributed, "init_group", lambda: group_of(2))
    with pytest.raises(ValueError, match="does not run on several ranks yet"):
        refuse_on_ranks()
