"""The drafter a training run starts from: a new one (shape, draft vocabulary, head) or a
trained one to continue."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..drafter import Drafter, DrafterConfig, check_drafter
from ..verify import embed_tokens
from .config import TrainConfig


def frequent_tokens(sequences: Sequence[Sequence[int]], n: int, always: Sequence[int] = ()):
    """The n most frequent token ids (ties by id), with `always` ids forced in."""
    counts = np.bincount(np.concatenate([np.asarray(s, np.int64) for s in sequences]))
    forced = [t for t in dict.fromkeys(always) if t < 1 << 31]
    order = np.lexsort((np.arange(len(counts)), -counts))
    chosen = list(forced) + [int(t) for t in order if counts[t] > 0 and t not in set(forced)]
    return np.array(sorted(chosen[:n]), dtype=np.int32)


def new_drafter(model: nn.Module, cfg: TrainConfig, vocab_ids: np.ndarray | None) -> Drafter:
    embed = embed_tokens(model)
    vocab = int(embed.weight.shape[0])
    hidden = int(model.model.norm.weight.shape[0])
    config = DrafterConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        exit_dim=cfg.exit_dim,
        num_draft_layers=cfg.num_draft_layers,
        draft_vocab_size=None if vocab_ids is None else len(vocab_ids),
    )
    mx.random.seed(cfg.seed)
    drafter = Drafter(config)
    if vocab_ids is not None:
        drafter.draft_vocab_ids = mx.array(vocab_ids, dtype=mx.int32)
    if cfg.init_head_from_llm and config.exit_dim == hidden:
        output = llm_output_embedding(model)
        if output is not None:
            rows = output if vocab_ids is None else output[mx.array(vocab_ids)]
            # a copy: the LLM's own array must stay a frozen constant of the training graph
            drafter.lm_head[-1].weight = mx.array(np.array(rows.astype(mx.float32))).astype(
                drafter.lm_head[-1].weight.dtype
            )
    mx.eval(drafter.parameters())
    return drafter


def warm_start_drafter(model: nn.Module, path: str | Path) -> Drafter:
    """A trained drafter to continue from, in float32 (shipped drafters are float16).

    Its shape and draft vocabulary are kept: new data refines it instead of starting over,
    which costs one pass over the data instead of several.
    """
    drafter = Drafter.from_pretrained(path)
    check_drafter(model, drafter)
    drafter.set_dtype(mx.float32)
    drafter.config.torch_dtype = "float32"
    mx.eval(drafter.parameters())
    return drafter


def llm_output_embedding(model: nn.Module) -> mx.array | None:
    """The LLM's output projection [V, H] as floats (None for quantized heads).

    A drafter whose exit_dim equals the LLM's hidden size can start its vocabulary projection
    from it: the token geometry is what data-starved training learns slowest.
    """
    head = model.lm_head if "lm_head" in model else model.model.embed_tokens
    if not isinstance(head, (nn.Linear, nn.Embedding)) or hasattr(head, "scales"):
        return None
    return head.weight
