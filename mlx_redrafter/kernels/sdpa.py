"""The portable path: `mx.fast.scaled_dot_product_attention` with the dense tree mask.

This is what the engine has always done (the mask comes from `tree.verification_mask` through
`TreeContext`); the functions here build the same mask from the compact `parents` description,
so that the kernel and the portable path share one interface.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from ..tree import verification_mask


def parents_depths(parents: np.ndarray) -> np.ndarray:
    """Depth of every packed token (parents precede children)."""
    parents = np.asarray(parents)
    depths = np.zeros(parents.shape[0], dtype=np.int64)
    for i, p in enumerate(parents):
        if p >= i:
            raise ValueError(f"parents must precede children: token {i} has parent {p}")
        if p >= 0:
            depths[i] = depths[p] + 1
    return depths


def ancestor_closure(parents: np.ndarray) -> np.ndarray:
    """(N, N) bool: column is the row token itself or one of its ancestors."""
    n = np.asarray(parents).shape[0]
    closure = np.eye(n, dtype=bool)
    for i, p in enumerate(np.asarray(parents)):
        if p >= 0:
            closure[i] |= closure[p]
    return closure


def dense_tree_mask(parents: np.ndarray, cache_len: int, window: int | None = None) -> np.ndarray:
    """(N, cache_len + N) bool mask of a tree after a cached prefix, from `parents` alone.

    `tree.verification_mask` builds it (prefix, ancestors and window in one place); this only
    recovers the ancestor mask and depths that a `PackedTree` would carry.
    """
    parents = np.asarray(parents)
    return verification_mask(ancestor_closure(parents), parents_depths(parents), cache_len, window)


def sdpa_tree_attention(
    queries: mx.array,
    keys: mx.array,
    values: mx.array,
    parents,
    *,
    scale: float,
    window: int | None = None,
    mask: mx.array | None = None,
) -> mx.array:
    """Tree attention through MLX's SDPA and a dense boolean mask (built here unless given)."""
    if mask is None:
        tree = queries.shape[2]
        mask = mx.array(dense_tree_mask(np.array(parents), keys.shape[2] - tree, window))
    return mx.fast.scaled_dot_product_attention(queries, keys, values, scale=scale, mask=mask)
