"""One LLM forward over a packed token tree, on unmodified mlx-lm model code.

mlx-lm attention layers take no mask argument from outside and apply RoPE with one offset per
call (`self.rope(x, offset=cache.offset)`). Two seams make a tree forward exact:

- the KV cache builds the mask: `cache.TreeKVCache.make_mask` returns the tree's (N, S+N)
  ancestor mask while a tree is being verified (mlx-lm asks the cache for its mask), and the
  ordinary causal or windowed mask otherwise;
- each attention's `rope` module is wrapped once by `prepare_model` in a `TreeRoPE` that, while
  a tree is active, moves the N tokens onto the batch axis and gives `mx.fast.rope` one offset
  per token (cache length + depth); otherwise it calls the original module unchanged.

Both read one `TreeContext` owned by the engine's caches, set only for the duration of
`verify_tree`. Models stay usable by mlx-lm's own generation after `prepare_model`.

Kernel seam (`set_attention(model, "kernel")`, see `kernels/seam.py`): the context hands mlx-lm
a compact `TreeMask` instead of the dense mask, and for the duration of the tree forward the
name `scaled_dot_product_attention` in each attention layer's model module is rebound to a
router that sends `TreeMask` calls to the tree-attention kernel.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn

from .kernels import resolve_attention  # kernel seam
from .kernels.seam import TreeMask, routable, route_attention  # kernel seam
from .tree import PackedTree, tree_parents, verification_mask

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")


@dataclass
class TreeContext:
    """The tree being verified: per-token RoPE positions and per-window masks."""

    positions: mx.array | None = None
    tree: PackedTree | None = None
    cache_len: int = 0
    _masks: dict = field(default_factory=dict)
    # --- kernel seam (mlx_redrafter/kernels/seam.py): "sdpa" hands mlx-lm the dense mask,
    # "kernel" a compact TreeMask that the routed attention sends to the kernel.
    attention: str = "sdpa"
    _parents: mx.array | None = None
    # Batched verification (batch.py): (window -> (B, 1, N, S + N) mask), dense SDPA masks of
    # all rows' padded trees; `positions` is then (B, N). None for one sequence.
    batch_mask: Callable[[int | None], mx.array] | None = None

    @property
    def active(self) -> bool:
        return self.positions is not None

    def mask(self, window: int | None) -> mx.array | TreeMask:
        if self.batch_mask is not None:  # B rows: SDPA (the kernel takes one tree)
            if window not in self._masks:
                self._masks[window] = self.batch_mask(window)
            return self._masks[window]
        if self.attention == "kernel":  # kernel seam
            if self._parents is None:
                self._parents = mx.array(tree_parents(self.tree))
            return TreeMask(self._parents, self.cache_len, window, lambda: self.dense_mask(window))
        return self.dense_mask(window)

    def dense_mask(self, window: int | None) -> mx.array:
        if window not in self._masks:
            self._masks[window] = mx.array(
                verification_mask(self.tree.mask, self.tree.depths, self.cache_len, window)
            )
        return self._masks[window]

    def set(self, tree: PackedTree, cache_len: int) -> None:
        self.tree, self.cache_len, self._masks, self._parents = tree, cache_len, {}, None
        self.positions = mx.array(cache_len + tree.depths, dtype=mx.int32)

    def set_batch(self, positions: mx.array, batch_mask: Callable[[int | None], mx.array]) -> None:
        """B padded trees: per-token positions (B, N) and their masks by window."""
        self.positions, self.batch_mask, self._masks = positions, batch_mask, {}

    def clear(self) -> None:
        self.positions, self.tree, self._masks, self._parents = None, None, {}, None
        self.batch_mask = None


class TreeRoPE(nn.Module):
    """Per-token RoPE positions during tree verification; the original RoPE otherwise."""

    def __init__(self, rope: nn.Module, context: TreeContext):
        super().__init__()
        self.rope = rope
        self._context = context

    def __call__(self, x: mx.array, offset=0, **kwargs) -> mx.array:
        ctx = self._context
        if not ctx.active:
            return self.rope(x, offset=offset, **kwargs)
        if ctx.positions.ndim == 2:  # B rows: (B, heads, N, dim) -> (B * N, heads, 1, dim)
            b, heads, n, dim = x.shape
            moved = x.transpose(0, 2, 1, 3).reshape(b * n, heads, 1, dim)
            out = self.rope(moved, offset=ctx.positions.reshape(-1), **kwargs)
            return out.reshape(b, n, heads, dim).transpose(0, 2, 1, 3)
        # (1, heads, N, dim) -> (N, heads, 1, dim): one batch row, one offset per token.
        moved = x.transpose(2, 1, 0, 3)
        return self.rope(moved, offset=ctx.positions, **kwargs).transpose(2, 1, 0, 3)


# ------------------------------------------------------------------------ model seams
def model_type(model: nn.Module) -> str:
    return getattr(model, "model_type", None) or getattr(model.args, "model_type", "unknown")


def check_supported(model: nn.Module) -> None:
    kind = model_type(model)
    if kind not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model architecture {kind!r} is not supported by mlx_redrafter "
            f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )


def prepare_model(model: nn.Module) -> TreeContext:
    """Make `model` ready for tree verification (once) and return its tree context.

    Wraps each attention's RoPE in a `TreeRoPE` and attaches the `TreeContext` that the RoPE
    wrappers and the engine's caches share. This changes the caller's model object, so it is
    one explicit step taken where a model enters the engine (`models.load`, `generate_step`
    and `stream_generate` for models built by the caller, `models.make_prompt_cache`) and
    nowhere else: code further in asks `prepared_context`, which refuses an unprepared model
    instead of wrapping it as a side effect. Idempotent, since one model may enter by several
    of those doors; the model stays usable by mlx-lm's own generation.
    """
    check_supported(model)
    existing = getattr(model, "_redrafter_context", None)
    if existing is not None:
        return existing
    context = TreeContext()
    for layer in model.layers:
        attn = layer.self_attn
        if "rope" not in attn:
            raise ValueError(f"{model_type(model)} attention has no `rope` module to wrap")
        attn.rope = TreeRoPE(attn.rope, context)
    # A plain attribute (not a child module): stays out of parameters() and weights.
    object.__setattr__(model, "_redrafter_context", context)
    return context


def prepared_context(model: nn.Module) -> TreeContext:
    """The tree context `prepare_model` attached; a clear error for a model never prepared."""
    context = getattr(model, "_redrafter_context", None)
    if context is None:
        raise ValueError(
            "this model is not prepared for tree verification: load it with "
            "mlx_redrafter.load, or call mlx_redrafter.verify.prepare_model(model) first"
        )
    return context


def set_attention(model: nn.Module, choice: str = "auto") -> str:  # kernel seam
    """Pick verification attention for this model ("auto" | "kernel" | "sdpa"); the path used.

    "kernel" is kept only for models whose attention calls mlx-lm's module-level
    `scaled_dot_product_attention` (every supported architecture does).
    """
    context = prepared_context(model)
    path = resolve_attention(choice)
    context.attention = path if path == "sdpa" or routable(model) else "sdpa"
    return context.attention


def lm_head(model: nn.Module):
    """The model's output projection (untied head, or the tied embedding as a linear map)."""
    if "lm_head" in model:
        return model.lm_head
    return model.model.embed_tokens.as_linear


def embed_tokens(model: nn.Module) -> nn.Module:
    return model.model.embed_tokens


def context_length(model: nn.Module) -> int | None:
    return getattr(model.args, "max_position_embeddings", None)


# ------------------------------------------------------------------------ forwards
def forward(model: nn.Module, tokens: mx.array, cache: list) -> tuple[mx.array, mx.array]:
    """Causal forward of a token run; returns (hidden, logits) of its last token."""
    hidden = model.model(tokens[None], cache=cache)[0, -1:]
    return hidden, lm_head(model)(hidden)


def verify_tree(
    model: nn.Module, cache: list, tree: PackedTree, tree_tokens: mx.array
) -> tuple[mx.array, mx.array]:
    """Forward the packed tree after the cached prefix; (hidden, logits) per packed token.

    The cache grows by N entries; `cache.commit` afterwards keeps only the accepted path.
    """
    if tree.size == 1:  # a single token is an ordinary causal step
        hidden = model.model(tree_tokens[None], cache=cache)[0]
        return hidden, lm_head(model)(hidden)
    context = cache[0].tree_context
    context.set(tree, cache[0].offset)
    try:
        with route_attention(model, context.attention == "kernel"):  # kernel seam
            hidden = model.model(tree_tokens[None], cache=cache)[0]
    finally:
        context.clear()
    return hidden, lm_head(model)(hidden)
