"""Generation with an mlx-lm sampler object (`mlx_lm.sample_utils.make_sampler`).

A sampler is an opaque function logprobs -> token: the exact and reference acceptance rules
need the distribution itself, which it does not expose. The `match` rule needs only draws, so
with a sampler every packed tree node gets one draw by the sampler on that node's processed
logits row, and a drafted token is kept when it equals its parent's draw
(`accept.match_accept_draws`). Exact: each emitted token is the sampler's own draw given the
tokens before it, as in mlx-lm's own decoding.

This module knows the sampler object only (is it usable, what does it draw); it imports nothing
from the engine, so both `sampling` and `accept` can build on it.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx

Sampler = Callable[[mx.array], mx.array]


def check_sampler(sampler: Sampler | None, params: dict, accept: str) -> None:
    """A sampler replaces temp/top_p/top_k/min_p and works with the match rule only."""
    if sampler is None:
        return
    if not callable(sampler):
        raise ValueError(f"sampler must be a function logprobs -> token, got {type(sampler)}")
    given = [name for name, value in params.items() if value]
    if given:
        raise ValueError(
            f"give either a sampler or {', '.join(given)}: the sampler already decides how "
            "tokens are drawn (build it with mlx_lm.sample_utils.make_sampler)"
        )
    if accept == "reference":
        raise ValueError(
            "accept='reference' needs the LLM's distribution, which a sampler object does not "
            "expose; with a sampler the 'match' rule is used"
        )


def sampler_draws(sampler: Sampler, logits: mx.array) -> mx.array:
    """One draw per row of (N, V) logits, the sampler given log-probs as mlx-lm gives them."""
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    draws = sampler(logprobs)
    if draws.shape != logits.shape[:-1]:
        raise ValueError(
            f"the sampler returned shape {draws.shape} for logits {logits.shape}: it must draw "
            "one token per row"
        )
    return draws.astype(mx.int32)
