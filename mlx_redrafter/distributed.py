"""Running sharded: the LLM split over several processes with mlx-lm's tensor parallelism.

`mlx.launch -n N --backend ring ...` starts N processes (ranks) that form one
`mx.distributed` group. The LLM is sharded with mlx-lm's own `model.shard(group)` (attention
heads and MLP columns split over the ranks, two all-reduces per layer); the drafter is small
and replicated on every rank. No transport of our own: every byte between ranks is an MLX
collective.

The one rule that keeps the ranks from hanging: every rank must run the same sequence of
collectives, so every rank must take the same decisions. Greedy acceptance follows from the
all-reduced states, which are bitwise equal on every rank (a ring all-reduce gathers each
reduced chunk from one rank). What comes from the host - the speculation shape, the guard's
per-step mode, the sampling seed, the prompt - is decided on rank 0 and broadcast
(`broadcast_ints`, `broadcast_tokens`); the drafter is checked to be the same on every rank
(`check_same_drafter`).

The group lives on the model (`attach_group`/`model_group`): `models.load` sets it for a
sharded model, and the engine reads it from there, so `generate_step`, `stream_generate`, the
CLIs and the server need no extra argument.
"""

from __future__ import annotations

import hashlib

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .verify import SUPPORTED_MODEL_TYPES, model_type

_GROUP_ATTR = "_redrafter_group"


def init_group() -> mx.distributed.Group:
    """The process's group (size 1 when not started by `mlx.launch`)."""
    return mx.distributed.init()


def model_group(model: nn.Module) -> mx.distributed.Group | None:
    """The group a sharded model runs in; None for a model on one process."""
    return getattr(model, _GROUP_ATTR, None)


def attach_group(model: nn.Module, group: mx.distributed.Group) -> None:
    # A plain attribute (not a child module), as `verify.prepare_model`'s context.
    object.__setattr__(model, _GROUP_ATTR, group)


def is_rank0(model: nn.Module) -> bool:
    group = model_group(model)
    return group is None or group.rank() == 0


# ------------------------------------------------------------------------ sharding
def shardable_model_types() -> tuple[str, ...]:
    """Architectures both the engine verifies and mlx-lm shards (mlx-lm's `shard` method)."""
    from mlx_lm.utils import _get_classes

    kinds = []
    for kind in SUPPORTED_MODEL_TYPES:
        try:
            model_class, _ = _get_classes({"model_type": kind})
        except ValueError:
            continue
        if hasattr(model_class, "shard"):
            kinds.append(kind)
    return tuple(kinds)


def check_shardable(model: nn.Module, group: mx.distributed.Group) -> None:
    """Refuse, by name, a model that mlx-lm's tensor-parallel `shard` would split wrongly.

    mlx-lm's `shard_linear` checks only that each projection's output splits evenly; a head
    count that does not divide by the group size (SmolLM2's 9 heads and 3 KV heads over 2
    ranks) would give each rank a slice that cuts through a head, and a model that computes
    nonsense. So the head counts, the KV head counts and the MLP width are checked here, before
    any weight is split.
    """
    kind = model_type(model)
    size = group.size()
    if not hasattr(model, "shard"):
        raise ValueError(
            f"model architecture {kind!r} cannot be sharded: mlx-lm has no tensor-parallel "
            f"`shard` for it (shardable: {', '.join(shardable_model_types())}); run it on one "
            "machine"
        )
    args = model.args
    attn = model.layers[0].self_attn
    heads = getattr(attn, "n_heads", None) or args.num_attention_heads
    kv_heads = getattr(attn, "n_kv_heads", None) or args.num_key_value_heads or heads
    problems = [
        f"{what} {count}"
        for what, count in (
            ("attention heads", heads),
            ("KV heads", kv_heads),
            ("MLP width (intermediate_size)", getattr(args, "intermediate_size", size)),
        )
        if count % size
    ]
    if problems:
        divisors = [n for n in range(2, heads + 1) if heads % n == 0 and kv_heads % n == 0]
        raise ValueError(
            f"{kind} model with {heads} attention heads and {kv_heads} KV heads cannot be "
            f"sharded over {size} ranks: {' and '.join(problems)} not divisible by {size} "
            f"(group sizes that divide the heads: {divisors or 'none'})"
        )


def shard_model(model: nn.Module, group: mx.distributed.Group) -> nn.Module:
    """Check, then split the model over the group with mlx-lm's own `model.shard(group)`.

    Call it on a lazily loaded model (`mlx_lm.load(..., lazy=True)`): the parameters are
    evaluated after sharding, so each rank reads only its slice into memory. A group of one
    leaves the model whole.
    """
    if group.size() > 1:
        check_shardable(model, group)
        model.shard(group)
        attach_group(model, group)
    mx.eval(model.parameters())
    return model


# ------------------------------------------------------------------------ agreement
def settle() -> None:
    """Wait for every stream's queued work before a collective of our own.

    Ring collectives pair up by order, and order holds only within one stream. mlx-lm decodes
    on a stream of its own (`generation_stream`) and queues a forward ahead (`async_eval`),
    whose all-reduces may still be running when ours starts on another stream; one rank would
    then sum our integers with the other's activations. Every rank has queued the same work,
    so waiting for all of it restores one order. Costs nothing where the caller syncs anyway.
    (`mx.synchronize()` alone waits for the default stream only.)
    """
    from mlx_lm.generate import generation_stream

    mx.synchronize(generation_stream)
    mx.synchronize()


def broadcast_ints(values: list[int], group: mx.distributed.Group | None) -> list[int]:
    """Rank 0's small integers on every rank (an all-sum with zeros off rank 0).

    One collective and one host sync; values must fit in int32 (seeds, modes, W, L, N).
    """
    if group is None or group.size() == 1:
        return [int(v) for v in values]
    settle()
    local = mx.array(values if group.rank() == 0 else [0] * len(values), dtype=mx.int32)
    return [int(v) for v in mx.distributed.all_sum(local, group=group, stream=mx.cpu).tolist()]


def broadcast_tokens(tokens: list[int] | None, group: mx.distributed.Group | None) -> list[int]:
    """Rank 0's token ids on every rank (two collectives: the length, then the ids); other
    ranks may pass None."""
    if group is None or group.size() == 1:
        return list(tokens or [])
    mine = list(tokens or []) if group.rank() == 0 else []
    (n,) = broadcast_ints([len(mine)], group)
    if n == 0:
        return []
    settle()
    local = mx.array(mine if group.rank() == 0 else [0] * n, dtype=mx.int32)
    return [int(t) for t in mx.distributed.all_sum(local, group=group, stream=mx.cpu).tolist()]


def all_agree(text: str, group: mx.distributed.Group | None) -> bool:
    """Whether every rank passed the same text (compared as a 20-byte digest); the same answer
    on every rank, so that all of them stop together instead of some hanging."""
    if group is None or group.size() == 1:
        return True
    digest = np.frombuffer(hashlib.sha1(text.encode()).digest(), dtype=np.uint8)
    ours = [int(b) for b in digest]
    theirs = broadcast_ints(ours, group)
    settle()
    (mismatches,) = [
        int(v)
        for v in mx.distributed.all_sum(
            mx.array([int(ours != theirs)], dtype=mx.int32), group=group, stream=mx.cpu
        ).tolist()
    ]
    return mismatches == 0


def check_same_drafter(drafter, group: mx.distributed.Group | None) -> None:
    """Every rank must hold the same drafter weights (or none): each rank drafts its own beams
    and verifies them, so a different drafter means different trees and mismatched
    collectives. Raises on every rank at once."""
    from .models import model_fingerprint

    fingerprint = "none" if drafter is None else model_fingerprint(drafter)
    if not all_agree(fingerprint, group):
        raise ValueError(
            f"the ranks hold different drafters (this is rank {group.rank()} of "
            f"{group.size()}, drafter fingerprint {fingerprint[:12]}): give every rank the "
            "same drafter folder, or --no-drafter on all of them"
        )


# ------------------------------------------------------------------------ the engine's decisions
def agree_on_run(
    group: mx.distributed.Group,
    seed: int,
    explicit_seed: bool,
    *,
    prompt: mx.array,
    start: int,
    settings: dict,
) -> tuple[int, bool]:
    """Rank 0's seed (and whether it was explicit) on every rank, after checking that every
    rank runs the same prompt, cache length and settings; raises on every rank otherwise.

    Two small collectives per generation, none per step. A rank whose prompt or settings
    differed would draft other trees, run another number of steps, and leave the others
    waiting in a collective forever: an error is better than a hang.
    """
    seed, explicit = broadcast_ints([seed, int(explicit_seed)], group)
    digest = hashlib.sha1(np.array(prompt, dtype=np.int64).tobytes()).hexdigest()
    mine = repr((digest, start, sorted(settings.items())))
    if not all_agree(mine, group):
        raise ValueError(
            f"the ranks were given different prompts, cached contexts or generation settings "
            f"(this is rank {group.rank()} of {group.size()}: prompt of {prompt.size} tokens, "
            f"{start} cached, settings {settings}): every rank must run the same request"
        )
    return seed, bool(explicit)


class Rank0Guard:
    """The never-slower guard on a sharded model: rank 0's guard decides each step's mode from
    its own clock, and the mode is broadcast (one one-integer all-sum, one host sync per step).

    The other ranks' clocks differ (timings, load); deciding locally would let ranks run
    different trees and hang. Turning the guard off instead would lose its promise exactly
    where a network makes a bad setting costly, so it stays on at the price of one small
    collective per step.
    """

    def __init__(self, guard, group: mx.distributed.Group):
        self.guard = guard if group.rank() == 0 else None
        self.group = group

    def choose(self, context: int = 0) -> int:
        """Rank 0's mode for a step in this context (every rank has the same context: the
        lookup reads the same emitted tokens)."""
        mode = self.guard.choose(context) if self.guard is not None else 0
        return broadcast_ints([mode], self.group)[0]

    def record(self, tokens: int) -> None:
        if self.guard is not None:
            self.guard.record(tokens)


def follow_rank0(group: mx.distributed.Group | None, guard):
    """The guard the engine uses: the local one on one process, rank 0's when sharded."""
    if group is None or guard is None:
        return guard
    return Rank0Guard(guard, group)
