"""What verification and drafting cost on this device: the tuner's measurements.

- `forward_cost_curve` / `time_forward`: LLM forward time over N tokens after a cache of a
  given length, through the engine's own tree verification (a chain of N tokens: the tree mask
  and per-token RoPE are in the measured path). Relative to N = 1 it decides which tree sizes
  pay on a device: on a CPU, where arithmetic bounds a forward, its cost grows quickly with N;
  on a GPU it grows slowly over small trees (BENCHMARKS.md has the curves).
- `draft_costs`: beam search of each shape (W, L) from real hidden states, with the host sync
  and tree packing the engine does, and the packed tree's mean size.

`python -m mlx_redrafter.benchmarks.cost_curve` prints them.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..cache import commit, make_tree_cache
from ..drafter import Drafter
from ..tree import pack_tree
from ..verify import embed_tokens, verify_tree

DEFAULT_SIZES = (1, 2, 4, 8, 16, 32, 64, 128)


def _vocab(model: nn.Module) -> int:
    return int(embed_tokens(model).weight.shape[0])


def filled_cache(model: nn.Module, cache_len: int, seed: int = 0, chunk: int = 512) -> list:
    """An engine KV cache holding `cache_len` random tokens."""
    cache = make_tree_cache(model)
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, _vocab(model), size=cache_len).astype(np.int32)
    for i in range(0, cache_len, chunk):
        model.model(mx.array(tokens[i : i + chunk])[None], cache=cache)
        mx.eval([c.state for c in cache])
    return cache


def _synced_forward_s(model: nn.Module, cache: list, tree, tree_tokens: mx.array) -> float:
    """Seconds of one synced verification forward; the cache is put back to its prefix."""
    cache_len = cache[0].offset
    tic = time.perf_counter()
    hidden, logits = verify_tree(model, cache, tree, tree_tokens)
    mx.eval(hidden, logits)
    elapsed = time.perf_counter() - tic
    commit(cache, cache_len, np.zeros(0, dtype=np.int64))
    return elapsed


def forward_cost_curve(
    model: nn.Module,
    sizes: Iterable[int] = DEFAULT_SIZES,
    *,
    cache_len: int = 256,
    repeats: int = 3,
    cache: list | None = None,
    warmup: int = 1,
    seed: int = 0,
) -> dict[int, float]:
    """{N: median seconds of a forward over N tokens after `cache_len` cached tokens}.

    The sizes are timed in rounds, one forward of each size per round, so that a slow phase
    of the machine (a busy neighbour, a throttled VM) lands on every size alike instead of on
    whichever size happened to be measured then: the curve's ratios are what the tuner uses.
    """
    cache = cache if cache is not None else filled_cache(model, cache_len)
    chains = {}
    for n in sorted({int(n) for n in sizes}):
        rng = np.random.default_rng(seed + n)
        tree = pack_tree(rng.integers(0, _vocab(model), size=(1, n)).astype(np.int32))
        chains[n] = (tree, mx.array(tree.tokens))
    times: dict[int, list[float]] = {n: [] for n in chains}
    for round_index in range(warmup + repeats):
        for n, (tree, tree_tokens) in chains.items():
            elapsed = _synced_forward_s(model, cache, tree, tree_tokens)
            if round_index >= warmup:
                times[n].append(elapsed)
    return {n: float(np.median(t)) for n, t in times.items()}


def time_forward(
    model: nn.Module, cache: list, n: int, *, repeats: int = 3, warmup: int = 1, seed: int = 0
) -> float:
    """Median seconds of one synced verification forward over n tokens; the cache is restored."""
    curve = forward_cost_curve(model, [n], repeats=repeats, cache=cache, warmup=warmup, seed=seed)
    return curve[int(n)]


def relative_curve(curve: dict[int, float]) -> dict[int, float]:
    """Each forward time over the 1-token one: what a tree of that size costs per token."""
    base = curve.get(1)
    return {n: t / base for n, t in curve.items()} if base else {}


def interpolate(curve: dict[int, float], n: float) -> float:
    """Forward time at n tokens, linear between measured sizes (and beyond the last two)."""
    xs = np.array(sorted(curve), dtype=np.float64)
    ys = np.array([curve[int(x)] for x in xs])
    if len(xs) == 1:
        return float(ys[0])
    if n <= xs[-1]:
        return float(np.interp(n, xs, ys))
    slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
    return float(ys[-1] + slope * (n - xs[-1]))


def sample_states(
    model: nn.Module, sequences: Sequence[Sequence[int]], count: int = 4, seed: int = 0
) -> list[tuple[mx.array, int]]:
    """(hidden, g0) pairs at random positions of the given token sequences, as the engine sees
    them: the LLM's final-normed hidden state at t and the token x_{t+1}."""
    rng = np.random.default_rng(seed)
    states = []
    for i in range(count):
        seq = list(sequences[i % len(sequences)])
        if len(seq) < 2:
            continue
        hidden = model.model(mx.array(seq)[None])[0]
        t = int(rng.integers(0, len(seq) - 1))
        states.append((hidden[t], int(seq[t + 1])))
    mx.eval([h for h, _ in states])
    return states


def draft_costs(
    model: nn.Module,
    drafter: Drafter,
    shapes: Iterable[tuple[int, int]],
    states: Sequence[tuple[mx.array, int]],
    *,
    repeats: int = 2,
) -> dict[tuple[int, int], dict[str, float]]:
    """Per shape: median seconds of beam search + host sync + packing, and mean tree size."""
    embed = embed_tokens(model)
    out = {}
    for width, length in shapes:
        times, sizes = [], []
        hidden, g0 = states[0]
        drafter.beam_search(hidden, mx.array(g0), embed, width, length)  # warm-up
        for _ in range(repeats):
            for hidden, g0 in states:
                tic = time.perf_counter()
                beams, _ = drafter.beam_search(hidden, mx.array(g0), embed, width, length)
                tree = pack_tree(np.array(beams))
                times.append(time.perf_counter() - tic)
                sizes.append(tree.size)
        out[(width, length)] = {
            "draft_s": float(np.median(times)),
            "tree_size": float(np.mean(sizes)),
        }
    return out
