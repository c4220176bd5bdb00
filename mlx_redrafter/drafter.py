"""The recurrent draft head: config, weights, RNN step, and beam search.

Checkpoint-compatible with the ReDrafter reference (`config.json` + `model.safetensors`, torch
`[out, in]` weight layout): see docs/DESIGN.md section 2. The drafter owns no token embedding;
it reads the LLM's own `embed_tokens`, passed to each call, so it shares the LLM's weights (and
their quantization) instead of storing a copy.

Optional extension (not in the reference layout): a reduced draft vocabulary. The head then
predicts `draft_vocab_size` tokens and `draft_vocab_ids` (int32, [N]) maps them back to LLM ids.

Reference checkpoints load as they are (`from_reference_weights`): one trained with `rnn: false`
stores no `rnn_u`/`rnn_w` (its state update is additive), and `Drafter` holds them as zeros that
are never read; an `emb_norm.weight` (the reference MLX port's `emb_norm: true` configs) is
dropped, because the reference forward never applies it (its MLX port declares the RMSNorm only
so that the trainer's checkpoints load, and its comment says it does not improve quality).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .verify import embed_tokens

MODEL_TYPE = "recurrent_drafting_drafter"
TOP_K_WARP = 50
NEG_FILL = -50000.0
MAX_BEAM_WIDTH = 50
RNN_KEYS = ("rnn_u.weight", "rnn_u.bias", "rnn_w.weight")
# Stored by some reference checkpoints, never used by the reference forward (see above).
UNUSED_REFERENCE_KEYS = ("emb_norm.weight",)
UNUSED_REFERENCE_CONFIG = ("emb_norm", "rms_norm_eps")


@dataclass
class DrafterConfig:
    vocab_size: int
    hidden_size: int
    exit_dim: int | None = None
    num_draft_layers: int = 2
    num_lookback_tokens: int = 1
    rnn: bool = True
    torch_dtype: str = "float32"
    model_type: str = MODEL_TYPE
    draft_vocab_size: int | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.exit_dim is None:
            self.exit_dim = 2 * self.hidden_size
        if self.model_type != MODEL_TYPE:
            raise ValueError(
                f"drafter config has model_type {self.model_type!r}, expected {MODEL_TYPE!r}"
            )
        for name in ("vocab_size", "hidden_size", "exit_dim"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"drafter config: {name} must be positive")
        if self.num_draft_layers < 0:
            raise ValueError("drafter config: num_draft_layers must be >= 0")
        if self.draft_vocab_size is not None and not 1 <= self.draft_vocab_size <= self.vocab_size:
            raise ValueError(
                f"drafter config: draft_vocab_size {self.draft_vocab_size} must lie in "
                f"[1, vocab_size={self.vocab_size}]"
            )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DrafterConfig:
        known = {k for k in cls.__dataclass_fields__ if k != "extra"}
        missing = [k for k in ("vocab_size", "hidden_size") if k not in d]
        if missing:
            raise ValueError(f"drafter config is missing {', '.join(missing)}")
        if d.get("model_type", MODEL_TYPE) != MODEL_TYPE:
            raise ValueError(
                f"unknown drafter model_type {d.get('model_type')!r} (expected {MODEL_TYPE!r})"
            )
        kwargs = {k: v for k, v in d.items() if k in known}
        extra = {k: v for k, v in d.items() if k not in known and k not in UNUSED_REFERENCE_CONFIG}
        return cls(**kwargs, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        extra = d.pop("extra")
        if d["draft_vocab_size"] is None:
            d.pop("draft_vocab_size")
        return {**extra, **d}

    @property
    def head_vocab_size(self) -> int:
        return self.draft_vocab_size or self.vocab_size

    @property
    def has_input_proj(self) -> bool:
        return self.exit_dim != 2 * self.hidden_size


class ResBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, dim)

    def __call__(self, x: mx.array) -> mx.array:
        return x + nn.silu(self.linear(x))


class Drafter(nn.Module):
    def __init__(self, config: DrafterConfig):
        super().__init__()
        self.config = config
        h, e = config.hidden_size, config.exit_dim
        if config.has_input_proj:
            self.input_proj = nn.Linear(2 * h, e)
        self.lm_head = [ResBlock(e) for _ in range(config.num_draft_layers)] + [
            nn.Linear(e, config.head_vocab_size, bias=False)
        ]
        self.rnn_u = nn.Linear(h, h)
        self.rnn_w = nn.Linear(h, h, bias=False)
        if config.draft_vocab_size is not None:
            self.draft_vocab_ids = mx.arange(config.draft_vocab_size, dtype=mx.int32)
            self.freeze(keys=["draft_vocab_ids"], recurse=False)  # a map, not a weight

    # ---------------------------------------------------------------- math
    def rnn_step(self, state: mx.array, token_embedding: mx.array) -> mx.array:
        """s_t = silu(W e_{t-1} + U s_{t-1}); the additive form when `rnn` is false."""
        if self.config.rnn:
            return nn.silu(self.rnn_w(token_embedding) + self.rnn_u(state))
        return token_embedding + state

    def head_logits(self, hidden: mx.array, state: mx.array) -> mx.array:
        """Raw head logits over the draft vocabulary from [h, s]."""
        x = mx.concatenate([hidden, state], axis=-1)
        if self.config.has_input_proj:
            x = self.input_proj(x)
        for layer in self.lm_head:
            x = layer(x)
        return x

    def draft_log_probs(self, hidden: mx.array, state: mx.array) -> mx.array:
        """Log-probs used by beam search: max-shift, top-50 warp, log_softmax."""
        logits = self.head_logits(hidden, state).astype(mx.float32)
        return warp_log_softmax(logits)

    def to_llm_ids(self, draft_ids: mx.array) -> mx.array:
        if self.config.draft_vocab_size is None:
            return draft_ids
        return self.draft_vocab_ids[draft_ids]

    def full_vocab_log_probs(self, log_probs: mx.array) -> mx.array:
        """Scatter draft-vocabulary log-probs into the LLM vocabulary (-inf elsewhere)."""
        if self.config.draft_vocab_size is None:
            return log_probs
        full = mx.full(
            (*log_probs.shape[:-1], self.config.vocab_size), -mx.inf, dtype=log_probs.dtype
        )
        return _scatter_last(full, self.draft_vocab_ids, log_probs)

    # ---------------------------------------------------------------- search
    def beam_search(
        self,
        hidden: mx.array,
        first_token: mx.array,
        embed_tokens: nn.Module,
        beam_width: int,
        beam_length: int,
    ) -> tuple[mx.array, mx.array]:
        """Beam search of W beams, each L tokens long counting `first_token` (g0).

        `hidden` is the LLM's final-normed hidden state at the token that produced g0, shape
        (H,) or (1, H). Returns beams (W, L) int32 of LLM token ids, sorted by score, and the
        drafter's log-probs at each drafted position (W, L-1, V_draft), lazily: they cost
        nothing unless acceptance uses them.
        """
        beams, log_probs = self.beam_search_batch(
            hidden.reshape(1, -1), first_token.reshape(1), embed_tokens, beam_width, beam_length
        )
        return beams[0], log_probs[0]

    def beam_search_batch(
        self,
        hidden: mx.array,
        first_tokens: mx.array,
        embed_tokens: nn.Module,
        beam_width: int,
        beam_length: int,
    ) -> tuple[mx.array, mx.array]:
        """Independent beam searches for B (hidden (B, H), g0 (B,)) pairs at once.

        Offline evaluation drafts from every position of a sequence in one call; the engine
        uses B = 1. Returns beams (B, W, L) and log-probs (B, W, L-1, V_draft).
        """
        *_, (tokens, history) = self.beam_steps(
            hidden, first_tokens, embed_tokens, beam_width, beam_length
        )
        return tokens, mx.stack(history, axis=2)

    def beam_steps(
        self,
        hidden: mx.array,
        first_tokens: mx.array,
        embed_tokens: nn.Module,
        beam_width: int,
        beam_length: int,
    ):
        """Yield (beams (B, W, k+1), per-depth log-probs list) after each of the L-1 steps.

        A step never looks at L, so the beams after k steps are exactly the beams of a search
        of length k+1: one search of the longest length serves a sweep over lengths.
        """
        check_beam_shape(beam_width, beam_length)
        batch, w = hidden.shape[0], beam_width
        h = mx.broadcast_to(hidden[:, None, :], (batch, w, hidden.shape[-1]))
        state = mx.zeros((batch, w, self.config.hidden_size), dtype=h.dtype)
        tokens = mx.broadcast_to(first_tokens.astype(mx.int32)[:, None, None], (batch, w, 1))
        scores = mx.broadcast_to(
            mx.concatenate([mx.zeros((1,), mx.float32), mx.full((w - 1,), NEG_FILL, mx.float32)]),
            (batch, w),
        )
        history: list[mx.array] = []
        for _ in range(beam_length - 1):
            state = self.rnn_step(state, embed_tokens(tokens[..., -1]))
            logits = self.head_logits(h, state).astype(mx.float32)
            # Only a row's top-k tokens have finite warped log-probs, and W <= k, so the next
            # beams come from the W x k candidates: the search never touches the other V - k
            # entries (no sort over the whole vocabulary per beam step). The full warped log-probs
            # (`draft_log_probs`) stay lazy, for the acceptance rule that reads them.
            candidates, candidate_log_probs = top_k_log_probs(logits, max(TOP_K_WARP, w))
            k = candidates.shape[-1]
            total = (scores[..., None] + candidate_log_probs).reshape(batch, w * k)
            best = top_indices(total, w)
            parent = best // k
            draft_ids = mx.take_along_axis(candidates.reshape(batch, w * k), best, axis=-1)
            scores = mx.take_along_axis(total, best, axis=-1)
            log_probs = warp_log_softmax(logits)
            tokens = mx.concatenate(
                [_gather_beams(tokens, parent), self.to_llm_ids(draft_ids)[..., None]], axis=-1
            )
            state = _gather_beams(state, parent)
            history = [_gather_beams(lp, parent) for lp in history]
            history.append(_gather_beams(log_probs, parent))
            yield tokens, history

    # ---------------------------------------------------------------- io
    @classmethod
    def from_pretrained(cls, path: str | Path) -> Drafter:
        path = Path(path)
        config_file = path / "config.json"
        weights_file = path / "model.safetensors"
        for f in (config_file, weights_file):
            if not f.is_file():
                raise FileNotFoundError(f"drafter folder {path} has no {f.name}")
        try:
            raw = json.loads(config_file.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{config_file} is not valid JSON: {e}") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{config_file} does not hold a JSON object")
        config = DrafterConfig.from_dict(raw)
        try:
            weights = mx.load(str(weights_file))
        except Exception as e:  # MLX raises RuntimeError/ValueError for bad files
            raise ValueError(f"cannot read {weights_file} (truncated or corrupt?): {e}") from None
        weights = from_reference_weights(config, weights, rnn_in_config="rnn" in raw)
        drafter = cls(config)
        drafter.load_checked_weights(weights, source=str(weights_file))
        return drafter

    def load_checked_weights(self, weights: dict[str, mx.array], source: str = "weights") -> None:
        """Load weights after checking keys and shapes, naming any mismatch."""
        expected = dict(tree_flatten(self.parameters()))
        missing = sorted(set(expected) - set(weights))
        extra = sorted(set(weights) - set(expected))
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"missing keys {missing}")
            if extra:
                parts.append(f"unexpected keys {extra}")
            raise ValueError(f"{source}: " + "; ".join(parts))
        for key, value in weights.items():
            if tuple(value.shape) != tuple(expected[key].shape):
                raise ValueError(
                    f"{source}: {key} has shape {tuple(value.shape)}, "
                    f"expected {tuple(expected[key].shape)}"
                )
        cast = {}
        for key, value in weights.items():
            target = expected[key].dtype
            cast[key] = value if value.dtype == target else value.astype(target)
        self.load_weights(list(cast.items()))
        mx.eval(self.parameters())

    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        weights = dict(tree_flatten(self.parameters()))
        mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "mlx"})
        (path / "config.json").write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")


# -------------------------------------------------------------------- helpers
def from_reference_weights(
    config: DrafterConfig, weights: dict[str, mx.array], *, rnn_in_config: bool = True
) -> dict[str, mx.array]:
    """A reference checkpoint's weights as `Drafter` holds them (see the module docstring).

    Drops the unused `emb_norm.weight`; for an `rnn: false` drafter without `rnn_*` weights,
    adds zeros in their place. A config without `rnn` (the reference's default is false) takes
    it from the weights: `config.rnn` is set to whether `rnn_w.weight` is stored.
    """
    weights = {k: v for k, v in weights.items() if k not in UNUSED_REFERENCE_KEYS}
    if not rnn_in_config:
        config.rnn = "rnn_w.weight" in weights
    if not config.rnn and not any(k in weights for k in RNN_KEYS):
        h = config.hidden_size
        weights["rnn_u.weight"] = mx.zeros((h, h))
        weights["rnn_u.bias"] = mx.zeros((h,))
        weights["rnn_w.weight"] = mx.zeros((h, h))
    return weights


def check_beam_shape(beam_width: int | str, beam_length: int | str) -> None:
    """Names a bad beam shape; an axis given as 'auto' is left to the tuner, so a fixed axis is
    checked before any model loads or tuning starts."""
    if beam_width != "auto" and not 1 <= beam_width <= MAX_BEAM_WIDTH:
        raise ValueError(f"beam_width must be in [1, {MAX_BEAM_WIDTH}], got {beam_width}")
    if beam_length != "auto" and beam_length < 2:
        raise ValueError(f"beam_length must be >= 2 (it counts the first token), got {beam_length}")


def check_drafter(model: nn.Module, drafter: Drafter) -> None:
    """The drafter must read this model's hidden states and propose this model's token ids.

    Checked wherever a drafter meets a model (loading, `generate_step`, the converter, a warm
    start), so a mismatch is named before it turns into a shape error deep in a forward.
    """
    embed = embed_tokens(model)
    vocab = int(embed.weight.shape[0])
    hidden = model.model.norm.weight.shape[0] if "norm" in model.model else None
    cfg = drafter.config
    if hidden is not None and cfg.hidden_size != hidden:
        raise ValueError(
            f"drafter hidden_size {cfg.hidden_size} does not match the model's hidden size {hidden}"
        )
    if cfg.draft_vocab_size is None:
        if cfg.vocab_size != vocab:
            raise ValueError(
                f"drafter vocab_size {cfg.vocab_size} does not match the model's vocabulary "
                f"of {vocab} tokens"
            )
    else:
        top = int(drafter.draft_vocab_ids.max().item())
        if top >= vocab or cfg.vocab_size != vocab:
            raise ValueError(
                f"drafter vocabulary map (vocab_size {cfg.vocab_size}, largest id {top}) does not "
                f"fit the model's vocabulary of {vocab} tokens"
            )


def beam_arg(value: str) -> int | str:
    """argparse type of --beam-width / --beam-length: a positive integer, or 'auto' (tuned)."""
    if value == "auto":
        return value
    number = int(value) if value.strip().lstrip("+").isdigit() else 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {value!r}")
    return number


def warp_log_softmax(logits: mx.array, top_k: int = TOP_K_WARP) -> mx.array:
    """Shift by the row max, keep the top-k (others -> -50000), then log_softmax."""
    logits = logits - logits.max(axis=-1, keepdims=True)
    k = min(top_k, logits.shape[-1])
    kth = mx.topk(logits, k, axis=-1).min(axis=-1, keepdims=True)
    logits = mx.where(logits < kth, NEG_FILL, logits)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def top_k_log_probs(logits: mx.array, top_k: int = TOP_K_WARP) -> tuple[mx.array, mx.array]:
    """The top-k token ids of each row (any order) and their warped log-probs.

    Equal to `warp_log_softmax` at those ids (the tokens outside the top-k add exp(-50000) = 0 to
    the normaliser) unless logits tie at the k-th value, where the warp keeps every tied token.
    """
    k = min(top_k, logits.shape[-1])
    ids = mx.argpartition(-logits, kth=k - 1, axis=-1)[..., :k]
    values = mx.take_along_axis(logits, ids, axis=-1)
    return ids.astype(mx.int32), values - mx.logsumexp(values, axis=-1, keepdims=True)


def top_indices(x: mx.array, k: int) -> mx.array:
    """Indices of the k largest entries along the last axis, largest first."""
    if k == 1:
        return mx.argmax(x, axis=-1, keepdims=True)
    part = mx.argpartition(-x, kth=k - 1, axis=-1)[..., :k]
    order = mx.argsort(-mx.take_along_axis(x, part, axis=-1), axis=-1)
    return mx.take_along_axis(part, order, axis=-1)


def _gather_beams(x: mx.array, parent: mx.array) -> mx.array:
    """x (B, W, ...) reordered along the beam axis by parent (B, W)."""
    index = parent.reshape(*parent.shape, *([1] * (x.ndim - 2)))
    return mx.take_along_axis(x, index, axis=1)


def _scatter_last(full: mx.array, ids: mx.array, values: mx.array) -> mx.array:
    lead = values.shape[:-1]
    flat_full = full.reshape(-1, full.shape[-1])
    flat_values = values.reshape(-1, values.shape[-1])
    flat_full[:, ids] = flat_values
    return flat_full.reshape(*lead, full.shape[-1])
