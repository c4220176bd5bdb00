"""Training positions: each position's hidden state, the tokens after it, and what it learns.

For a sequence x and the LLM's hidden state h_t at each position t, the drafter at depth i
(0 <= i < K) has consumed the true tokens x_{t+1} .. x_{t+1+i} through its RNN and learns
x_{t+i+2}. Positions are the unit of batching: each position t contributes its hidden state and
the K+1 tokens after it (its "window"), so a batch is a random set of positions from many
sequences.

With a teacher (`llm_states.py`), depth i at position t learns the LLM's prediction at t+i+1
(what the LLM would emit after the tokens the RNN consumed): its argmax as the hard label
(`llm_labels`; equal to the data on the LLM's own greedy answers, and the right target on
prompts, sampled answers and plain text, where the data token is not what the LLM would say),
and its top-k as the soft label.

Loss positions (`TrainConfig.loss_positions`): the engine drafts first from the state
t = len(prompt) - 1 (hidden h_t of the last prompt token, g0 = the first generated token), so a
position t of a prompt + response sequence is a *response position* when t >= len(prompt) - 1;
every position of plain text (no prompt) is one. Decision: "response" (the default) trains only
on those, as the reference recipe masks prompt positions out of its loss: the prompt (chat
template, system prompt) is never drafted by the engine, and its memorised positions inflate
held-out accuracy. "all" keeps the earlier behaviour (every position of prompt + response). The
LLM pass is the same either way (the mask applies after it), and held-out accuracy is reported on
both the response positions and all positions, so runs with either setting compare.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .llm_states import SequenceStates

IGNORE = -1


@dataclass
class PositionData:
    """Every training position: the LLM's hidden state and the K+1 tokens after it.

    `labels[:, i]` is what depth i learns (the data token x_{t+i+2}, or the LLM's argmax after
    x_{t+i+1}); `teacher_ids/logits[:, i]` the LLM's top-k there (absent without a teacher).
    """

    hidden: np.ndarray  # (P, H) float16/float32
    windows: np.ndarray  # (P, K+1) int32 LLM token ids, IGNORE past a sequence's end
    labels: np.ndarray | None = None  # (P, K) int32; None: windows[:, 1:]
    teacher_ids: np.ndarray | None = None  # (P, K, k) int32, IGNORE where undefined
    teacher_logits: np.ndarray | None = None  # (P, K, k) float16
    response: np.ndarray | None = None  # (P,) bool: t >= len(prompt) - 1; None: all True

    def __post_init__(self) -> None:
        if self.labels is None:
            self.labels = self.windows[:, 1:]

    def __len__(self) -> int:
        return int(self.hidden.shape[0])

    @property
    def has_teacher(self) -> bool:
        return self.teacher_ids is not None

    @property
    def response_mask(self) -> np.ndarray:
        """(P,) bool: the positions the engine drafts from (all of them without prompts)."""
        if self.response is None:
            return np.ones(len(self), dtype=bool)
        return self.response

    def select(self, mask: np.ndarray) -> PositionData:
        """The positions where `mask` holds (a copy)."""

        def pick(a):
            return None if a is None else a[mask]

        return PositionData(
            hidden=self.hidden[mask],
            windows=self.windows[mask],
            labels=pick(self.labels),
            teacher_ids=pick(self.teacher_ids),
            teacher_logits=pick(self.teacher_logits),
            response=pick(self.response),
        )


def token_windows(tokens: Sequence[int], depths: int) -> np.ndarray:
    """(T, K+1): for position t, tokens t+1 .. t+K+1 (IGNORE beyond the end)."""
    arr = np.asarray(tokens, dtype=np.int32)
    padded = np.concatenate([arr, np.full(depths + 1, IGNORE, np.int32)])
    idx = np.arange(len(arr))[:, None] + 1 + np.arange(depths + 1)[None, :]
    return padded[idx]


def first_response_position(prompt_length: int) -> int:
    """The first position the engine drafts from: t = len(prompt) - 1 (h_t of the last prompt
    token, g0 = the first generated token); 0 without a prompt."""
    return max(int(prompt_length) - 1, 0)


def build_positions(
    hidden: Sequence[np.ndarray] | Sequence[SequenceStates],
    sequences: Sequence[Sequence[int]],
    depths: int,
    llm_labels: bool = True,
    prompt_lengths: Sequence[int] | None = None,
    drop_prompt: bool = False,
) -> PositionData:
    """Positions of all sequences, from hidden arrays or SequenceStates (teacher when present).

    Depth i at position t: the RNN has read x_{t+1} .. x_{t+1+i}; the data label is x_{t+i+2}
    and the teacher is the LLM's top-k at position t+i+1.

    prompt_lengths (len(prompt) per sequence, 0 for plain text) marks the response positions
    t >= len(prompt) - 1 in `response`; with `drop_prompt` the others are left out (the
    "response" loss). Without prompt_lengths every position is kept and `response` is None.
    """
    if drop_prompt and prompt_lengths is None:
        raise ValueError("drop_prompt needs prompt_lengths")
    states = [h if isinstance(h, SequenceStates) else SequenceStates(h) for h in hidden]
    teacher = all(s.top_ids is not None for s in states) and len(states) > 0
    windows = [token_windows(s, depths) for s in sequences]
    # a position whose next token is unknown teaches nothing
    keep = [w[:, 1] != IGNORE for w in windows]
    response = None
    if prompt_lengths is not None:
        marks = [
            np.arange(len(w)) >= first_response_position(n)
            for w, n in zip(windows, prompt_lengths, strict=True)
        ]
        if drop_prompt:
            keep = [k & m for k, m in zip(keep, marks, strict=True)]
        response = np.concatenate([m[k] for m, k in zip(marks, keep, strict=True)])
    data = PositionData(
        hidden=np.concatenate([s.hidden[k] for s, k in zip(states, keep, strict=True)]),
        windows=np.concatenate([w[k] for w, k in zip(windows, keep, strict=True)]),
        response=response,
    )
    if not teacher:
        return data
    ids, values = [], []
    for s, w, k in zip(states, windows, keep, strict=True):
        t_ids, t_logit = _shifted(s.top_ids, depths, IGNORE), _shifted(s.top_logits, depths, 0)
        valid = (w[:, 1:] != IGNORE)[:, :, None]  # depth i exists where its data label does
        ids.append(np.where(valid, t_ids, IGNORE)[k])
        values.append(np.where(valid, t_logit, 0)[k].astype(np.float16))
    data.teacher_ids = np.concatenate(ids)
    data.teacher_logits = np.concatenate(values)
    if llm_labels:
        data.labels = data.teacher_ids[:, :, 0].copy()
    return data


def _shifted(per_position: np.ndarray, depths: int, fill) -> np.ndarray:
    """(T, k) -> (T, K, k): entry [t, i] = per_position[t + 1 + i] (fill past the end)."""
    length = per_position.shape[0]
    padded = np.concatenate(
        [per_position, np.full((depths + 1, per_position.shape[1]), fill, per_position.dtype)]
    )
    idx = np.arange(length)[:, None] + 1 + np.arange(depths)[None, :]
    return padded[idx]


def split_by_id(ids: Sequence[str], val_fraction: float) -> np.ndarray:
    """Deterministic held-out mask from sequence ids (stable across runs and data growth)."""

    def bucket(s: str) -> float:
        return int(hashlib.sha1(s.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF

    return np.array([bucket(i) < val_fraction for i in ids], dtype=bool)
