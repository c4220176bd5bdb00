"""The drafter shipped for the default model: small, loaded by default, and lossless."""

from __future__ import annotations

import mlx.core as mx
import pytest
from tiny import first_divergence_is_tie, reference_greedy

from mlx_redrafter import generate_step, load
from mlx_redrafter.default_model import bundled_drafter_path

MAX_BYTES = 20 * 1024 * 1024


@pytest.fixture(scope="module")
def default():
    return load()


def test_shipped_drafter_is_small_and_loaded_by_default(default):
    path = bundled_drafter_path()
    assert path is not None, "the default model's drafter is missing from the package"
    size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    assert size <= MAX_BYTES
    _, _, drafter = default
    assert drafter is not None
    assert drafter.config.draft_vocab_size is not None  # cheap head next to a 135M model


def test_greedy_with_the_shipped_drafter_equals_autoregressive(default):
    model, tokenizer, drafter = default
    for question in ("What is the capital of France?", "Write a haiku about the sea."):
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True
        )
        expected = reference_greedy(model, prompt, 40)
        got = [
            t
            for toks, _ in generate_step(mx.array(prompt), model, drafter, max_tokens=40)
            for t in toks
        ]
        ok, diff, gap = first_divergence_is_tie(model, prompt, expected, got)
        assert ok, f"diverged at {diff} (gap {gap:.2e})"
