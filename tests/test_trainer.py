"""The trainer learns a tiny LLM's own continuations and resumes exactly from checkpoints."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from tiny import make_model, reference_greedy

from mlx_redrafter.train.trainer import (
    IGNORE,
    TrainConfig,
    Trainer,
    build_positions,
    frequent_tokens,
    llm_hidden_states,
    new_drafter,
    token_windows,
)


@pytest.fixture(scope="module")
def corpus():
    """Greedy continuations of a tiny random LLM: deterministic text a drafter can learn."""
    model = make_model("llama")
    rng = np.random.default_rng(0)
    sequences = []
    for _ in range(48):
        prompt = rng.integers(3, 128, size=4).tolist()
        sequences.append(prompt + reference_greedy(model, prompt, 28))
    hidden = llm_hidden_states(model, sequences, progress=False)
    return model, sequences, hidden


def test_token_windows():
    w = token_windows([10, 11, 12, 13], depths=2)
    assert w.tolist() == [
        [11, 12, 13],
        [12, 13, IGNORE],
        [13, IGNORE, IGNORE],
        [IGNORE, IGNORE, IGNORE],
    ]


def test_hidden_states_equal_unbatched_forward(corpus):
    model, sequences, hidden = corpus
    for i in (0, 7):
        ref = model.model(mx.array(sequences[i])[None])[0]
        assert np.allclose(hidden[i], np.array(ref), atol=2e-2)  # stored as float16


def test_frequent_tokens_forces_and_ranks():
    ids = frequent_tokens([[5, 5, 5, 7, 7, 9], [5, 3]], n=3, always=[2])
    assert ids.tolist() == [2, 5, 7]


def train(corpus, steps_scale=1.0, tmp=None, **kw):
    model, sequences, hidden = corpus
    cfg = TrainConfig(
        depths=3,
        exit_dim=64,
        num_draft_layers=1,
        batch_size=64,
        epochs=6 * steps_scale,
        learning_rate=3e-3,
        eval_every=10**9,
        checkpoint_every=10**9,
        **kw,
    )
    data = build_positions(hidden[:40], sequences[:40], cfg.depths)
    val = build_positions(hidden[40:], sequences[40:], cfg.depths)
    drafter = new_drafter(model, cfg, kw.get("vocab_ids"))
    return Trainer(model, drafter, data, val, cfg, tmp, log=lambda *_: None)


def test_loss_falls_and_accuracy_beats_chance(corpus, tmp_path):
    trainer = train(corpus, tmp=tmp_path)
    history = trainer.fit(progress=False)
    losses = [h["loss"] for h in history]
    assert len(losses) >= 100
    assert np.mean(losses[-10:]) < 0.6 * np.mean(losses[:10])
    top1 = history[-1]["val_top1"]
    assert top1[0] > 10 / 128  # chance is 1/128
    assert (tmp_path / "checkpoint" / "drafter" / "model.safetensors").exists()


def test_resume_gives_the_same_state(corpus, tmp_path):
    straight = train(corpus, steps_scale=0.2, tmp=tmp_path / "a")
    straight.fit(progress=False)
    interrupted = train(corpus, steps_scale=0.2, tmp=tmp_path / "b")
    interrupted.fit(progress=False, stop_after=7)
    assert interrupted.step == 7
    resumed = train(corpus, steps_scale=0.2, tmp=tmp_path / "b")
    resumed.load_checkpoint()
    assert resumed.step == 7
    resumed.fit(progress=False)
    assert resumed.step == straight.step
    for (k, a), (_, b) in zip(
        tree_flatten(straight.drafter.parameters()),
        tree_flatten(resumed.drafter.parameters()),
        strict=True,
    ):
        assert mx.allclose(a, b, atol=1e-6).item(), k


def test_head_starts_from_the_llm_output_embedding(corpus):
    model, sequences, _ = corpus
    cfg = TrainConfig(exit_dim=64, num_draft_layers=1)
    vocab_ids = np.array([2, 5, 9, 40], dtype=np.int32)
    drafter = new_drafter(model, cfg, vocab_ids)
    expected = model.model.embed_tokens.weight[mx.array(vocab_ids)]
    assert mx.array_equal(drafter.lm_head[-1].weight, expected).item()
    plain = new_drafter(model, TrainConfig(exit_dim=64, init_head_from_llm=False), vocab_ids)
    assert not mx.array_equal(plain.lm_head[-1].weight, expected).item()
