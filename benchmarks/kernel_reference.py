"""The float64 NumPy attention every tree-attention path is checked against (the tests and the
GPU script, `kernels.py`), so both judge by the same definition."""

from __future__ import annotations

import numpy as np


def reference_attention(q, k, v, mask, scale: float) -> np.ndarray:
    """softmax(q k^T * scale, masked) v in float64; GQA by repeating the KV heads.

    q (B, Hq, N, D), k/v (B, Hkv, S, D), mask broadcastable to (B, Hq, N, S), True = attend.
    Arrays may be NumPy or anything NumPy converts (MLX arrays are cast to float32 first).
    """
    q, k, v = (_float64(x) for x in (q, k, v))
    group = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    scores = np.einsum("bhnd,bhkd->bhnk", q, k) * scale
    scores = np.where(mask, scores, -np.inf)
    scores -= scores.max(axis=-1, keepdims=True)
    p = np.exp(scores)
    p /= p.sum(axis=-1, keepdims=True)
    return np.einsum("bhnk,bhkd->bhnd", p, v)


def _float64(x) -> np.ndarray:
    if hasattr(x, "astype") and not isinstance(x, np.ndarray):  # an mx.array
        import mlx.core as mx

        x = np.array(x.astype(mx.float32))
    return np.asarray(x, dtype=np.float64)
