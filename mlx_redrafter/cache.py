"""The engine's KV cache: full length, tree-mask aware, and the commit of an accepted path.

After verification the cache holds the prefix plus every packed tree token; `commit` keeps only
the accepted path, gathered contiguous after the prefix (mlx-lm's `trim` can only drop a
suffix, and the accepted tokens sit at scattered packed positions).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.cache import KVCache, QuantizedKVCache, RotatingKVCache

from .verify import TreeContext, prepare_model


class TreeKVCache(KVCache):
    """A full-length KV cache that also supplies the tree mask during verification."""

    def __init__(self, context: TreeContext):
        super().__init__()
        self._context = context

    def make_mask(self, N: int, return_array: bool = False, window_size: int | None = None):
        if self._context.active:
            return self._context.mask(window_size)
        return super().make_mask(N, return_array=return_array, window_size=window_size)

    def commit(self, cache_len: int, path: np.ndarray) -> None:
        """Keep the accepted path (packed indices, increasing) right after the prefix.

        Packed ancestors precede descendants, so a path that is 0, 1, ..., n already sits in
        place and only the length moves; otherwise its keys/values are gathered contiguous.
        """
        n = int(path.shape[0])
        if not np.array_equal(path, np.arange(n)):
            idx = mx.array(cache_len + path.astype(np.int32))
            self.keys[..., cache_len : cache_len + n, :] = self.keys[..., idx, :]
            self.values[..., cache_len : cache_len + n, :] = self.values[..., idx, :]
        self.offset = cache_len + n


def make_tree_cache(model: nn.Module) -> list[TreeKVCache]:
    """Full-length caches for every layer, sliding-window layers included.

    The tree mask applies a layer's window itself, so one cache kind serves every layer; mlx-lm's
    rotating caches would drop keys that a rejected branch's commit gather still needs.
    """
    context = prepare_model(model)
    return [TreeKVCache(context) for _ in model.layers]


def check_cache(cache: list) -> None:
    for c in cache:
        if isinstance(c, QuantizedKVCache) or hasattr(c, "bits"):
            raise ValueError("quantized KV caches (kv_bits) are not supported by mlx_redrafter yet")
        if isinstance(c, RotatingKVCache):
            raise ValueError(
                "rotating KV caches (max_kv_size / sliding-window caches) are not supported: "
                "use mlx_redrafter.make_prompt_cache(model)"
            )
        if not isinstance(c, TreeKVCache):
            raise ValueError(
                f"prompt_cache holds a {type(c).__name__}; "
                "use mlx_redrafter.make_prompt_cache(model)"
            )


def commit(cache: list[TreeKVCache], cache_len: int, path: np.ndarray) -> None:
    for c in cache:
        c.commit(cache_len, path)
