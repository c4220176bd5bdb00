"""The frozen LLM pass the drafter trains on: h_t at every position, and the LLM's own top-k.

The drafter learns from the LLM's final-normed hidden state h_t at each position of a
sequence. The LLM is frozen, so it runs once per sequence before training, not once per step
(and `states_cache.py` keeps the result on disk between runs).

Self-distillation (`TrainConfig.teacher_top_k` > 0): the same pass that gives h_t also gives the
LLM's own next-token distribution at every position, kept as its top-k ids and logits
(`positions.py` shifts them to the depths that learn them, `loss.py` turns them into a soft
label). Decision: the teacher is recomputed in this pass rather than read from the top-k that
`generate-data --top-k-logprobs` can store, so every source (including plain text) gets it and
no large arrays need keeping; the stored ones remain for analysis.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..drafter import top_indices


@dataclass
class SequenceStates:
    """What one LLM pass over a sequence gives: h_t, and optionally its top-k next tokens."""

    hidden: np.ndarray  # (T, H) float16
    top_ids: np.ndarray | None = None  # (T, k) int32, most likely first
    top_logits: np.ndarray | None = None  # (T, k) float16 raw logits (softmax over them: q)


def llm_hidden_states(
    model: nn.Module,
    sequences: Sequence[Sequence[int]],
    max_tokens_per_batch: int = 4096,
    progress: bool = True,
) -> list[np.ndarray]:
    """The LLM's final-normed hidden state at every position of every sequence (frozen)."""
    states = llm_states(model, sequences, 0, max_tokens_per_batch, progress)
    return [s.hidden for s in states]


def llm_states(
    model: nn.Module,
    sequences: Sequence[Sequence[int]],
    top_k: int = 0,
    max_tokens_per_batch: int = 4096,
    progress: bool = True,
    bar=None,
) -> list[SequenceStates]:
    """One frozen LLM pass per sequence: hidden states, and the top-k next tokens if asked.

    Sequences are grouped by length into padded batches (right padding is harmless under a
    causal mask) so that the LLM runs on large matrices; the vocabulary projection for the
    top-k runs in row chunks so that (tokens x vocabulary) logits never sit in memory at once.
    """
    from ..verify import lm_head

    head = lm_head(model) if top_k > 0 else None
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    out: list[SequenceStates | None] = [None] * len(sequences)
    own_bar = bar is None
    if own_bar:
        bar = states_bar(sum(len(s) for s in sequences), top_k, progress)
    start = 0
    while start < len(order):
        longest = len(sequences[order[start]])
        end = start + 1
        while end < len(order):
            longest = max(longest, len(sequences[order[end]]))
            if longest * (end - start + 1) > max_tokens_per_batch:
                break
            end += 1
        longest = max(len(sequences[i]) for i in order[start:end])
        batch = np.zeros((end - start, longest), dtype=np.int32)
        for row, i in enumerate(order[start:end]):
            batch[row, : len(sequences[i])] = sequences[i]
        hidden = model.model(mx.array(batch))
        mx.eval(hidden)
        top_ids = top_logits = None
        if head is not None:
            top_ids, top_logits = _top_k_next(head, hidden, top_k)
        hidden = np.array(hidden.astype(mx.float16))
        for row, i in enumerate(order[start:end]):
            n = len(sequences[i])
            out[i] = SequenceStates(
                hidden[row, :n],
                None if top_ids is None else top_ids[row, :n],
                None if top_logits is None else top_logits[row, :n],
            )
            bar.update(n)
        start = end
    if own_bar:
        bar.close()
    return out  # type: ignore[return-value]


def states_bar(total_tokens: int, top_k: int, progress: bool = True):
    """The progress bar of the frozen LLM pass (shared with the on-disk states cache)."""
    from tqdm import tqdm

    desc = "LLM hidden states" + (f" + top-{top_k}" if top_k else "")
    return tqdm(total=total_tokens, unit="tok", desc=desc, disable=not progress)


def _top_k_next(head, hidden: mx.array, k: int, chunk: int = 512):
    """(B, T, H) hidden -> top-k ids (B, T, k) int32 and their raw logits (B, T, k) float16.

    Raw logits, not log-probs: the soft label renormalizes over the top-k, where the full
    softmax's normalizer cancels, so a log-softmax over the whole vocabulary would be work for
    nothing.
    Chunks are evaluated one by one so that (chunk x vocabulary) logits are all that is live.
    """
    rows = hidden.reshape(-1, hidden.shape[-1])
    ids, values = [], []
    for i in range(0, rows.shape[0], chunk):
        logits = head(rows[i : i + chunk]).astype(mx.float32)
        top = top_indices(logits, k).astype(mx.int32)
        picked = mx.take_along_axis(logits, top, axis=-1)
        mx.eval(top, picked)
        ids.append(top)
        values.append(picked)
    shape = (*hidden.shape[:2], k)
    ids = mx.concatenate(ids).reshape(shape)
    values = mx.concatenate(values).reshape(shape)
    return np.array(ids).astype(np.int32), np.array(values.astype(mx.float16))
