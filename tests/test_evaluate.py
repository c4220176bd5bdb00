"""Offline acceptance simulation agrees with the real engine, step for step."""

from __future__ import annotations

import numpy as np
import pytest

from mlx_redrafter.benchmarks.tiny import make_model, reference_greedy
from mlx_redrafter.train.config import TrainConfig
from mlx_redrafter.train.drafter_init import new_drafter
from mlx_redrafter.train.evaluate import (
    acceptance_walk,
    matched_lengths,
    offline_acceptance,
    offline_acceptance_by_length,
    online_acceptance,
)
from mlx_redrafter.train.llm_states import llm_hidden_states
from mlx_redrafter.train.loop import Trainer
from mlx_redrafter.train.positions import build_positions


def test_walk_counts_tokens_and_steps():
    # sequence positions 0..9, prompt ends at 2 (start), last index 9; g0 = x3 is emitted
    accepted = np.array([2, 0, 0, 1, 0, 0, 0])  # indexed by t - start
    result = acceptance_walk(accepted, start=2, end=9, length=4)
    # t=2: n=2 -> 3 tokens (t=5); t=5: n=1 -> 2 (t=7); t=7: n=0 -> 1 (t=8); x9 emitted: stop
    assert (result.tokens, result.steps) == (6, 3)
    assert result.tokens == 9 - 3  # every token after g0 is emitted exactly once
    assert result.histogram.tolist() == [0, 1, 1, 1, 0]


def test_matched_lengths_takes_the_best_beam():
    sequence = np.array([1, 2, 3, 4, 5, 6])
    beams = np.array([[[2, 3, 9], [2, 3, 4]], [[3, 9, 9], [3, 4, 9]]])  # drafted at t=0, t=1
    assert matched_lengths(beams, sequence, np.array([0, 1])).tolist() == [2, 1]


@pytest.fixture(scope="module")
def trained():
    """A tiny drafter trained on (and evaluated against) a tiny LLM's greedy text."""
    model = make_model("qwen3")
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, 128, size=5).tolist() for _ in range(24)]
    sequences = [p + reference_greedy(model, p, 30) for p in prompts]
    hidden = llm_hidden_states(model, sequences, progress=False)
    cfg = TrainConfig(
        depths=4,
        exit_dim=64,
        num_draft_layers=1,
        batch_size=64,
        epochs=30,
        learning_rate=3e-3,
        eval_every=10**9,
        checkpoint_every=10**9,
    )
    drafter = new_drafter(model, cfg, None)
    Trainer(
        model,
        drafter,
        build_positions(hidden, sequences, 4),
        None,
        cfg,
        "/tmp/unused",
        log=lambda *_: None,
    ).fit(progress=False)
    return model, drafter, prompts, sequences


@pytest.mark.parametrize("width, length", [(1, 3), (2, 5), (4, 4)])
def test_offline_equals_online(trained, width, length):
    model, drafter, prompts, sequences = trained
    total_tokens = 0
    long_steps = 0
    for prompt, sequence in list(zip(prompts, sequences, strict=True))[:8]:
        response = sequence[len(prompt) :]
        offline = offline_acceptance(model, drafter, prompt, response, width, length)
        online, out = online_acceptance(model, drafter, prompt, len(response), width, length)
        assert out == response
        assert (offline.tokens, offline.steps) == (online.tokens, online.steps)
        assert offline.histogram.tolist() == online.histogram.tolist()
        total_tokens += offline.tokens
        long_steps += int(offline.histogram[2:].sum())
    assert long_steps > 0  # the trained drafter is accepted sometimes: the test has teeth


def test_one_search_serves_every_beam_length(trained):
    """Beams after k steps are the beams of a length-(k+1) search: a sweep needs one search."""
    model, drafter, prompts, sequences = trained
    for prompt, seq in list(zip(prompts, sequences, strict=True))[:4]:
        response = seq[len(prompt) :]
        swept = offline_acceptance_by_length(model, drafter, prompt, response, 3, [2, 3, 5])
        for length, res in swept.items():
            alone = offline_acceptance(model, drafter, prompt, response, 3, length)
            assert (res.tokens, res.steps) == (alone.tokens, alone.steps)
            assert res.histogram.tolist() == alone.histogram.tolist()


@pytest.mark.parametrize("width, length, lookup", [(0, 2, 4), (1, 3, 6), (4, 3, 5)])
def test_offline_equals_online_for_hybrid_trees(trained, width, length, lookup):
    """The simulation of RNN beams plus the lookup's copy (or the copy alone: width 0) counts
    what the engine counts, step for step."""
    model, drafter, prompts, sequences = trained
    copied_steps = 0
    for prompt, sequence in list(zip(prompts, sequences, strict=True))[:8]:
        response = sequence[len(prompt) :]
        rnn = drafter if width else None
        offline = offline_acceptance_by_length(
            model, rnn, prompt, response, width, [length], prompt_lookup=lookup
        )[length]
        online, out = online_acceptance(
            model, rnn, prompt, len(response), max(width, 1), length, prompt_lookup=lookup
        )
        assert out == response
        assert (offline.tokens, offline.steps) == (online.tokens, online.steps)
        assert offline.histogram.tolist() == online.histogram.tolist()[: len(offline.histogram)]
        assert online.histogram[len(offline.histogram) :].sum() == 0
        copied_steps += int(offline.histogram[length + 1 :].sum())
    assert copied_steps > 0  # steps longer than any RNN beam: only the copy gives those
