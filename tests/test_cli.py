"""The `mlx_redrafter.generate` CLI on a saved tiny model folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import mlx.core as mx
from tiny import make_model, make_tokenizer, reference_greedy


def run_cli(*args, stdin=None, env=None):
    return subprocess.run(
        [sys.executable, "-m", "mlx_redrafter.generate", *args],
        capture_output=True,
        text=True,
        timeout=120,
        input=stdin,
        env=env,
    )


def test_drafter_and_no_drafter_print_the_greedy_reply(tiny_model_dir):
    tokenizer = make_tokenizer()
    # the tiny chat template wraps the message: "t1 <message> t2 t1 "
    prompt_ids = tokenizer.encode("t1 t5 t6 t7 t2 t1", add_special_tokens=False)
    expected_ids = reference_greedy(make_model("llama"), prompt_ids, 12)
    eos = tokenizer.eos_token_ids
    if any(t in eos for t in expected_ids):
        expected_ids = expected_ids[: next(i for i, t in enumerate(expected_ids) if t in eos)]
    expected = tokenizer.decode(expected_ids)

    with_drafter = run_cli(
        "--model", str(tiny_model_dir), "--prompt", "t5 t6 t7", "--max-tokens", "12", "--verbose"
    )
    without = run_cli(
        "--model", str(tiny_model_dir), "--prompt", "t5 t6 t7", "--max-tokens", "12", "--no-drafter"
    )
    assert with_drafter.returncode == 0, with_drafter.stderr
    assert without.returncode == 0, without.stderr
    assert with_drafter.stdout.strip() == without.stdout.strip() == expected.strip()
    assert "speculation: " in with_drafter.stderr  # the tuned default, whatever it chose
    assert "tokens per verification step" in with_drafter.stderr
    assert "Peak memory" in with_drafter.stderr


def test_prompt_from_stdin(tiny_model_dir):
    a = run_cli("--model", str(tiny_model_dir), "--max-tokens", "6", stdin="t9 t10")
    b = run_cli("--model", str(tiny_model_dir), "--max-tokens", "6", "--prompt", "t9 t10")
    assert a.returncode == b.returncode == 0, a.stderr
    assert a.stdout == b.stdout and a.stdout.strip()


def test_sampling_is_reproducible_with_seed(tiny_model_dir):
    args = ["--model", str(tiny_model_dir), "--prompt", "t3", "--max-tokens", "15", "--temp", "1.0"]
    a = run_cli(*args, "--seed", "7")
    b = run_cli(*args, "--seed", "7")
    c = run_cli(*args, "--seed", "8")
    assert a.returncode == b.returncode == c.returncode == 0, a.stderr
    assert a.stdout == b.stdout
    assert a.stdout != c.stdout


def test_load_reads_model_tokenizer_and_drafter(tiny_model_dir):
    from mlx_redrafter import load

    model, tokenizer, drafter = load(tiny_model_dir)
    assert drafter is not None and drafter.config.hidden_size == 64
    assert model(mx.array([[1, 2, 3]])).shape == (1, 3, 128)
    _, _, none = load(tiny_model_dir, use_drafter=False)
    assert none is None


def test_auto_beam_shape_is_tuned_once_and_keeps_the_reply(tiny_model_dir, tmp_path):
    """`--beam-length auto` tunes L on this device (W pinned), confirms the pick against plain
    steps, caches it, and stays lossless; `--retune` measures again."""
    env = dict(os.environ, MLX_REDRAFTER_HOME=str(tmp_path))
    args = ["--model", str(tiny_model_dir), "--prompt", "t5 t6 t7", "--max-tokens", "12"]
    tuned = [*args, "--beam-width", "2", "--beam-length", "auto", "--prompt-lookup", "0"]
    fixed = run_cli(*args, "--no-speculation")
    first = run_cli(*tuned, "--verbose", env=env)
    assert first.returncode == 0, first.stderr
    assert "autotune: greedy calibration answers" in first.stderr
    assert "autotune: confirming" in first.stderr
    assert first.stdout == fixed.stdout
    cached = list((tmp_path / "autotune").glob("*.json"))
    assert len(cached) == 1
    record = json.loads(cached[0].read_text())
    assert {tuple(e_shape) for e_shape in record["key"]["shapes"]} == {(2, n) for n in range(2, 7)}
    width, length, lookup = record["choice"]
    assert lookup == 0 and width in (0, 2)  # W pinned, or plain steps where drafting loses
    measured = record["confirmed_tps"]
    assert "W0L0N0" in measured and max(measured, key=measured.get) == f"W{width}L{length}N0"
    shown = f"W=2 L={length}" if width else "no speculation"
    assert shown in first.stderr

    again = run_cli(*tuned, "--verbose", env=env)
    assert again.returncode == 0, again.stderr
    assert "autotune:" not in again.stderr  # read from the cache
    assert shown in again.stderr
    retuned = run_cli(*tuned, "--verbose", "--retune", env=env)
    assert "autotune: greedy calibration answers" in retuned.stderr
    assert retuned.stdout == fixed.stdout
