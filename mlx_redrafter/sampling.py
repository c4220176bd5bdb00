"""The LLM's processed next-token distribution, shared by every decoding path.

Acceptance needs the distribution itself, not a sampler callable, so sampler settings are kept
as data. Filters are mlx-lm's own (`apply_top_p`, `apply_min_p`, `apply_top_k`) in mlx-lm's order
and the temperature divides the filtered log-probs, as `mlx_lm.sample_utils.make_sampler` does:
the autoregressive and speculative paths sample from one and the same distribution.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import mlx.core as mx
import numpy as np
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p

from .sampler_rule import Sampler, sampler_draws
from .tree import PackedTree

LogitsProcessor = Callable[[mx.array, mx.array], mx.array]


@dataclass(frozen=True)
class SamplingParams:
    temp: float = 0.0
    top_p: float = 0.0
    top_k: int = 0
    min_p: float = 0.0
    # an mlx-lm sampler (logprobs -> token) instead of the settings above: see sampler_rule.py
    sampler: Sampler | None = None

    def __post_init__(self) -> None:
        if self.temp < 0:
            raise ValueError(f"temp must be >= 0, got {self.temp}")
        if not 0 <= self.top_p <= 1:
            raise ValueError(f"top_p must be in [0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")

    @property
    def greedy(self) -> bool:
        return self.temp == 0 and self.sampler is None


def target_log_probs(logits: mx.array, params: SamplingParams) -> mx.array:
    """Log-probs of the distribution a sampled token is drawn from, row-wise over (..., V)."""
    logprobs = logits.astype(mx.float32)
    logprobs = logprobs - mx.logsumexp(logprobs, axis=-1, keepdims=True)
    if 0 < params.top_p < 1.0:
        logprobs = apply_top_p(logprobs, params.top_p)
    if params.min_p != 0.0:
        logprobs = apply_min_p(logprobs, params.min_p)
    if 0 < params.top_k < logprobs.shape[-1]:
        logprobs = apply_top_k(logprobs, params.top_k)
    scaled = logprobs * (1.0 / params.temp)
    return scaled - mx.logsumexp(scaled, axis=-1, keepdims=True)


def choose_token(logits: mx.array, params: SamplingParams, key: mx.array) -> mx.array:
    """The token after the last row of `logits` (lazy): argmax, a draw from
    `target_log_probs`, or the sampler's draw."""
    if params.sampler is not None:
        return sampler_draws(params.sampler, logits[-1:])[0]
    if params.greedy:
        return mx.argmax(logits[-1]).astype(mx.int32)
    return mx.random.categorical(target_log_probs(logits[-1], params), key=key).astype(mx.int32)


def process_logits(
    logits: mx.array,
    histories: Sequence[mx.array],
    processors: Sequence[LogitsProcessor] | None,
) -> mx.array:
    """Apply mlx-lm logits processors row by row, each row with its own token history.

    In a tree every node has its own history (the context plus its ancestors), so the
    processors run once per packed node: a host loop over at most W*L rows, only when
    processors are given.
    """
    if not processors:
        return logits
    rows = []
    for row, history in zip(logits, histories, strict=True):
        row = row[None]
        for processor in processors:
            row = processor(history, row)
        rows.append(row[0])
    return mx.stack(rows)


def node_histories(context: mx.array, tree: PackedTree) -> list[mx.array]:
    """For each packed node: the context followed by the node's ancestors and itself (the
    token history a logits processor sees at that node)."""
    histories = []
    for node in range(tree.size):
        ancestors = np.flatnonzero(tree.mask[node])
        histories.append(mx.concatenate([context, mx.array(tree.tokens[ancestors[1:]])]))
    return histories
