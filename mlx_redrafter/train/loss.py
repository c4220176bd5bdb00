"""The training objective: teacher-forced cross-entropy per depth, plus the soft label.

Each depth i of the drafter is trained with cross-entropy on its label (`positions.py`), each
depth's mean summed over depths. The draft vocabulary (`TrainConfig.draft_vocab`) is the N most
frequent tokens of the training data; targets outside it are left out of the loss (and counted
as misses in accuracy, `accuracy.py`).

With a teacher and `kl_weight` > 0, the LLM's top-k distribution (renormalized over the ids in
the draft vocabulary) is a soft label with weight `kl_weight`, the hard label getting
1 - `kl_weight`. The soft cross-entropy differs from KL(teacher || drafter) by the teacher's
entropy, a constant, so it has the same gradient.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..drafter import Drafter
from .positions import IGNORE


def draft_targets(drafter: Drafter, windows: mx.array) -> mx.array:
    """LLM ids -> draft-vocabulary indices (IGNORE when outside the draft vocabulary)."""
    if drafter.config.draft_vocab_size is None:
        return windows
    table = mx.full((drafter.config.vocab_size + 1,), IGNORE, dtype=mx.int32)
    table[drafter.draft_vocab_ids] = mx.arange(drafter.config.draft_vocab_size, dtype=mx.int32)
    return table[mx.where(windows < 0, drafter.config.vocab_size, windows)]


def depth_logits(drafter: Drafter, embed: nn.Module, hidden: mx.array, windows: mx.array):
    """Teacher-forced drafter logits at each depth: list of K arrays (B, V_draft)."""
    state = mx.zeros((hidden.shape[0], drafter.config.hidden_size), dtype=hidden.dtype)
    logits = []
    for i in range(windows.shape[1] - 1):
        token = mx.maximum(windows[:, i], 0)  # IGNORE rows are masked out of the loss
        state = drafter.rnn_step(state, mx.stop_gradient(embed(token)))
        logits.append(drafter.head_logits(hidden, state))
    return logits


def loss_and_metrics(
    drafter: Drafter,
    embed: nn.Module,
    hidden: mx.array,
    windows: mx.array,
    targets: mx.array,
    teacher: tuple[mx.array, mx.array] | None = None,
    kl_weight: float = 0.0,
):
    """Loss summed over depths (each depth's mean), and per-depth (hard loss sum, count).

    targets (B, K): draft-vocabulary indices (IGNORE: no label, or outside the vocabulary).
    teacher: draft-vocabulary ids (B, K, k) (IGNORE where absent) and logits (B, K, k).
    """
    total = mx.array(0.0)
    per_depth = []
    for i, logits in enumerate(depth_logits(drafter, embed, hidden, windows)):
        logits = logits.astype(mx.float32)
        target = targets[:, i]
        valid = target >= 0
        ce = nn.losses.cross_entropy(logits, mx.maximum(target, 0))
        ce = mx.where(valid, ce, 0.0)
        term = ce.sum() / mx.maximum(valid.sum(), 1)
        if teacher is not None and kl_weight > 0:
            soft = soft_cross_entropy(logits, teacher[0][:, i], teacher[1][:, i])
            term = (1.0 - kl_weight) * term + kl_weight * soft
        total = total + term
        per_depth.append((ce.sum(), valid.sum()))
    return total, per_depth


def soft_cross_entropy(logits: mx.array, ids: mx.array, teacher: mx.array) -> mx.array:
    """Mean over rows of -sum_j q_j log p(ids_j); q = softmax of the teacher's top-k logits
    (or log-probs: a per-row constant cancels).

    Entries with id IGNORE (outside the draft vocabulary, or past the end) get no mass; rows
    with none left are skipped.
    """
    present = ids >= 0
    q = mx.softmax(mx.where(present, teacher.astype(mx.float32), -1e9), axis=-1)
    q = mx.where(present, q, 0.0)
    log_p = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    picked = mx.take_along_axis(log_p, mx.maximum(ids, 0), axis=-1)
    rows = present.any(axis=-1)
    per_row = mx.where(rows, -(q * picked).sum(axis=-1), 0.0)
    return per_row.sum() / mx.maximum(rows.sum(), 1)
