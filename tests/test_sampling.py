"""Sampling settings and logits processors act on the same distribution in every path."""

from __future__ import annotations

import mlx.core as mx
import pytest
from mlx_lm.generate import generate_step as mlx_lm_generate_step
from mlx_lm.sample_utils import make_logits_processors

from mlx_redrafter import generate_step
from mlx_redrafter.benchmarks.tiny import (
    VOCAB,
    OracleDrafter,
    make_drafter,
    make_model,
    reference_greedy,
)
from mlx_redrafter.sampling import SamplingParams, target_log_probs


@pytest.fixture(scope="module")
def model():
    return make_model("llama")


def tokens_of(model, drafter, prompt, **kw):
    return [t for toks, _ in generate_step(mx.array(prompt), model, drafter, **kw) for t in toks]


def test_top_k_one_sampling_is_greedy_through_the_reference_rule(model):
    """With top_k=1 the target is one-hot: the rule must accept only the argmax and correct
    every rejection to it, so sampling equals greedy decoding whatever the seed."""
    prompt = [5, 17, 33, 2, 9]
    expected = reference_greedy(model, prompt, 30)
    for seed in range(3):
        for drafter in (None, make_drafter(model, seed=seed)):
            got = tokens_of(
                model,
                drafter,
                prompt,
                max_tokens=30,
                temp=0.8,
                top_k=1,
                seed=seed,
                beam_width=3,
                accept="reference",
            )
            assert got == expected
        oracle = OracleDrafter(prompt + expected, len(prompt), VOCAB, seed=seed)
        got = tokens_of(
            model, oracle, prompt, max_tokens=30, temp=0.8, top_k=1, seed=seed, accept="reference"
        )
        assert got == expected


def test_sampling_is_reproducible_with_a_seed(model):
    prompt = [4, 8, 15, 16, 23, 42]
    drafter = make_drafter(model)
    runs = [
        tokens_of(model, drafter, prompt, max_tokens=25, temp=1.0, top_p=0.9, seed=s)
        for s in (1, 1, 2)
    ]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_target_distribution_matches_mlx_lm_filters():
    logits = mx.random.normal((3, 40), key=mx.random.key(0)) * 3
    params = SamplingParams(temp=0.7, top_p=0.8, top_k=10, min_p=0.05)
    logp = target_log_probs(logits, params)
    probs = mx.exp(logp)
    assert mx.allclose(probs.sum(axis=-1), mx.ones(3), atol=1e-5).item()
    # at most top_k tokens survive, and every survivor is among the k largest logits
    kept = probs > 0
    assert (kept.sum(axis=-1) <= 10).all().item()
    top10 = mx.argsort(-logits, axis=-1)[:, :10]
    for row in range(3):
        survivors = {i for i, k in enumerate(kept[row].tolist()) if k}
        assert survivors <= set(top10[row].tolist())
    # without filters it is the temperature-scaled softmax
    plain = target_log_probs(logits, SamplingParams(temp=0.5))
    assert mx.allclose(
        plain, logits / 0.5 - mx.logsumexp(logits / 0.5, -1, keepdims=True), atol=1e-5
    ).item()


@pytest.mark.parametrize("width", [1, 4])
def test_repetition_penalty_greedy_matches_mlx_lm(model, width):
    """Processors see each tree node's own history; the result equals mlx-lm's decoding."""
    prompt = [7, 7, 9, 11, 7, 13]
    processors = make_logits_processors(repetition_penalty=1.5, repetition_context_size=8)
    expected = [
        int(t)
        for t, _ in mlx_lm_generate_step(
            mx.array(prompt), model, max_tokens=30, logits_processors=processors
        )
    ]
    for drafter in (
        None,
        make_drafter(model),
        OracleDrafter(prompt + expected, len(prompt), VOCAB, seed=0),
    ):
        got = tokens_of(
            model, drafter, prompt, max_tokens=30, logits_processors=processors, beam_width=width
        )
        assert got == expected
