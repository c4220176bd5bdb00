"""Acceptance: which drafted tokens the LLM keeps, and the token it adds after them.

Inputs are per beam: `beams` (W, L) with g0 at column 0, and the LLM's output at every beam
position, unpacked from the tree (row j of beam b predicts the token after beams[b, j]); the
exact sampling rule reads the packed tree itself (one row per packed node). Everything stays
lazy; the caller brings `best`, `accepted` and `next_token` to the host in one sync.

`accept_tree` picks the rule for a step. Layering: this module builds on `sampling` (the LLM's
distribution) and `sampler_rule` (draws of an mlx-lm sampler object), neither of which imports
it; the match rule on a sampler's draws (`match_accept_draws`) is an acceptance rule, so it
lives here too.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import mlx.core as mx
import numpy as np

from .sampler_rule import sampler_draws
from .sampling import SamplingParams, target_log_probs
from .tree import PackedTree, tree_parents

if TYPE_CHECKING:
    from .drafter import Drafter

ACCEPT_RULES = ("exact", "reference", "match")


@dataclass
class Acceptance:
    best: mx.array  # () beam whose prefix is kept
    accepted: mx.array  # () number of drafted tokens kept (0 .. L-1)
    next_token: mx.array  # () the LLM's token after them: bonus or correction

    def to_host(self) -> tuple[int, int, int]:
        best, accepted, nxt = mx.stack([self.best, self.accepted, self.next_token]).tolist()
        return best, accepted, nxt


def accept_tree(
    beams: mx.array,
    tree: PackedTree,
    tree_logits: mx.array,
    draft_log_probs: mx.array | None,
    drafter: Drafter | None,
    params: SamplingParams,
    key: mx.array,
    rule: str = "exact",
) -> Acceptance:
    """One step's acceptance. Greedy: longest argmax run. Sampling: `rule` (see ACCEPT_RULES)
    over the target distributions of all packed nodes (one `target_log_probs` call); with an
    mlx-lm sampler, the match rule on its draws. `drafter` is None for a step without RNN
    beams (the reference rule then has no q, and the exact rule draws from p)."""
    if params.sampler is not None:
        return match_accept_draws(tree, sampler_draws(params.sampler, tree_logits))
    unpacker = mx.array(tree.unpacker)
    if params.greedy:
        return greedy_accept(beams, mx.argmax(tree_logits, axis=-1)[unpacker])
    target = target_log_probs(tree_logits, params)
    if rule == "exact":
        return exact_accept(tree, target, key)
    if rule == "match":
        return match_accept(tree, target, key)
    if drafter is None:  # a plain step (g0 alone): nothing drafted, the exact rule draws from p
        return exact_accept(tree, target, key)
    draft = drafter.full_vocab_log_probs(draft_log_probs)
    return reference_accept(beams, target[unpacker], draft, key)


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


# ---------------------------------------------------------------------------- exact sampling
def exact_accept(tree: PackedTree, target_log_probs: mx.array, key: mx.array) -> Acceptance:
    """Tree acceptance whose emitted tokens are distributed exactly as the LLM's sampling.

    `target_log_probs` (N, V): the LLM's processed distribution at every packed node (row i is
    p(. | context, path to node i), sampler settings and logits processors applied).

    The walk. Start at the root (g0). At node i with residual distribution r = p_i, take the
    node's distinct child tokens x_1..x_k in drafter-score order (packed order: the first,
    best-scored beam reaching a child orders it). Accept x_j with probability r(x_j); if
    rejected set r(x_j) = 0, renormalize, try x_{j+1}. On acceptance descend to that child and
    start again there; when no child is accepted (always at a leaf) draw the next token from r.

    Exactness. Let S_j = p(x_1) + .. + p(x_j). After j-1 rejections the residual is
    r(x) = p(x) / (1 - S_{j-1}) off x_1..x_{j-1}, and x_j was reached with probability
    prod_{m<j} (1 - p(x_m) / (1 - S_{m-1})) = prod_{m<j} (1 - S_m) / (1 - S_{m-1}) = 1 - S_{j-1}
    (telescoping). So x_j is emitted with probability (1 - S_{j-1}) * p(x_j) / (1 - S_{j-1})
    = p(x_j), and a token y that is no child with probability (1 - S_k) * p(y) / (1 - S_k) =
    p(y): the node emits a draw from p_i (each accept/reject is a test against a point mass of
    the residual). After emitting x_j the walk continues at that child with p_{x_j} =
    p(. | context, path, x_j) and fresh randomness, so by induction over depth the step emits
    an autoregressive sample from the LLM, stopped at the first token that leaves the tree;
    the next step starts from the whole emitted context with a fresh key, so the generated
    sequence is distributed exactly as autoregressive sampling. (Nothing depends on how the
    candidates were chosen or on the drafter's probabilities; zero-probability candidates,
    e.g. filtered by top-p, are never accepted.) It is also the best possible rule for a fixed
    tree: an exact rule emits x_j with probability p(x_j), so it cannot descend more often;
    here every node on the accepted path was reached exactly as often as its path has
    probability under the LLM.

    Realization (vectorized, lazy). One uniform u_i per node plays the whole sequence of
    trials: child x_j is accepted exactly when S_{j-1} <= u_i < S_j, because given rejections
    of x_1..x_{j-1}, u_i is uniform on [S_{j-1}, 1) and lands below S_j with probability
    p(x_j) / (1 - S_{j-1}) = r(x_j). All children's p and S come from one gather and one
    (N, N) sibling product, the accepted path from the ancestor mask, and a single categorical
    draw over the end node's p with its children zeroed gives the next token: O(N^2 + V) work
    in one compiled graph, no host loop, nothing synced here (the caller's `to_host` is the
    step's second sync). `exact_accept_from_uniforms` takes the uniforms from the caller.
    """
    return Acceptance(*_walk_random(target_log_probs, key, *_WalkArrays.of(tree).arrays()))


def exact_accept_from_uniforms(
    tree: PackedTree, target_log_probs: mx.array, uniforms: mx.array, key: mx.array
) -> Acceptance:
    """`exact_accept` with the walk's per-node uniforms given ((N,), in [0, 1)).

    The path and accepted count depend only on `uniforms`; `key` draws the next token from the
    end node's residual distribution.
    """
    return Acceptance(*_walk(target_log_probs, uniforms, key, *_WalkArrays.of(tree).arrays()))


def _walk_graph(
    target_log_probs,
    uniforms,
    key,
    parents,
    tokens,
    is_child,
    upper,
    previous,
    ancestors,
    depths,
    beam_and_depth,
    child_tokens,
):
    """The walk over all nodes at once (see `exact_accept`); arrays from `_WalkArrays`."""
    # p_parent(x) of every child x (0 for the root), gathered from the flattened (N, V) target
    flat = parents * target_log_probs.shape[-1] + tokens
    p_child = mx.exp(target_log_probs.reshape(-1)[flat]) * is_child
    # S_j of every child, and S_{j-1} read off its previous sibling's S, so the siblings'
    # intervals [S_{j-1}, S_j) tile [0, S_k) exactly; the root's interval is [0, 2): it is
    # always on the path
    high = upper @ p_child
    low = mx.where(previous >= 0, high[mx.maximum(previous, 0)], 0.0)
    u = uniforms[parents]
    taken = (low <= u) & (u < high + 2.0 * (1.0 - is_child))
    # on the path: the node and all its ancestors taken; the end is the deepest such node
    on_path = (ancestors @ (1.0 - taken.astype(mx.float32))) == 0
    end = mx.argmax(mx.where(on_path, depths, -1))
    pick = beam_and_depth[end]  # the first (best-scored) beam holding the path, its depth
    # next token: the end node's p with its children zeroed (all of them were rejected)
    row = target_log_probs[end]
    zeroed = (child_tokens[end][:, None] == mx.arange(row.shape[-1])[None, :]).any(axis=0)
    residual = mx.where(zeroed, -mx.inf, row)
    # Children holding all of p's mass leave no residual; the walk stops there only by float
    # rounding (probability ~1e-7), and p itself is the fallback.
    residual = mx.where(mx.logsumexp(residual) > -mx.inf, residual, row)
    next_token = mx.random.categorical(residual, key=key).astype(mx.int32)
    return pick[0], pick[1], next_token


def _walk_random_graph(target_log_probs, key, *arrays):
    u_key, token_key = mx.random.split(key)
    uniforms = mx.random.uniform(shape=(target_log_probs.shape[0],), key=u_key)
    return _walk_graph(target_log_probs, uniforms, token_key, *arrays)


# Compiled once per tree shape (N nodes, C children at most: a few dozen shapes in a run): the
# graph is some 25 tiny ops, whose per-op dispatch would otherwise dominate the walk's cost.
_walk = mx.compile(_walk_graph)
_walk_random = mx.compile(_walk_random_graph)


# ---------------------------------------------------------------------------- match (baseline)
def match_accept(tree: PackedTree, target_log_probs: mx.array, key: mx.array) -> Acceptance:
    """mlx-lm's speculative rule on the tree: keep a drafted token only if it equals the LLM's
    own sample at its parent.

    Every node draws y_i ~ p_i (independently); a child is taken when its token equals its
    parent's draw; the path follows taken children from the root and the next token is the draw
    at its end. Exact, since each emitted token is a draw from the LLM's distribution given the
    tokens before it. For a fixed tree it takes child x with probability p(x), as `exact_accept`
    does, so the two accept equally often in expectation; what makes mlx-lm's own version gain
    little when sampling is that its candidates are themselves samples from the draft model
    (accepted with probability sum_x p(x) q(x)), while here the beams are deterministic. Kept
    as the comparison the sampling figures were asked for (`--accept match`).
    """
    draws = mx.random.categorical(target_log_probs, key=key).astype(mx.int32)  # (N,)
    return match_accept_draws(tree, draws)


def match_accept_draws(tree: PackedTree, draws: mx.array) -> Acceptance:
    """The match rule on given draws (N,), one per packed node: follow children equal to their
    parent's draw (an mlx-lm sampler's draws, see sampler_rule.py, or `match_accept`'s)."""
    walk = _WalkArrays.of(tree)
    return Acceptance(
        *_match(
            draws,
            walk.tokens,
            walk.parents,
            walk.is_child,
            walk.ancestors,
            walk.depths,
            walk.beam_and_depth,
        )
    )


def _match_graph(draws, tokens, parents, is_child, ancestors, depths, beam_depth):
    taken = (draws[parents] == tokens) | (is_child == 0)
    on_path = (ancestors @ (1.0 - taken.astype(mx.float32))) == 0
    end = mx.argmax(mx.where(on_path, depths, -1))
    pick = beam_depth[end]
    return pick[0], pick[1], draws[end]


_match = mx.compile(_match_graph)


@dataclass(frozen=True)
class _WalkArrays:
    """What the walk needs from the tree's shape: host NumPy work, microseconds per step."""

    parents: mx.array  # (N,) parent's packed index (0 for the root)
    tokens: mx.array  # (N,) each node's token
    is_child: mx.array  # (N,) 1.0 except the root
    upper: mx.array  # (N, N) each child's earlier siblings and itself: upper @ p = S_j
    previous: mx.array  # (N,) each child's previous sibling (-1 for a first child)
    ancestors: mx.array  # (N, N) float ancestor-or-self mask
    depths: mx.array  # (N,)
    beam_and_depth: mx.array  # (N, 2) first beam holding the node, and its depth
    child_tokens: mx.array  # (N, C) each node's child tokens, padded with -1

    @classmethod
    def of(cls, tree: PackedTree) -> _WalkArrays:
        n = tree.size
        # the root gets 0, a valid index for the gathers below (is_child masks it out)
        parents = np.maximum(tree_parents(tree), 0).astype(np.int64)
        node = np.arange(n)
        is_child = tree.depths > 0
        # children in packed order: the order of the first (best-scored) beam reaching each
        same = (parents[:, None] == parents[None, :]) & is_child[:, None] & is_child[None, :]
        before = same & (node[None, :] < node[:, None])
        upper = same & (node[None, :] <= node[:, None])
        previous = np.where(before.any(axis=1), n - 1 - np.argmax(before[:, ::-1], axis=1), -1)
        length = tree.unpacker.shape[1]
        rank = before.sum(axis=1)  # each child's place among its siblings
        child_tokens = np.full((n, int(rank.max()) + 1), -1, np.int32)
        child_tokens[parents[is_child], rank[is_child]] = tree.tokens[is_child]
        return cls(
            parents=mx.array(parents.astype(np.int32)),
            tokens=mx.array(tree.tokens.astype(np.int32)),
            is_child=mx.array(is_child.astype(np.float32)),
            upper=mx.array(upper.astype(np.float32)),
            previous=mx.array(previous.astype(np.int32)),
            ancestors=mx.array(tree.mask.astype(np.float32)),
            depths=mx.array(tree.depths.astype(np.int32)),
            beam_and_depth=mx.array(
                np.stack([tree.flat_indices // length, tree.depths], axis=1).astype(np.int32)
            ),
            child_tokens=mx.array(child_tokens),
        )

    def arrays(self) -> tuple[mx.array, ...]:
        return tuple(getattr(self, f.name) for f in fields(self))
