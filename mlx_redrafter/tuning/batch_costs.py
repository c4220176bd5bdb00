"""What one batched decode step costs here: t(B, N) and the batched beam search per (B, W, L).

- `batch_forward_cost_curve`: seconds of one batched verification forward of B rows x N tree
  tokens after `cache_len` cached tokens per row, through the batch engine's own seam
  (`batch.batch_verify` over a `BatchTreeKVCache`, the LM head included, as a step runs it).
  Timed in rounds over all (B, N), as `costs.forward_cost_curve` does: a slow phase of the
  machine lands on every cell alike. On a CPU a forward's cost grows with B x N (arithmetic
  bounds it), so a tree that pays at B = 1 can make a batch slower than plain steps.
- `batch_draft_costs`: one `Drafter.beam_search_batch` for B rows of each shape (W, L), with
  the host sync, each row's packing and the padding to the largest tree that a step does; and
  that padded size (what the forward then verifies).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..batch import batch_prefill, batch_verify, pad_trees
from ..batch_cache import BatchTreeKVCache
from ..drafter import Drafter
from ..tree import pack_tree
from ..verify import embed_tokens, lm_head


def batch_sizes_up_to(limit: int) -> list[int]:
    """1, 2, 4, ... below `limit`, then `limit` itself: the batch sizes a table holds."""
    if limit < 1:
        raise ValueError(f"the largest batch size must be >= 1, got {limit}")
    sizes, b = [], 1
    while b < limit:
        sizes.append(b)
        b *= 2
    return [*sizes, limit]


def filled_batch_cache(
    model: nn.Module, batch: int, cache_len: int, seed: int = 0
) -> list[BatchTreeKVCache]:
    """A batched cache of `batch` rows holding `cache_len` random tokens each."""
    vocab = int(embed_tokens(model).weight.shape[0])
    rng = np.random.default_rng(seed)
    prompts = rng.integers(0, vocab, size=(batch, cache_len)).tolist()
    cache, _ = batch_prefill(model, prompts, step_size=512)
    return cache


def _chains(batch: int, n: int, vocab: int, seed: int):
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, vocab, size=(batch, 1, n)).astype(np.int32)
    return pad_trees([pack_tree(r) for r in rows], list(rows))


def batch_forward_cost_curve(
    model: nn.Module,
    batch_sizes: Iterable[int],
    sizes: Iterable[int],
    *,
    cache_len: int = 256,
    repeats: int = 3,
    warmup: int = 1,
    seed: int = 0,
) -> dict[tuple[int, int], float]:
    """{(B, N): median seconds of one batched verification forward}; each B's cache is filled
    once and left as it was (a forward without a commit changes no row's length)."""
    vocab = int(embed_tokens(model).weight.shape[0])
    head = lm_head(model)
    batch_sizes = sorted({int(b) for b in batch_sizes})
    sizes = sorted({int(n) for n in sizes})
    caches = {b: filled_batch_cache(model, b, cache_len, seed + b) for b in batch_sizes}
    trees = {(b, n): _chains(b, n, vocab, seed + 1000 * b + n) for b in batch_sizes for n in sizes}
    times: dict[tuple[int, int], list[float]] = {cell: [] for cell in trees}
    for round_index in range(warmup + repeats):
        for (b, n), padded in trees.items():
            tic = time.perf_counter()
            hidden, _ = batch_verify(model, caches[b], padded)
            mx.eval(hidden, head(hidden))
            elapsed = time.perf_counter() - tic
            if round_index >= warmup:
                times[(b, n)].append(elapsed)
    return {cell: float(np.median(t)) for cell, t in times.items()}


def batch_draft_costs(
    model: nn.Module,
    drafter: Drafter,
    batch_sizes: Iterable[int],
    shapes: Iterable[tuple[int, int]],
    states: Sequence[tuple[mx.array, int]],
    *,
    repeats: int = 2,
) -> dict[tuple[int, int, int], dict[str, float]]:
    """Per (B, W, L): median seconds of one batched beam search + sync + packing + padding,
    and the mean padded tree size. B rows take the sampled states in turn (with fewer states
    than rows some repeat, so the padded size is a lower bound there)."""
    if not states:
        raise ValueError("no states to draft from: give at least one (hidden, g0) pair")
    embed = embed_tokens(model)
    out = {}
    for b in sorted({int(b) for b in batch_sizes}):
        picks = [states[i % len(states)] for i in range(b)]
        hidden = mx.stack([h for h, _ in picks])
        g0 = mx.array([g for _, g in picks], dtype=mx.int32)
        for width, length in shapes:
            drafter.beam_search_batch(hidden, g0, embed, width, length)  # warm-up
            times, padded_sizes = [], []
            for _ in range(repeats):
                tic = time.perf_counter()
                beams, _ = drafter.beam_search_batch(hidden, g0, embed, width, length)
                rows = np.array(beams)
                padded = pad_trees([pack_tree(r) for r in rows], list(rows))
                times.append(time.perf_counter() - tic)
                padded_sizes.append(padded.tokens.shape[1])
            out[(b, width, length)] = {
                "draft_s": float(np.median(times)),
                "tree_size": float(np.mean(padded_sizes)),
            }
    return out
