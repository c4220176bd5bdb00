"""A reduced-draft-vocabulary drafter rewritten as a full-vocabulary one with the same beams.

The reference layout (PyTorch / TensorRT-LLM, Apple's ml-recurrent-drafter) has no id map: its
head is a bias-free `Linear(exit_dim, vocab_size)` whose row i scores LLM token i, and beam search
warps the logits (shift by the row max, keep the top 50, the rest -> -50000) before log_softmax.
Our reduced drafter scores only its N draft tokens; every other token is impossible (-inf).

Zero rows for the other tokens would not do: a logit of 0 can beat the draft tokens (logits are
often negative), and the head has no bias to push them down. So the export adds one constant
feature: `exit_dim` grows by one dimension that `input_proj` sets to 1 (weights 0, bias 1) and
every residual block passes through unchanged (x + silu(0 . x + 0) = x). Each head row of a draft
token is its old row with 0 on that feature, so its logit is unchanged; every other row is 0
except -50000 on it, so those tokens score -50000, below any draft token's logit. After the
reference's max shift and top-50 warp the draft tokens keep their log-probs and the others sit at
about -50000 (probability exp(-50000) = 0), exactly as the reference treats tokens outside its
top 50: for any beam width up to N the beams are the reduced drafter's own (to float rounding;
the added terms are exact zeros).

A drafter without `input_proj` (exit_dim = 2 * hidden) gets one: the identity plus the constant
row. If exit_dim + 1 would equal 2 * hidden (where the reference builds no `input_proj`), a second,
all-zero dimension is added. The exported head holds vocab_size x (exit_dim + 1) weights.
"""

from __future__ import annotations

import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_redrafter.drafter import Drafter, DrafterConfig

from .errors import ConversionError

OTHER_TOKEN_LOGIT = -50000.0  # the reference warp's own fill value


def padded_exit_dim(config: DrafterConfig) -> int:
    """exit_dim + 1, or + 2 where + 1 would make the reference drop `input_proj`."""
    exit_dim = config.exit_dim + 1
    return exit_dim + 1 if exit_dim == 2 * config.hidden_size else exit_dim


def expand_to_full_vocabulary(drafter: Drafter) -> Drafter:
    """The full-vocabulary drafter with `drafter`'s beams (see the module docstring)."""
    c = drafter.config
    if c.draft_vocab_size is None:
        return drafter
    ids = drafter.draft_vocab_ids.tolist()
    if len(set(ids)) != len(ids) or not all(0 <= i < c.vocab_size for i in ids):
        raise ConversionError(
            "draft_vocab_ids must be distinct LLM token ids below vocab_size to expand the head"
        )
    old = dict(tree_flatten(drafter.parameters()))
    dtype = old[f"lm_head.{c.num_draft_layers}.weight"].dtype
    e, h = c.exit_dim, c.hidden_size
    new_e = padded_exit_dim(c)
    pad = new_e - e
    config = DrafterConfig(
        vocab_size=c.vocab_size,
        hidden_size=h,
        exit_dim=new_e,
        num_draft_layers=c.num_draft_layers,
        num_lookback_tokens=c.num_lookback_tokens,
        rnn=c.rnn,
        torch_dtype=c.torch_dtype,
        extra=dict(c.extra),
    )
    constant = mx.concatenate([mx.ones((1,), dtype), mx.zeros((pad - 1,), dtype)])
    if c.has_input_proj:
        proj_w, proj_b = old["input_proj.weight"], old["input_proj.bias"]
    else:  # the reference builds input_proj whenever exit_dim != 2 * hidden: the identity
        proj_w, proj_b = mx.eye(2 * h, dtype=dtype), mx.zeros((2 * h,), dtype)
    weights = {
        "input_proj.weight": mx.concatenate([proj_w, mx.zeros((pad, 2 * h), dtype)], axis=0),
        "input_proj.bias": mx.concatenate([proj_b, constant]),
    }
    for i in range(c.num_draft_layers):
        w, b = old[f"lm_head.{i}.linear.weight"], old[f"lm_head.{i}.linear.bias"]
        weights[f"lm_head.{i}.linear.weight"] = mx.pad(w, [(0, pad), (0, pad)])
        weights[f"lm_head.{i}.linear.bias"] = mx.pad(b, [(0, pad)])
    head = old[f"lm_head.{c.num_draft_layers}.weight"]
    other_row = mx.zeros((1, new_e), dtype)
    other_row[0, e] = OTHER_TOKEN_LOGIT
    full = mx.tile(other_row, (c.vocab_size, 1))
    full[drafter.draft_vocab_ids] = mx.pad(head, [(0, 0), (0, pad)])
    weights[f"lm_head.{c.num_draft_layers}.weight"] = full
    for key in ("rnn_u.weight", "rnn_u.bias", "rnn_w.weight"):
        weights[key] = old[key]
    expanded = Drafter(config)
    expanded.set_dtype(dtype)
    expanded.load_checked_weights(weights, source="the expanded drafter")
    return expanded
