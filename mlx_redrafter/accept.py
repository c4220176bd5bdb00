"""Acceptance: which drafted tokens the LLM keeps, and the token it adds after them.

Inputs are per beam: `beams` (W, L) with g0 at column 0, and the LLM's output at every beam
position, unpacked from the tree (row j of beam b predicts the token after beams[b, j]).
Everything stays lazy; the caller brings `best`, `accepted` and `next_token` to the host in
one sync.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx


@dataclass
class Acceptance:
    best: mx.array  # () beam whose prefix is kept
    accepted: mx.array  # () number of drafted tokens kept (0 .. L-1)
    next_token: mx.array  # () the LLM's token after them: bonus or correction

    def to_host(self) -> tuple[int, int, int]:
        best, accepted, nxt = mx.stack([self.best, self.accepted, self.next_token]).tolist()
        return best, accepted, nxt


def greedy_accept(beams: mx.array, llm_tokens: mx.array) -> Acceptance:
    """Longest run of drafted tokens equal to the LLM's argmax; exact for greedy decoding.

    `llm_tokens` (W, L) is the LLM's argmax at each beam position. Ties between beams go to the
    lowest index (the drafter's best-scored beam).
    """
    matches = (beams[:, 1:] == llm_tokens[:, :-1]).astype(mx.int32)
    run = mx.cumprod(matches, axis=1).sum(axis=1)
    best = mx.argmax(run)
    accepted = run[best]
    return Acceptance(best, accepted, llm_tokens[best, accepted])


def reference_accept(
    beams: mx.array,
    target_log_probs: mx.array,
    draft_log_probs: mx.array,
    key: mx.array,
) -> Acceptance:
    """The ReDrafter reference's sampling rule (not distribution-exact; kept swappable).

    Per beam, drafted token x at depth j is kept with probability min(1, p(x) / q(x)), p the
    LLM's processed distribution and q the drafter's; the beam with the longest kept run wins.
    After a rejection the correction is drawn from the residual max(p - q, 0); after a full run
    the bonus is drawn from p.

    target_log_probs: (W, L, V); draft_log_probs: (W, L-1, V) in the LLM's vocabulary.
    """
    width, length = beams.shape
    accept_key, token_key = mx.random.split(key)
    drafted = beams[:, 1:, None]
    log_p = mx.take_along_axis(target_log_probs[:, :-1], drafted, axis=-1)[..., 0]
    log_q = mx.take_along_axis(draft_log_probs, drafted, axis=-1)[..., 0]
    u = mx.random.uniform(shape=(width, length - 1), key=accept_key)
    keep = (mx.log(u) < (log_p - log_q)).astype(mx.int32)
    run = mx.cumprod(keep, axis=1).sum(axis=1)
    best = mx.argmax(run)
    accepted = run[best]

    p = mx.exp(target_log_probs[best, accepted])
    q_padded = mx.concatenate(
        [mx.exp(draft_log_probs[best]), mx.zeros((1, p.shape[-1]), dtype=p.dtype)]
    )
    residual = mx.maximum(p - q_padded[accepted], 0.0)
    mass = residual.sum()
    residual = mx.where(mass > 0, residual / mx.maximum(mass, 1e-30), p)
    next_token = mx.random.categorical(mx.log(residual), key=token_key)
    return Acceptance(best, accepted, next_token.astype(mx.int32))
