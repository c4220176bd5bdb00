"""The seam that routes tree-verification attention to the kernel.

mlx-lm model files import `scaled_dot_product_attention` by name from `mlx_lm.models.base` and
call it as `scaled_dot_product_attention(q, k, v, cache=cache, scale=..., mask=mask)`, with the
mask the cache's `make_mask` returned. The kernel path changes two things, only while a tree is
being verified with `attention="kernel"` (`verify.verify_tree`):

- `TreeContext.mask` hands mlx-lm a `TreeMask` (the tree's `parents`, the prefix length and
  the layer's window) instead of the dense (N, S + N) boolean mask; model code passes masks
  through untouched, so it reaches the attention call;
- `route_attention` rebinds the name `scaled_dot_product_attention` in each model module used
  by the model's attention layers (e.g. `mlx_lm.models.llama`) to `tree_sdpa`, and restores the
  original when the forward has been built. `tree_sdpa` sends a `TreeMask` to the kernel (or,
  for shapes the kernel does not take, to SDPA with the dense mask) and anything else to
  mlx-lm's own function unchanged.

The graph is built inside the `with` block; MLX evaluates it later, so restoring the name
afterwards is safe. With `attention="sdpa"` nothing is patched and the dense mask is used, as
before.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx

ATTENTION_NAME = "scaled_dot_product_attention"


@dataclass(frozen=True)
class TreeMask:
    """Stands in for the dense tree mask while the kernel path verifies a tree."""

    parents: mx.array  # (N,) int32, -1 for the root
    cache_len: int
    window: int | None
    dense: Callable[[], mx.array]  # the dense boolean mask, for the fallback

    @property
    def shape(self) -> tuple[int, int]:
        n = int(self.parents.shape[0])
        return (n, self.cache_len + n)


_warned: set[str] = set()


def tree_sdpa(queries, keys, values, cache, scale, mask, sinks=None):
    """mlx-lm's attention call signature; kernel for a `TreeMask`, mlx-lm's function otherwise."""
    from mlx_lm.models import base

    if isinstance(mask, TreeMask):
        from .launch import kernel_tree_attention, unsupported_reason

        reason = "attention sinks" if sinks is not None else unsupported_reason(queries, keys)
        if reason is None:
            return kernel_tree_attention(
                queries, keys, values, mask.parents, scale=scale, window=mask.window
            )
        if reason not in _warned:
            _warned.add(reason)
            warnings.warn(
                f"tree-attention kernel unavailable ({reason}); using SDPA with the dense mask",
                RuntimeWarning,
                stacklevel=2,
            )
        mask = mask.dense()
    return base.scaled_dot_product_attention(
        queries, keys, values, cache=cache, scale=scale, mask=mask, sinks=sinks
    )


def attention_modules(model) -> list:
    """The Python modules defining the model's attention layers (where the name is bound)."""
    modules = []
    for layer in model.layers:
        module = sys.modules[type(layer.self_attn).__module__]
        if module not in modules:
            modules.append(module)
    return modules


def routable(model) -> bool:
    """Whether every attention layer calls attention through the module-level name."""
    return all(callable(getattr(m, ATTENTION_NAME, None)) for m in attention_modules(model))


@contextlib.contextmanager
def route_attention(model, enabled: bool = True):
    """While active, the model's attention modules call `tree_sdpa` (no-op when not enabled)."""
    if not enabled:
        yield
        return
    modules = attention_modules(model)
    saved = [(m, getattr(m, ATTENTION_NAME)) for m in modules]
    for m, _ in saved:
        setattr(m, ATTENTION_NAME, tree_sdpa)
    try:
        yield
    finally:
        for m, original in saved:
            setattr(m, ATTENTION_NAME, original)
