"""Per-token log-probabilities of emitted tokens, read off the logits the engine already has.

Every emitted token was predicted by one row of a forward the step ran anyway: the prefill's
last row for the first token, then the verify forward's row at each accepted node (its parent
on the accepted path) for the kept tokens and the LLM's own next token. So the model's own
log-probs cost one log-softmax over those few rows and one host sync, and nothing at all when
nobody asks (`generate_step(..., logprobs=None)`, the default).

The values are mlx-lm's: log-softmax of the logits after the logits processors (penalties,
logit bias), before temperature and the top-p/top-k/min-p filters (`mlx_lm.generate_step`
returns the same vector).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import mlx.core as mx

MAX_TOP_LOGPROBS = 20  # OpenAI's limit for top_logprobs


@dataclass
class TokenLogprobs:
    """Log-probs of a run of emitted tokens, and each position's `top` most likely tokens."""

    logprobs: list[float]  # of each emitted token
    top_tokens: list[list[int]]  # per position, most likely first (empty lists when top == 0)
    top_logprobs: list[list[float]]

    def head(self, n: int) -> TokenLogprobs:
        """The first n positions (a step's tokens after EOS or a stop are not shown)."""
        return TokenLogprobs(self.logprobs[:n], self.top_tokens[:n], self.top_logprobs[:n])

    def __len__(self) -> int:
        return len(self.logprobs)


def check_top(top: int | None) -> None:
    if top is not None and not 0 <= top <= MAX_TOP_LOGPROBS:
        raise ValueError(f"top logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {top}")


def token_logprobs(logits: mx.array, tokens: Sequence[int], top: int) -> TokenLogprobs:
    """`logits` (n, V): row i predicted `tokens[i]`. One sync for all rows."""
    logprobs = logits.astype(mx.float32)
    logprobs = logprobs - mx.logsumexp(logprobs, axis=-1, keepdims=True)
    ids = mx.array(list(tokens), dtype=mx.int32)[:, None]
    chosen = mx.take_along_axis(logprobs, ids, axis=-1)[:, 0]
    top = min(top, logprobs.shape[-1])
    if top <= 0:
        return TokenLogprobs(chosen.tolist(), [[] for _ in tokens], [[] for _ in tokens])
    candidates = mx.argpartition(-logprobs, kth=top - 1, axis=-1)[:, :top]
    values = mx.take_along_axis(logprobs, candidates, axis=-1)
    order = mx.argsort(-values, axis=-1)
    top_ids = mx.take_along_axis(candidates, order, axis=-1)
    top_values = mx.take_along_axis(values, order, axis=-1)
    mx.eval(chosen, top_ids, top_values)
    return TokenLogprobs(chosen.tolist(), top_ids.tolist(), top_values.tolist())
