"""The trainer learns a tiny LLM's own continuations and resumes exactly from checkpoints."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_redrafter.benchmarks.tiny import make_model, reference_greedy
from mlx_redrafter.train.accuracy import accuracy
from mlx_redrafter.train.config import TrainConfig
from mlx_redrafter.train.drafter_init import frequent_tokens, new_drafter
from mlx_redrafter.train.llm_states import llm_hidden_states, llm_states
from mlx_redrafter.train.loop import Trainer
from mlx_redrafter.train.loss import soft_cross_entropy
from mlx_redrafter.train.positions import IGNORE, build_positions, token_windows


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


def test_teacher_top_k_is_the_llm_next_token_distribution(corpus):
    model, sequences, _ = corpus
    states = llm_states(model, sequences[:6], top_k=4, progress=False)
    for seq, st in zip(sequences[:6], states, strict=True):
        logits = model(mx.array(seq)[None])[0].astype(mx.float32)
        logp = np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
        assert st.top_ids.shape == (len(seq), 4)
        # ids come most likely first; the stored values are the raw logits
        picked = np.take_along_axis(logp, st.top_ids, axis=-1)
        raw = np.take_along_axis(np.array(logits), st.top_ids, axis=-1)
        assert np.allclose(raw, st.top_logits, atol=2e-2)
        assert np.all(np.diff(picked, axis=-1) <= 1e-5)
        assert np.allclose(np.sort(logp, axis=-1)[:, -4:][:, ::-1], picked, atol=1e-4)


def test_positions_shift_the_teacher_and_llm_labels_match_greedy_data(corpus):
    model, sequences, _ = corpus
    depths = 3
    states = llm_states(model, sequences, top_k=3, progress=False)
    data = build_positions(states, sequences, depths)
    plain = build_positions([s.hidden for s in states], sequences, depths)
    assert plain.teacher_ids is None and np.array_equal(plain.labels, plain.windows[:, 1:])
    assert data.teacher_ids.shape == (len(data), depths, 3)
    # the first sequence's positions come first: entry [t, i] is the LLM's top-k at t + 1 + i
    first, top = sequences[0], states[0].top_ids
    for t in range(len(first) - 2):  # positions with a known next-but-one token
        for i in range(depths):
            expected = top[t + 1 + i] if t + i + 2 < len(first) else np.full(3, IGNORE)
            assert data.teacher_ids[t, i].tolist() == expected.tolist(), (t, i)
    assert np.array_equal(data.labels, data.teacher_ids[:, :, 0])
    # on the greedy continuations (every sequence is 4 prompt tokens + greedy text), the LLM's
    # argmax is the data token, up to rare batched-vs-unbatched near-ties
    label_at = np.concatenate([np.arange(len(s) - 2) for s in sequences])[:, None] + 2
    response = label_at + np.arange(depths)[None, :] >= 4  # the label is a generated token
    valid = data.windows[:, 1:] != IGNORE
    same = data.labels == data.windows[:, 1:]
    assert same[valid & response].mean() > 0.98, same[valid & response].mean()
    assert same[valid & ~response].mean() < 0.5  # random prompt tokens: the LLM disagrees


def test_soft_cross_entropy_matches_numpy():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(5, 7)).astype(np.float32)
    ids = np.array([[1, 4, 2], [0, IGNORE, 3], [IGNORE] * 3, [6, 5, 4], [2, 1, IGNORE]])
    logp = rng.normal(size=(5, 3)).astype(np.float32)
    got = soft_cross_entropy(mx.array(logits), mx.array(ids), mx.array(logp)).item()
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    rows = []
    for r in range(5):
        keep = ids[r] >= 0
        if not keep.any():
            continue
        q = np.exp(logp[r][keep]) / np.exp(logp[r][keep]).sum()
        rows.append(-(q * log_p[r][ids[r][keep]]).sum())
    assert np.isclose(got, np.mean(rows), atol=1e-5)


def train(corpus, steps_scale=1.0, tmp=None, teacher=0, **kw):
    model, sequences, hidden = corpus
    if teacher:
        hidden = llm_states(model, sequences, top_k=teacher, progress=False)
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


@pytest.mark.parametrize("teacher", [0, 4])
def test_loss_falls_and_accuracy_beats_chance(corpus, tmp_path, teacher):
    kw = {"teacher_top_k": teacher, "kl_weight": 0.5} if teacher else {}
    trainer = train(corpus, tmp=tmp_path, teacher=teacher, **kw)
    assert trainer.train.has_teacher == bool(teacher)
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


# ------------------------------------------------------------------------------ loss positions
PROMPTS = [4, 1, 0, 10, 31, 2]  # per sequence: len(prompt) (0: plain text, 31: all but one)


def expected_positions(sequences, hidden, prompt_lengths, depths):
    """(hidden rows, window rows, response flags) computed position by position: a position t
    needs a known x_{t+2}, and is a response position when t >= len(prompt) - 1 (the engine's
    first drafting state: h of the last prompt token, g0 = the first answer token)."""
    rows_h, rows_w, flags = [], [], []
    for seq, h, p in zip(sequences, hidden, prompt_lengths, strict=True):
        for t in range(len(seq) - 2):
            window = [seq[j] if j < len(seq) else IGNORE for j in range(t + 1, t + depths + 2)]
            rows_h.append(h[t])
            rows_w.append(window)
            flags.append(t >= p - 1)
    return np.array(rows_h), np.array(rows_w), np.array(flags)


def test_response_positions_drop_exactly_the_prompt(corpus):
    model, sequences, _ = corpus
    seqs, depths = sequences[: len(PROMPTS)], 3
    states = llm_states(model, seqs, top_k=3, progress=False)
    hid, win, resp = expected_positions(seqs, [s.hidden for s in states], PROMPTS, depths)
    data = build_positions(states, seqs, depths, prompt_lengths=PROMPTS, drop_prompt=True)
    assert len(data) == resp.sum() < len(resp)
    assert np.array_equal(data.windows, win[resp]) and np.array_equal(data.hidden, hid[resp])
    assert data.response.all()
    # each sequence's first kept position reads the first answer token as g0
    counts = [max(len(s) - 2 - max(p - 1, 0), 0) for s, p in zip(seqs, PROMPTS, strict=True)]
    assert counts[PROMPTS.index(31)] == 0  # a prompt filling the sequence leaves nothing
    for start, count, seq, p in zip(np.cumsum([0, *counts]), counts, seqs, PROMPTS, strict=False):
        if count:
            assert data.windows[start, 0] == seq[max(p, 1)], p
    # the teacher and its labels are the full data's rows at the response positions
    full = build_positions(states, seqs, depths, prompt_lengths=PROMPTS)
    assert np.array_equal(full.response, resp)
    assert np.array_equal(data.teacher_ids, full.teacher_ids[resp])
    assert np.array_equal(data.teacher_logits, full.teacher_logits[resp])
    assert np.array_equal(data.labels, full.labels[resp])
    with pytest.raises(ValueError, match="prompt_lengths"):
        build_positions(states, seqs, depths, drop_prompt=True)


@pytest.mark.parametrize("teacher", [0, 3])
def test_all_positions_keep_the_old_position_data_bit_for_bit(corpus, teacher):
    model, sequences, hidden = corpus
    seqs, depths = sequences[: len(PROMPTS)], 3
    states = llm_states(model, seqs, top_k=teacher, progress=False) if teacher else hidden[:6]
    old = build_positions(states, seqs, depths)  # the call as it was before loss positions
    new = build_positions(states, seqs, depths, prompt_lengths=PROMPTS, drop_prompt=False)
    plain = [s.hidden for s in states] if teacher else states
    hid, win, resp = expected_positions(seqs, plain, PROMPTS, depths)
    assert np.array_equal(old.windows, win) and np.array_equal(old.hidden, hid)
    assert old.response is None and np.array_equal(new.response, resp)
    for field in ("hidden", "windows", "labels", "teacher_ids", "teacher_logits"):
        a, b = getattr(old, field), getattr(new, field)
        assert (a is None and b is None) or (a.dtype == b.dtype and np.array_equal(a, b)), field


def test_trainer_loss_positions_and_report_fields(corpus, tmp_path):
    model, sequences, hidden = corpus
    prompts = [4] * len(sequences)
    train_data = build_positions(hidden[:40], sequences[:40], 3, prompt_lengths=prompts[:40])
    val = build_positions(hidden[40:], sequences[40:], 3, prompt_lengths=prompts[40:])
    kept = int(train_data.response.sum())
    assert kept == 40 * (len(sequences[0]) - 2 - 3)
    records = {}
    for mode in ("response", "all"):
        cfg = TrainConfig(
            depths=3, exit_dim=64, num_draft_layers=1, batch_size=64, epochs=1, loss_positions=mode
        )
        trainer = Trainer(model, new_drafter(model, cfg, None), train_data, val, cfg, tmp_path)
        assert len(trainer.train) == (kept if mode == "response" else len(train_data))
        trainer.fit(progress=False)
        records[mode] = trainer.history[-1]
        rec = records[mode]
        assert (
            rec["val_top1"] == rec[f"val_top1_{mode}"]
            and rec["val_top5"] == rec[f"val_top5_{mode}"]
        )
        # the response figure is the accuracy over the held-out response positions alone
        top1, top5 = accuracy(trainer.drafter, trainer.embed, val.select(val.response))
        assert np.allclose(rec["val_top1_response"], top1, atol=1e-4)
        assert np.allclose(rec["val_top5_response"], top5, atol=1e-4)
        top1_all, _ = accuracy(trainer.drafter, trainer.embed, val)
        assert np.allclose(rec["val_top1_all"], top1_all, atol=1e-4)
        assert rec["val_top1_all"] != rec["val_top1_response"]
    bad = TrainConfig(loss_positions="prompt")
    with pytest.raises(ValueError, match="loss_positions"):
        Trainer(
            model,
            new_drafter(model, TrainConfig(exit_dim=64), None),
            train_data,
            val,
            bad,
            tmp_path,
        )
