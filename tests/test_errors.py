"""Bad input gets a ValueError that names the problem (CLI: exit code 2 and one line)."""

from __future__ import annotations

import subprocess
import sys

import mlx.core as mx
import pytest

from mlx_redrafter import generate_step, make_prompt_cache
from mlx_redrafter.benchmarks.tiny import make_drafter, make_model
from mlx_redrafter.drafter import Drafter, DrafterConfig


@pytest.fixture(scope="module")
def model():
    return make_model("llama")


def steps(model, drafter, prompt=(5, 6, 7), **kw):
    return list(generate_step(mx.array(list(prompt)), model, drafter, max_tokens=4, **kw))


@pytest.mark.parametrize(
    "width, length, message",
    [(0, 5, "beam_width"), (51, 5, "beam_width"), (4, 1, "beam_length"), (4, 0, "beam_length")],
)
def test_beam_shape(model, width, length, message):
    with pytest.raises(ValueError, match=message):
        steps(model, make_drafter(model), beam_width=width, beam_length=length)


def test_drafter_hidden_size_mismatch(model):
    drafter = Drafter(DrafterConfig(vocab_size=128, hidden_size=32))
    with pytest.raises(ValueError, match="hidden_size 32 does not match .* 64"):
        steps(model, drafter)


def test_drafter_vocab_mismatch(model):
    drafter = Drafter(DrafterConfig(vocab_size=100, hidden_size=64))
    with pytest.raises(ValueError, match="vocab_size 100 does not match .* 128"):
        steps(model, drafter)


def test_reduced_vocab_map_outside_model_vocab(model):
    drafter = Drafter(DrafterConfig(vocab_size=128, hidden_size=64, draft_vocab_size=4))
    drafter.draft_vocab_ids = mx.array([1, 2, 3, 500], dtype=mx.int32)
    with pytest.raises(ValueError, match="largest id 500"):
        steps(model, drafter)


def test_empty_prompt(model):
    with pytest.raises(ValueError, match="empty"):
        steps(model, make_drafter(model), prompt=())


def test_prompt_longer_than_context(model):
    limit = model.args.max_position_embeddings
    with pytest.raises(ValueError, match=f"exceeds the model's context of {limit}"):
        steps(model, None, prompt=[3] * (limit + 1))


def test_generation_stops_at_the_context_limit(model):
    limit = model.args.max_position_embeddings
    out = [
        t
        for toks, _ in generate_step(
            mx.array([3] * (limit - 10)), model, make_drafter(model), max_tokens=50
        )
        for t in toks
    ]
    assert 0 < len(out) <= 11


def test_sampling_settings_are_checked(model):
    for kw, name in [({"temp": -1}, "temp"), ({"top_p": 2}, "top_p"), ({"min_p": -0.5}, "min_p")]:
        with pytest.raises(ValueError, match=name):
            steps(model, None, **kw)


def test_refused_cache_kinds(model):
    from mlx_lm.models.cache import KVCache, QuantizedKVCache, RotatingKVCache

    for kw, name in [
        ({"kv_bits": 7}, "kv_bits"),
        ({"kv_bits": 4, "kv_group_size": 48}, "kv_group_size"),
        ({"kv_bits": 4, "quantized_kv_start": -1}, "quantized_kv_start"),
    ]:
        with pytest.raises(ValueError, match=name):
            steps(model, None, **kw)
    with pytest.raises(ValueError, match="max_kv_size .*rotating.*tree verification"):
        steps(model, None, max_kv_size=64)
    with pytest.raises(ValueError, match="QuantizedKVCache"):
        steps(model, None, prompt_cache=[QuantizedKVCache() for _ in model.layers])
    with pytest.raises(ValueError, match="rotating"):
        steps(model, None, prompt_cache=[RotatingKVCache(8) for _ in model.layers])
    with pytest.raises(ValueError, match="make_prompt_cache"):
        steps(model, None, prompt_cache=[KVCache() for _ in model.layers])
    steps(model, None, prompt_cache=make_prompt_cache(model))  # the right kind works


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "mlx_redrafter.generate", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_reports_bad_input_in_one_line(tmp_path):
    result = run_cli("--model", str(tmp_path / "missing"), "--prompt", "hi")
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "does not exist" in lines[0], result.stderr


def test_cli_rejects_bad_beam_shape(tiny_model_dir):
    result = run_cli("--model", str(tiny_model_dir), "--prompt", "t5 t6", "--beam-width", "0")
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]  # argparse: usage, then the error
    assert "--beam-width" in last and "positive integer or 'auto'" in last, result.stderr


@pytest.mark.parametrize("module", ["mlx_redrafter.generate", "mlx_redrafter.chat"])
def test_fixed_axis_beside_auto_is_checked_before_the_model_loads(tmp_path, module):
    """The model path does not exist: the beam error must come first, so nobody waits for a
    model to load (or a tuner to run) only to learn that the shape was wrong."""
    missing = str(tmp_path / "missing")
    for shape, message in (
        (("--beam-width", "99", "--beam-length", "auto"), "beam_width must be in"),
        (("--beam-width", "auto", "--beam-length", "1"), "beam_length must be >= 2"),
    ):
        result = subprocess.run(
            [sys.executable, "-m", module, "--model", missing, *shape],
            capture_output=True,
            text=True,
            timeout=120,
            stdin=subprocess.DEVNULL,
        )
        assert result.returncode == 2, result.stderr
        assert message in result.stderr and "does not exist" not in result.stderr
