"""Per-token logprobs from the engine (`generate_step(..., logprobs=k)`): the model's own, as
mlx-lm's generate_step returns them, whatever drafted the tokens; off by default."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.generate import generate_step as mlx_lm_generate_step
from mlx_lm.sample_utils import make_logits_processors

from mlx_redrafter import generate_step, stream_generate
from mlx_redrafter.benchmarks.tiny import make_drafter, make_model, make_tokenizer

PROMPT = [5, 9, 14, 3, 77, 21, 9, 14]
TOP = 4


@pytest.fixture(scope="module")
def tiny():
    model = make_model("llama")
    return model, make_drafter(model)


def mlx_lm_rows(model, n, processors=None):
    tokens, rows = [], []
    steps = mlx_lm_generate_step(
        mx.array(PROMPT), model, max_tokens=n, logits_processors=processors
    )
    for token, logprobs in steps:
        tokens.append(int(token))
        rows.append(np.array(logprobs))
    return tokens, rows


@pytest.mark.parametrize(
    "setup",
    [
        dict(drafter=True, beam_width=3, beam_length=4),
        dict(drafter=True, beam_width=1, beam_length=3),  # the chained greedy path
        dict(drafter=False, prompt_lookup=3),
        dict(drafter=False),  # plain steps (the pipelined path is left for one-token trees)
    ],
)
def test_logprobs_equal_mlx_lms(tiny, setup):
    model, drafter = tiny
    setup = dict(setup)
    use = drafter if setup.pop("drafter") else None
    expected, rows = mlx_lm_rows(model, 16)
    tokens, scores = [], []
    for step, stats in generate_step(
        mx.array(PROMPT), model, use, max_tokens=16, guard=False, logprobs=TOP, **setup
    ):
        assert stats.logprobs is not None and len(stats.logprobs) == len(step)
        tokens += step
        scores.append(stats.logprobs)
    assert tokens == expected
    chosen = [v for s in scores for v in s.logprobs]
    top_ids = [row for s in scores for row in s.top_tokens]
    top_values = [row for s in scores for row in s.top_logprobs]
    for token, row, value, ids, values in zip(
        tokens, rows, chosen, top_ids, top_values, strict=True
    ):
        assert abs(value - row[token]) < 1e-5
        assert ids == list(np.argsort(-row)[:TOP])
        assert np.allclose(values, row[ids], atol=1e-5)


def test_logprobs_follow_the_logits_processors(tiny):
    """mlx-lm's logprobs are after the processors (penalties, bias): so are ours."""
    model, drafter = tiny
    processors = make_logits_processors(logit_bias={7: 3.0}, repetition_penalty=1.3)
    expected, rows = mlx_lm_rows(model, 10, processors)
    tokens, chosen = [], []
    for step, stats in generate_step(
        mx.array(PROMPT),
        model,
        drafter,
        max_tokens=10,
        beam_width=2,
        beam_length=3,
        guard=False,
        logits_processors=processors,
        logprobs=0,
    ):
        tokens += step
        chosen += stats.logprobs.logprobs
        assert stats.logprobs.top_tokens == [[] for _ in step]
    assert tokens == expected
    assert np.allclose(chosen, [row[t] for t, row in zip(tokens, rows, strict=True)], atol=1e-5)


def test_logprobs_are_off_by_default_and_checked(tiny):
    model, drafter = tiny
    steps = generate_step(
        mx.array(PROMPT), model, drafter, max_tokens=6, beam_width=2, beam_length=3
    )
    assert all(stats.logprobs is None for _, stats in steps)
    with pytest.raises(ValueError, match="top logprobs"):
        generate_step(mx.array(PROMPT), model, drafter, logprobs=21)


def test_stream_generate_gives_the_shown_tokens_logprobs(tiny):
    model, drafter = tiny
    tokenizer = make_tokenizer()
    shown = []
    for response in stream_generate(
        model,
        tokenizer,
        PROMPT,
        drafter=drafter,
        max_tokens=12,
        beam_width=2,
        beam_length=3,
        prompt_lookup=0,
        guard=False,
        logprobs=1,
    ):
        assert len(response.logprobs) == len(response.tokens)
        shown += response.tokens
    assert len(shown) >= 1
