"""The engine's KV cache: full length, tree-mask aware, and the commit of an accepted path.

After verification the cache holds the prefix plus every packed tree token; `commit` keeps only
the accepted path, gathered contiguous after the prefix (mlx-lm's `trim` can only drop a
suffix, and the accepted tokens sit at scattered packed positions).

KV-cache quantization (`kv_bits`, mlx-lm's `QuantizedKVCache` storage): a layer given a
`KVQuantization` switches to quantized storage at the start of a forward when, after the
previous forward, it held at least `start` tokens: mlx-lm's `maybe_quantize_kv_cache` switches
at the same point (it checks after each forward, so the first forward is never quantized).
Each token's key/value row is quantized on its own, so tokens quantized at the switch or on
arrival hold the same values as in mlx-lm; mlx-lm's attention reads the cache's `bits` and uses
its quantized attention, mask included. The commit gathers the packed words, scales and biases
alike. With a drafter the switch falls on a step boundary (as in mlx-lm's own speculative
decoding): a step that starts before `start` verifies its tokens past it unquantized.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.cache import KVCache, QuantizedKVCache, RotatingKVCache

from .verify import TreeContext, prepared_context

QUANTIZE_BITS = (2, 3, 4, 5, 6, 8)  # what mx.quantize takes
QUANTIZE_GROUP_SIZES = (32, 64, 128)


@dataclass(frozen=True)
class KVQuantization:
    """mlx-lm's `kv_bits`, `kv_group_size` and `quantized_kv_start`."""

    bits: int
    group_size: int = 64
    start: int = 5000


class TreeKVCache(KVCache):
    """A full-length KV cache that also supplies the tree mask during verification."""

    def __init__(self, context: TreeContext, quantization: KVQuantization | None = None):
        super().__init__()
        self._context = context
        self.quantization = quantization
        self._fed = False  # a forward has run since quantization was set (see the docstring)

    @property
    def tree_context(self) -> TreeContext:
        """The model's tree context (shared by all its caches and RoPE wrappers): while
        `verify.verify_tree` has a tree set on it, `make_mask` serves that tree's mask."""
        return self._context

    @property
    def quantized(self) -> bool:
        # `bits` and `group_size` exist only once quantized: mlx-lm's attention tests `bits`
        return "bits" in self.__dict__

    def update_and_fetch(self, keys, values):
        q = self.quantization
        if q is not None and self._fed and not self.quantized and self.offset >= q.start:
            self._quantize(q)
        self._fed = True
        if self.quantized:
            return QuantizedKVCache.update_and_fetch(self, keys, values)
        return super().update_and_fetch(keys, values)

    def keys_and_values(self):
        if self.quantized:
            return QuantizedKVCache.keys_and_values(self)
        return super().keys_and_values()

    def _quantize(self, q: KVQuantization) -> None:
        self.bits, self.group_size = q.bits, q.group_size
        if self.keys is not None:
            self.keys = mx.quantize(
                self.keys[..., : self.offset, :], group_size=q.group_size, bits=q.bits
            )
            self.values = mx.quantize(
                self.values[..., : self.offset, :], group_size=q.group_size, bits=q.bits
            )

    def make_mask(self, N: int, return_array: bool = False, window_size: int | None = None):
        if self._context.active:
            if self.quantized:  # mlx-lm's quantized attention takes dense masks only
                return self._context.dense_mask(window_size)
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
            arrays = (*self.keys, *self.values) if self.quantized else (self.keys, self.values)
            for a in arrays:  # quantized: packed words, scales and biases
                a[..., cache_len : cache_len + n, :] = a[..., idx, :]
        self.offset = cache_len + n


def make_tree_cache(
    model: nn.Module, quantization: KVQuantization | None = None
) -> list[TreeKVCache]:
    """Full-length caches for every layer, sliding-window layers included, of a model
    `verify.prepare_model` has prepared.

    The tree mask applies a layer's window itself, so one cache kind serves every layer; mlx-lm's
    rotating caches would drop keys that a rejected branch's commit gather still needs.
    """
    context = prepared_context(model)
    return [TreeKVCache(context, quantization) for _ in model.layers]


def check_kv_quantization(
    kv_bits: int | None, kv_group_size: int = 64, quantized_kv_start: int = 5000
) -> KVQuantization | None:
    """mlx-lm's KV-quantization options as a `KVQuantization` (None without kv_bits)."""
    if kv_bits is None:
        return None
    if kv_bits not in QUANTIZE_BITS:
        raise ValueError(f"kv_bits must be one of {QUANTIZE_BITS}, got {kv_bits}")
    if kv_group_size not in QUANTIZE_GROUP_SIZES:
        raise ValueError(
            f"kv_group_size must be one of {QUANTIZE_GROUP_SIZES}, got {kv_group_size}"
        )
    if quantized_kv_start < 0:
        raise ValueError(f"quantized_kv_start must be >= 0, got {quantized_kv_start}")
    return KVQuantization(kv_bits, kv_group_size, quantized_kv_start)


def set_quantization(cache: list, quantization: KVQuantization | None) -> None:
    """Give a cache the generation's KV quantization; refuse a cache made with another one."""
    if quantization is None:
        return
    for c in cache:
        if c.quantization is None and not c.quantized:
            c.quantization, c._fed = quantization, False
        elif c.quantization != quantization:
            raise ValueError(
                f"prompt_cache was made with KV quantization {c.quantization}, but this "
                f"generation asks for {quantization}"
            )


MAX_KV_SIZE_REFUSAL = (
    "max_kv_size (mlx-lm's rotating KV cache) cannot be used with tree verification: the "
    "rotating cache overwrites its oldest entries as the verified tree is appended and cannot "
    "be trimmed once full, so the rejected branches could not be removed nor the accepted path "
    "gathered. Leave it out (the cache then holds the whole context, up to the model's context "
    "length)"
)


def refuse_max_kv_size(max_kv_size: int | None, hint: str = "") -> None:
    """mlx-lm's `max_kv_size` has no tree-verification equivalent: a clear error saying why."""
    if max_kv_size is not None:
        raise ValueError(MAX_KV_SIZE_REFUSAL + hint)


def check_cache(cache: list) -> None:
    for c in cache:
        if isinstance(c, QuantizedKVCache):
            raise ValueError(
                "prompt_cache holds mlx-lm QuantizedKVCache layers; use "
                "mlx_redrafter.make_prompt_cache(model) and pass kv_bits to the generation"
            )
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


def copy_prefix(cache: list[TreeKVCache], length: int) -> list[TreeKVCache]:
    """A new cache holding the first `length` tokens of `cache`, which stays as it was.

    The copy's arrays are slices of the original's; its first update concatenates them into
    buffers of its own (mlx-lm's cache grows that way), so neither cache ever writes into the
    other's memory.
    """
    copies = []
    for layer in cache:
        if layer.offset < length:
            raise ValueError(f"cache layer holds {layer.offset} tokens, fewer than {length}")
        copy = TreeKVCache(layer._context, layer.quantization)
        copy._fed = layer._fed
        if layer.keys is not None and length > 0:
            cut = lambda a: a[..., :length, :]
            if layer.quantized:
                copy.bits, copy.group_size = layer.bits, layer.group_size
                copy.keys = tuple(cut(a) for a in layer.keys)
                copy.values = tuple(cut(a) for a in layer.values)
            else:
                copy.keys, copy.values = cut(layer.keys), cut(layer.values)
            copy.offset = length
        copies.append(copy)
    return copies


def cache_nbytes(cache: list[TreeKVCache]) -> int:
    """Bytes the cache's arrays hold (their allocated length, not only the used part)."""
    total = 0
    for layer in cache:
        for arrays in (layer.keys, layer.values):
            if arrays is None:
                continue
            for a in arrays if isinstance(arrays, tuple) else (arrays,):
                total += a.nbytes
    return total


def commit(cache: list[TreeKVCache], cache_len: int, path: np.ndarray) -> None:
    for c in cache:
        c.commit(cache_len, path)
