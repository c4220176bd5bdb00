"""Batched ReDrafter decoding: B sequences, one batched beam search and ONE LLM forward a step.

Greedy decoding is lossless per row (each row's tokens are what that prompt alone gives, with
`generate_step` or mlx-lm); sampled rows (their own `SamplingParams` and seed) use the exact
rule on their own tree. The API mirrors mlx-lm: `batch_generate` and a `BatchGenerator` with
insert / next / remove for continuous batching.

One step for the B active rows (`BatchGenerator.next`):
1. draft  - one `Drafter.beam_search_batch` over the rows' (hidden, g0) pairs; the beams reach
            the host (sync 1); each row's prompt lookup proposes its copy;
2. pack   - each row's branches are packed into its own tree (`tree.pack_tree`); the trees are
            padded to the step's largest, N nodes (`pad_trees`);
3. verify - one forward of the (B, N) tokens over the batched cache (`batch_cache.py`): per-token
            RoPE positions len_r + depth, a (B, 1, N, W + N) mask, SDPA;
4. accept - greedy rows: the longest drafted run equal to the LLM's argmax (vectorized over
            rows, branches padded with `tree.PAD`, which never matches a token); a sampled
            row: `accept.exact_accept` on its own tree's nodes (pads never enter the walk) with
            its own key; (best, accepted, next) of all rows reach the host in one sync (sync 2);
5. commit - each row's accepted path is moved after its own prefix (O(B x L) data).
Rows that finish (EOS, max_tokens, the context) leave the batch at the end of the step.

Newcomers (`insert`) are prefilled together, `prefill_batch_size` at a time, right-padded
in chunks of `prefill_step_size` columns through the same seam (`batch_prefill`); a prompt
after a prompt cache is prefilled alone by the single-sequence engine's `prefill`. Their
keys/values are then appended to the running batch's buffers (one copy per join), and their
first decode step is the batch's next step, in the same forward as everyone else.

With `guard=True` (off by default, as for one sequence: measured, it cost more where drafting
paid than it saved where it did not; README, "The guard in the batch"), the guard
(`guard.SpeedGuard`) runs per batch: before each step it chooses between
the table's option for this many rows and a plain step (g0 alone, no drafting), from the
measured seconds per emitted token of the whole batch, one guard per number of active rows.
The tuner's table comes from calibration prompts; on text the drafter and the lookup guess
less well, a drafting option that won there can lose to plain steps, and the guard then
decodes without drafting (probing the option now and then). Greedy rows are the same either
way; a step with a sampled row that has an explicit seed runs the table's option, unguarded,
so a seed keeps fixing that row's tokens.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .accept import exact_accept, match_accept_draws
from .batch_cache import BatchTreeKVCache, batch_verification_mask
from .cache import TreeKVCache, check_cache, copy_prefix
from .drafter import Drafter, check_beam_shape, check_drafter
from .generate import (
    DEFAULT_BEAM_LENGTH,
    DEFAULT_BEAM_WIDTH,
    _find_stop,
    candidate_branches,
    prefill,
)
from .guard import GuardByContext, guard_for
from .lookup import DEFAULT_NGRAM_MAX, DEFAULT_NGRAM_MIN, PromptLookup, check_lookup
from .sampler_rule import check_sampler, sampler_draws
from .sampling import (
    LogitsProcessor,
    SamplingParams,
    choose_token,
    node_histories,
    process_logits,
    target_log_probs,
)
from .tree import PAD, PackedTree, pack_tree
from .verify import context_length, embed_tokens, lm_head, prepare_model, prepared_context

DEFAULT_COMPLETION_BATCH_SIZE = 32
PLAIN = (0, 0, 0)  # a step without drafting: g0 alone, one-token verification


@dataclass(frozen=True)
class PaddedTrees:
    """B packed trees padded to the largest: what one batched verification forward takes."""

    tokens: np.ndarray  # (B, N) packed tokens, pads 0
    depths: np.ndarray  # (B, N) node depths, pads 0
    masks: np.ndarray  # (B, N, N) ancestor-or-self masks; a pad node sees itself only
    branches: np.ndarray  # (B, W, L) each row's branches, padded with PAD (rows and columns)
    unpacker: np.ndarray  # (B, W, L) packed index of each branch token (0 at pads)
    sizes: np.ndarray  # (B,) real nodes of each row's tree (the first ones; then pads)


def pad_trees(trees: Sequence[PackedTree], branches: Sequence[np.ndarray]) -> PaddedTrees:
    """Pad B trees (and their branch arrays) to the step's largest tree and branch shape."""
    b = len(trees)
    n = max(t.size for t in trees)
    width = max(x.shape[0] for x in branches)
    length = max(x.shape[1] for x in branches)
    tokens = np.zeros((b, n), np.int32)
    depths = np.zeros((b, n), np.int32)
    masks = np.broadcast_to(np.eye(n, dtype=bool), (b, n, n)).copy()
    padded = np.full((b, width, length), PAD, np.int32)
    unpacker = np.zeros((b, width, length), np.int32)
    for r, (tree, rows) in enumerate(zip(trees, branches, strict=True)):  # B rows
        k = tree.size
        tokens[r, :k], depths[r, :k], masks[r, :k, :k] = tree.tokens, tree.depths, tree.mask
        w, ell = rows.shape
        padded[r, :w, :ell], unpacker[r, :w, :ell] = rows, tree.unpacker
    sizes = np.array([t.size for t in trees], np.int64)
    return PaddedTrees(tokens, depths, masks, padded, unpacker, sizes)


def shape_for(table: Mapping[int, tuple[int, int, int]], active: int) -> tuple[int, int, int]:
    """The option (W, L, N) for `active` rows in a {B: option} table: that of the smallest
    tabled batch size >= active (its costs bound those of fewer rows), or of the largest when
    there is none."""
    if not table:
        raise ValueError("the shape table is empty")
    above = [b for b in table if b >= active]
    return tuple(table[min(above) if above else max(table)])


def per_prompt_options(
    count: int,
    max_tokens,
    sampling,
    seeds,
    caches,
    processors,
    caches_name: str = "prompt_caches",
) -> tuple[list, list, list, list, list]:
    """Each per-prompt option as one value per prompt (a single value or None given for all;
    None sampling: greedy); a list of the wrong length is an error naming it."""
    if isinstance(max_tokens, int):
        max_tokens = [max_tokens] * count
    if sampling is None or isinstance(sampling, SamplingParams):
        sampling = [sampling] * count
    sampling = [params or SamplingParams() for params in sampling]
    seeds = [None] * count if seeds is None else list(seeds)
    caches = [None] * count if caches is None else list(caches)
    processors = [None] * count if processors is None else list(processors)
    given = (("max_tokens", max_tokens), ("sampling", sampling), ("seeds", seeds))
    for name, values in (*given, (caches_name, caches), ("logits_processors", processors)):
        if len(values) != count:
            raise ValueError(f"{len(values)} {name} for {count} prompts")
    return list(max_tokens), sampling, seeds, caches, processors


def tuned_shape_table(
    model: nn.Module,
    drafter: Drafter | None,
    tokenizer,
    shape: tuple[int | str, int | str, int | str],
    limit: int,
    tune: Mapping | None = None,
) -> dict[int, tuple[int, int, int]]:
    """{B: (W, L, N)} from the batched tuner (measured once, then cached) for batch sizes up
    to `limit`; a fixed value in `shape` (W, L, N) pins its axis."""
    from .tuning.batch_choose import batch_autotune, table_from_record
    from .tuning.choose import DEFAULT_LOOKUPS, auto_grid

    width, length, lookup = shape
    if tokenizer is None:
        raise ValueError(
            "an 'auto' speculation shape needs the tokenizer (the tuner's calibration "
            "prompts): pass tokenizer=..., or give shape_table={B: (W, L, N)}"
        )
    if drafter is None and lookup != "auto":
        return {limit: (0, 0, int(lookup))}  # nothing to tune
    shapes = auto_grid(width, length) if drafter is not None else []
    lookups = DEFAULT_LOOKUPS if lookup == "auto" else (int(lookup),)
    record = batch_autotune(
        model, drafter, tokenizer, limit, shapes=shapes, lookups=lookups, **dict(tune or {})
    )
    return table_from_record(record)


def batch_greedy_accept(
    branches: mx.array, unpacker: mx.array, tree_logits: mx.array
) -> tuple[mx.array, mx.array, mx.array]:
    """Per row: the branch with the longest drafted run equal to the LLM's argmax (ties to the
    lowest index), its run length, and the LLM's token after it. All (B,), lazy.

    branches/unpacker (B, W, L) with PAD in padding (PAD never equals a token, so a run stops
    there and a padded branch scores 0); tree_logits (B, N, V).
    """
    b, w, length = branches.shape
    argmax = mx.argmax(tree_logits, axis=-1)  # (B, N)
    llm = mx.take_along_axis(argmax, unpacker.reshape(b, -1), axis=1).reshape(b, w, length)
    matches = (branches[:, :, 1:] == llm[:, :, :-1]).astype(mx.int32)
    run = mx.cumprod(matches, axis=2).sum(axis=2)  # (B, W)
    best = mx.argmax(run, axis=1)
    accepted = mx.take_along_axis(run, best[:, None], axis=1)[:, 0]
    at_best = mx.take_along_axis(llm, best[:, None, None], axis=1)[:, 0]  # (B, L)
    next_token = mx.take_along_axis(at_best, accepted[:, None], axis=1)[:, 0]
    return best, accepted, next_token.astype(mx.int32)


def batch_verify(
    model: nn.Module, cache: list[BatchTreeKVCache], padded: PaddedTrees
) -> tuple[mx.array, int]:
    """One forward of B padded trees over a batched cache (lazy hidden states (B, N, H)), and
    the common index W the trees were written at. The rows' lengths are left as they were:
    a commit keeps the accepted paths, and without one the trees are simply never seen again
    (the cost curve, `tuning.batch_costs`, times exactly this call)."""
    context = prepared_context(model)
    lengths = cache[0].lengths.copy()
    write_at = int(lengths.max())
    for c in cache:
        c.offset = write_at
    positions = mx.array((lengths[:, None] + padded.depths).astype(np.int32))

    def mask(window: int | None) -> mx.array:
        return batch_verification_mask(
            padded.masks, padded.depths, lengths, padded.sizes, write_at, window
        )

    context.set_batch(positions, mask)
    try:
        hidden = model.model(mx.array(padded.tokens), cache=cache)
    finally:
        context.clear()
    return hidden, write_at


def batch_prefill(
    model: nn.Module, prompts: list[list[int]], step_size: int = 2048
) -> tuple[list[BatchTreeKVCache], mx.array]:
    """Prefill K prompts together: a batched cache holding them, and each one's last hidden
    state (K, H).

    The prompts are right-padded to the longest and fed in chunks of `step_size` columns, each
    chunk one forward through the same seam as a decode step: a chunk is, per row, a chain
    (causal mask) written at the common index; a row whose prompt ended earlier in the chunk
    or before it has pad queries there, which see only themselves. Rows keep their real
    tokens contiguous from 0 (a row's chunk tokens sit right after its prefix, since all its
    earlier chunks were full), so nothing moves: only the lengths grow.
    """
    context = prepared_context(model)
    lengths = np.array([len(p) for p in prompts], dtype=np.int64)
    longest = int(lengths.max())
    tokens = np.zeros((len(prompts), longest), np.int32)
    for r, p in enumerate(prompts):
        tokens[r, : len(p)] = p
    cache = [BatchTreeKVCache(context) for _ in model.layers]
    for c in cache:
        c.lengths = np.zeros_like(lengths)
    last: list[mx.array | None] = [None] * len(prompts)
    for start in range(0, longest, step_size):
        width = min(step_size, longest - start)
        sizes = np.clip(lengths - start, 0, width)  # real tokens of each row in this chunk
        real = np.arange(width)[None, :] < sizes[:, None]
        depths = np.where(real, np.arange(width)[None, :], 0).astype(np.int32)
        chain = np.tril(np.ones((width, width), dtype=bool))
        masks = np.where(
            real[:, :, None], chain[None] & real[:, None, :], np.eye(width, dtype=bool)
        )
        cached = cache[0].lengths.copy()
        for c in cache:
            c.offset = start
        positions = mx.array((cached[:, None] + depths).astype(np.int32))

        def mask(window, masks=masks, depths=depths, cached=cached, sizes=sizes, start=start):
            return batch_verification_mask(masks, depths, cached, sizes, start, window)

        context.set_batch(positions, mask)
        try:
            hidden = model.model(mx.array(tokens[:, start : start + width]), cache=cache)
        finally:
            context.clear()
        for c in cache:
            c.lengths = c.lengths + sizes
        for r in np.flatnonzero((lengths > start) & (lengths <= start + width)):
            last[r] = hidden[r, lengths[r] - 1 - start]
        mx.eval(
            [c.keys for c in cache], [c.values for c in cache], [h for h in last if h is not None]
        )
    return cache, mx.stack(last)


def row_cache(cache: list[BatchTreeKVCache], row: int) -> list[TreeKVCache]:
    """One row of a batched cache as single-sequence `TreeKVCache`s (copied out)."""
    out = []
    for layer in cache:
        single = TreeKVCache(layer.tree_context)
        single.keys, single.values = (mx.contiguous(a) for a in layer.row(row))
        single.offset = int(layer.lengths[row])
        out.append(single)
    return out


@dataclass
class BatchStepResponse:
    """One row's output of one `BatchGenerator.next` call."""

    uid: int
    tokens: list[int]  # new tokens, EOS excluded (what the text shows)
    finish_reason: str | None  # "stop" (EOS), "length" (max_tokens or the context), or None
    accepted: int = 0  # drafted tokens the LLM kept in this step
    tree_size: int = 0  # nodes of this row's tree in this step (0: no step ran)
    padded_size: int = 0  # nodes of the step's padded trees (the largest row's tree)
    # every token emitted this step, past an EOS too: the row's cache holds its context and
    # all of them but the last (what a caller keeping `prompt_cache` must know)
    step_tokens: list[int] = field(default_factory=list)
    # with `return_prompt_caches`, on the row's last response: its cache (per layer)
    prompt_cache: list | None = None


@dataclass
class _Row:
    uid: int
    max_tokens: int
    g0: int
    hidden: mx.array  # (H,) the LLM's hidden state at the token that produced g0
    lookup: PromptLookup | None
    params: SamplingParams
    key: mx.array  # the row's own random stream (from its seed), split once per step
    processors: list[LogitsProcessor]  # mlx-lm logits processors, this row's own
    history: mx.array | None  # tokens the processors see (prompt and output), with processors
    emitted: int = 1
    pending: list[int] = field(default_factory=list)  # emitted, not yet returned (prefill's g0)
    seeded: bool = False  # sampled with an explicit seed: its steps run unguarded


class BatchGenerator:
    """Continuous batching for ReDrafter: `insert` prompts, call `next` for one step of
    every active row, `remove` rows early. Rows finish on their own (EOS, max_tokens, the
    model's context) and leave the batch then.
    """

    def __init__(
        self,
        model: nn.Module,
        drafter: Drafter | None = None,
        *,
        stop_tokens: Sequence[int] = (),
        beam_width: int = DEFAULT_BEAM_WIDTH,
        beam_length: int = DEFAULT_BEAM_LENGTH,
        prompt_lookup: int = 0,
        lookup_ngram_max: int = DEFAULT_NGRAM_MAX,
        lookup_ngram_min: int = DEFAULT_NGRAM_MIN,
        completion_batch_size: int = DEFAULT_COMPLETION_BATCH_SIZE,
        prefill_step_size: int = 2048,
        prefill_batch_size: int = 8,
        return_prompt_caches: bool = False,
        tokenizer=None,
        shape_table: Mapping[int, tuple[int, int, int]] | None = None,
        tune: Mapping | None = None,
        guard: bool = False,
        clock: Callable[[], float] = time.perf_counter,
    ):
        """`beam_width`, `beam_length` and `prompt_lookup` may be 'auto': the speculation
        shape is then chosen per batch size by the batched tuner (`tuning.batch_choose`,
        measured once and cached; it needs the `tokenizer` for its calibration prompts;
        `tune` holds more `batch_autotune` arguments), and each step uses the option of its
        number of active rows. `shape_table` ({B: (W, L, N)}, W = 0: no RNN) gives that
        table instead; a fixed shape is one table entry for every batch size. `guard=True` (off
        by default, as in `generate_step`) runs each step either that option or a plain step,
        whichever its measurements (`clock`) show emits tokens faster at this batch size (see
        the module docstring)."""
        if completion_batch_size < 1:
            raise ValueError(f"completion_batch_size must be >= 1, got {completion_batch_size}")
        if prefill_batch_size < 1:
            raise ValueError(f"prefill_batch_size must be >= 1, got {prefill_batch_size}")
        if prefill_step_size < 1:
            raise ValueError(f"prefill_step_size must be >= 1, got {prefill_step_size}")
        if drafter is not None:
            check_drafter(model, drafter)
            if not hasattr(drafter, "beam_search_batch"):
                raise ValueError("the drafter has no beam_search_batch (one search for B rows)")
        self.model, self.drafter = model, drafter
        self.context = prepare_model(model)
        if shape_table is not None:
            table = {int(b): tuple(int(v) for v in o) for b, o in dict(shape_table).items()}
        elif "auto" in (beam_width, beam_length, prompt_lookup):
            table = tuned_shape_table(
                model,
                drafter,
                tokenizer,
                (beam_width, beam_length, prompt_lookup),
                completion_batch_size,
                {"lookup_ngrams": (lookup_ngram_max, lookup_ngram_min), **dict(tune or {})},
            )
        else:  # one shape at every batch size (W = 0: no RNN)
            check_lookup(prompt_lookup, lookup_ngram_max, lookup_ngram_min)
            if drafter is not None:
                check_beam_shape(beam_width, beam_length)
            width = int(beam_width) if drafter is not None else 0
            table = {completion_batch_size: (width, int(beam_length), int(prompt_lookup))}
        self.shape_table = self._checked_table(table, lookup_ngram_max, lookup_ngram_min)
        # the step's option (W, L, N), chosen per step for the number of active rows
        self.shape = shape_for(self.shape_table, 1)
        most = max(n for _, _, n in self.shape_table.values())
        self.lookup_args = (most, lookup_ngram_max, lookup_ngram_min)
        self.stop_tokens = {int(t) for t in stop_tokens}
        self.completion_batch_size = completion_batch_size
        self.prefill_step_size = prefill_step_size
        self.prefill_batch_size = prefill_batch_size
        self.return_prompt_caches = return_prompt_caches
        self.limit = context_length(model)
        self.cache = [BatchTreeKVCache(self.context) for _ in model.layers]
        self.rows: list[_Row] = []
        self._done: list[BatchStepResponse] = []  # rows that finished at their prefill
        self._next_uid = 0
        self.forwards = 0  # batched verification forwards so far (one per step)
        # one guard per number of active rows, shared by generators of the same model, drafter
        # and table in this process (a server's next generator starts from what it measured)
        self.guard: GuardByContext | None = None
        if guard and any(o != PLAIN for o in self.shape_table.values()):
            settings = ("batch", tuple(self.shape_table.items()), self.lookup_args, clock)
            self.guard = guard_for((model, drafter), settings, 2, clock=clock)
        self._emitted = 0  # tokens the last step emitted over all rows (what the guard times)

    def _checked_table(self, table: dict, ngram_max: int, ngram_min: int) -> dict:
        if not table:
            raise ValueError("shape_table is empty: give {batch size: (W, L, N)}")
        for b, (width, length, lookup) in table.items():
            if b < 1:
                raise ValueError(f"shape_table has batch size {b}: sizes are >= 1")
            check_lookup(lookup, ngram_max, ngram_min)
            if width:
                if self.drafter is None:
                    raise ValueError(f"shape_table drafts with W={width} at B={b}: no drafter")
                check_beam_shape(width, length)
        # W = 0 drafts nothing with the RNN: its length means nothing then
        return {b: (w, n if w else 0, k) for b, (w, n, k) in sorted(table.items())}

    # ------------------------------------------------------------------ rows in and out
    def insert(
        self,
        prompts: Sequence[Sequence[int]],
        max_tokens: int | Sequence[int] = 256,
        sampling: SamplingParams | Sequence[SamplingParams] | None = None,
        seeds: Sequence[int | None] | None = None,
        caches: Sequence[list | None] | None = None,
        logits_processors: Sequence[Sequence[LogitsProcessor] | None] | None = None,
    ) -> list[int]:
        """Prefill the prompts (together, see `batch_prefill`) and add them to the batch;
        returns their uids.

        Its first token (the prefill's) comes with its first `next` response; its first decode
        step is the batch's next step. `sampling` (one for all, or one per prompt; default
        greedy) and `seeds` are each row's own: a sampled row uses the exact rule
        (`accept.exact_accept`) on its own tree with its own random stream, so a seed fixes
        its tokens whatever else runs in the batch (up to float rounding of its logits); a row
        whose SamplingParams hold an mlx-lm `sampler` uses the match rule on its draws (as
        `generate_step` does; the sampler draws from MLX's global random state, not the seed).
        `caches` (per prompt, or None): `make_prompt_cache` caches holding an earlier context,
        the prompt then holding the tokens after it (as in `generate_step`); they are read,
        never written (mlx-lm's batch_generate leaves them as they were too).
        `logits_processors` (per prompt, or None): mlx-lm processors applied to that row's
        logits at every tree node with the node's own history, as `generate_step` applies them
        (a host loop over the row's nodes, only for rows that have processors).
        """
        prompts = [list(p) for p in prompts]
        max_tokens, sampling, seeds, caches, processors = per_prompt_options(
            len(prompts), max_tokens, sampling, seeds, caches, logits_processors, "caches"
        )
        processors = [list(p or []) for p in processors]
        for cache in caches:
            if cache is not None:
                check_cache(cache)
                if any(layer.quantized for layer in cache):
                    raise ValueError("batched decoding does not take KV-quantized caches yet")
        for params in sampling:
            if not isinstance(params, SamplingParams):
                raise ValueError(f"sampling takes SamplingParams, got {type(params).__name__}")
            settings = dict(temp=params.temp, top_p=params.top_p, top_k=params.top_k)
            check_sampler(params.sampler, dict(settings, min_p=params.min_p), "match")
        if len(self.rows) + len(prompts) > self.completion_batch_size:
            raise ValueError(
                f"{len(prompts)} new rows with {len(self.rows)} running exceed "
                f"completion_batch_size={self.completion_batch_size}"
            )
        for i, (p, m, cache) in enumerate(zip(prompts, max_tokens, caches, strict=True)):
            if not p:
                raise ValueError(f"prompt {i} is empty: give at least one token")
            cached = 0 if cache is None else cache[0].offset
            if self.limit is not None and cached + len(p) > self.limit:
                raise ValueError(
                    f"prompt {i} has {len(p)} tokens (+{cached} cached), more than the model's "
                    f"context of {self.limit} tokens"
                )
            if m == 0 or m < -1:
                raise ValueError(f"max_tokens must be positive (or -1: no limit), got {m}")
        uids, keys, values = [], [[] for _ in self.cache], [[] for _ in self.cache]
        prefilled = self._prefill(prompts, caches)
        for p, m, params, seed, procs, (hidden, logits, single) in zip(
            prompts, max_tokens, sampling, seeds, processors, prefilled, strict=True
        ):
            seeded = seed is not None and not params.greedy
            if seed is None:  # as generate_step: a fresh seed for a sampled row without one
                seed = (
                    int(mx.random.randint(0, 2**31 - 1, shape=()).item())
                    if not params.greedy
                    else 0
                )
            key, sub = mx.random.split(mx.random.key(seed))
            history = mx.array(p, dtype=mx.int32) if procs else None
            logits = process_logits(logits, [history], procs)
            g0 = int(choose_token(logits, params, sub).item())
            lookup = None
            if self.lookup_args[0]:
                lookup = PromptLookup(p + [g0], *self.lookup_args)
            row = _Row(
                self._next_uid, m, g0, hidden[-1], lookup, params, key, procs, history,
                pending=[g0], seeded=seeded,
            )  # fmt: skip
            self._next_uid += 1
            uids.append(row.uid)
            if g0 in self.stop_tokens or m == 1:
                row.pending = [] if g0 in self.stop_tokens else [g0]
                stop = "stop" if g0 in self.stop_tokens else "length"
                done = BatchStepResponse(row.uid, row.pending, stop, step_tokens=[g0])
                if self.return_prompt_caches:
                    done.prompt_cache = single
                self._done.append(done)
                continue
            self.rows.append(row)
            for layer, c in enumerate(single):
                keys[layer].append(c.keys[..., : c.offset, :])
                values[layer].append(c.values[..., : c.offset, :])
        if keys[0]:
            for c, k, v in zip(self.cache, keys, values, strict=True):
                c.add_rows(k, v)
        return uids

    def _prefill(self, prompts: list[list[int]], caches: list) -> list[tuple]:
        """(hidden (1, H), logits (1, V), single-row cache) of each prompt's last token.

        Prompts without a cache are prefilled together, `prefill_batch_size` at a time
        (`batch_prefill`); a prompt after a cache alone (`generate.prefill`, the
        single-sequence engine's own), as its cached length differs from the others'.
        """
        out: list = [None] * len(prompts)
        fresh = [i for i, cache in enumerate(caches) if cache is None]
        for i, cache in enumerate(caches):
            if cache is not None:  # slices of the caller's arrays; writes go to new buffers
                single = copy_prefix(cache, cache[0].offset)
                step = self.prefill_step_size
                out[i] = (*prefill(self.model, single, mx.array(prompts[i]), step), single)
        size = self.prefill_batch_size
        for start in range(0, len(fresh), size):
            group = fresh[start : start + size]
            cache, hidden = batch_prefill(
                self.model, [prompts[i] for i in group], self.prefill_step_size
            )
            logits = lm_head(self.model)(hidden)
            for r, i in enumerate(group):
                out[i] = (hidden[r : r + 1], logits[r : r + 1], row_cache(cache, r))
        return out

    def remove(self, uids: Sequence[int], return_prompt_caches: bool = False) -> dict | None:
        """Drop rows from the batch; with `return_prompt_caches`, {uid: its cache}."""
        gone = set(uids)
        caches = None
        if return_prompt_caches:
            caches = {r.uid: self.row_cache(i) for i, r in enumerate(self.rows) if r.uid in gone}
        self._keep([i for i, r in enumerate(self.rows) if r.uid not in gone])
        return caches

    def row_cache(self, row: int) -> list[TreeKVCache]:
        """Row `row`'s cache as single-sequence `TreeKVCache`s (for `generate_step` or another
        insert): its context and emitted tokens but the last, which the next step would feed."""
        return row_cache(self.cache, row)

    def _keep(self, keep: list[int]) -> None:
        if len(keep) == len(self.rows):
            return
        for c in self.cache:
            c.keep_rows(np.array(keep, dtype=np.int64))
        self.rows = [self.rows[i] for i in keep]

    @property
    def active(self) -> int:
        return len(self.rows)

    @property
    def busy(self) -> bool:
        """Rows to step, or responses (rows that ended at their prefill) not yet returned."""
        return bool(self.rows or self._done)

    # ------------------------------------------------------------------ one step
    def next(self) -> list[BatchStepResponse]:
        """One decode step of every active row (one batched forward); a row's response holds
        its tokens of this step (after its prefill token, for a newcomer). [] when idle."""
        out, self._done = self._done, []
        if not self.rows:
            return out
        # the option for this many rows (a change between steps is lossless: each step
        # builds its trees afresh; the shape only changes what is proposed)
        self.shape = width, length, lookup = shape_for(self.shape_table, len(self.rows))
        longest = max(length if width else 1, 1 + lookup)
        full = [
            i
            for i, r in enumerate(self.rows)
            if self.limit is not None and int(self.cache[0].lengths[i]) + longest > self.limit
        ]
        for i in full:  # no room for a step: the context is full (generate_step stops there)
            row = self.rows[i]
            out.append(BatchStepResponse(row.uid, row.pending, "length"))
        self._keep([i for i in range(len(self.rows)) if i not in full])
        if not self.rows:
            return out
        guarded = (
            self.guard is not None and self.shape != PLAIN and not any(r.seeded for r in self.rows)
        )
        if guarded and self.guard.choose(len(self.rows)) == 1:
            self.shape = PLAIN
        out += self._step()
        if guarded:
            self.guard.record(self._emitted)
        return out

    def _step(self) -> list[BatchStepResponse]:
        rows, model = self.rows, self.model
        # 1. draft
        width, length, lookup = self.shape
        rnn = None
        if width:
            beams, _ = self.drafter.beam_search_batch(
                mx.stack([r.hidden for r in rows]),
                mx.array([r.g0 for r in rows], dtype=mx.int32),
                embed_tokens(model),
                width,
                length,
            )
            rnn = np.array(beams)  # sync 1
        # 2. pack
        branches, trees, copies = [], [], []
        for i, row in enumerate(rows):  # B rows, host work on a few dozen tokens each
            # rows' lookups propose the table's longest copy; this step's N keeps its start
            copied = row.lookup.propose()[:lookup] if row.lookup is not None and lookup else []
            rows_i = candidate_branches(row.g0, rnn[i] if rnn is not None else None, copied)
            branches.append(rows_i)
            trees.append(pack_tree(rows_i))
            copies.append(copied)
        padded = pad_trees(trees, branches)
        # 3. verify: one forward for all rows
        hidden, write_at = batch_verify(model, self.cache, padded)
        self.forwards += 1
        logits = lm_head(model)(hidden)
        for i, row in enumerate(rows):  # rows with logits processors: each node's history
            if row.processors:
                row.history = mx.concatenate([row.history, mx.array([row.g0], mx.int32)])
                n = trees[i].size
                histories = node_histories(row.history, trees[i])
                logits[i, :n] = process_logits(logits[i, :n], histories, row.processors)
        # 4. accept: greedy rows together; a sampled row walks its own (unpadded) tree
        decisions = mx.stack(
            batch_greedy_accept(mx.array(padded.branches), mx.array(padded.unpacker), logits),
            axis=1,
        )  # (B, 3): best, accepted, next
        sampled = [i for i, row in enumerate(rows) if not row.params.greedy]
        if sampled:
            walks = []
            for i in sampled:  # pads never enter a walk: only the row's own nodes
                row = rows[i]
                row.key, sub = mx.random.split(row.key)
                nodes = logits[i, : trees[i].size]
                if row.params.sampler is not None:  # an mlx-lm sampler: the match rule
                    walk = match_accept_draws(trees[i], sampler_draws(row.params.sampler, nodes))
                else:
                    walk = exact_accept(trees[i], target_log_probs(nodes, row.params), sub)
                walks.append(mx.stack([walk.best, walk.accepted, walk.next_token]))
            decisions[mx.array(sampled)] = mx.stack(walks).astype(decisions.dtype)
        best, accepted, next_token = np.array(decisions).T  # sync 2
        # 5. commit, and each row's outcome
        paths, responses, keep = [], [], []
        self._emitted = 0
        for i, row in enumerate(rows):
            n = int(accepted[i])
            new = [*padded.branches[i, best[i], 1 : n + 1].tolist(), int(next_token[i])]
            if row.max_tokens >= 0:
                new = new[: row.max_tokens - row.emitted]
            paths.append(trees[i].path(int(best[i]), len(new)))
            row.emitted += len(new)
            self._emitted += len(new)
            shown, finish = new, None
            stops = [j for j, t in enumerate(new) if t in self.stop_tokens]
            if stops:
                shown, finish = new[: stops[0]], "stop"
            elif row.max_tokens >= 0 and row.emitted >= row.max_tokens:
                finish = "length"
            responses.append(
                BatchStepResponse(
                    row.uid,
                    row.pending + shown,
                    finish,
                    n,
                    trees[i].size,
                    padded.tokens.shape[1],
                    row.pending + new,
                )
            )
            row.pending = []
            row.g0 = new[-1]
            if row.lookup is not None:
                row.lookup.extend(new)
            if row.processors:
                row.history = mx.concatenate([row.history, mx.array(new[:-1], mx.int32)])
            if finish is None:
                keep.append(i)
        for c in self.cache:
            c.commit(write_at, paths)
        if self.return_prompt_caches:
            for i, response in enumerate(responses):
                if response.finish_reason is not None:
                    response.prompt_cache = self.row_cache(i)
        last = mx.array([int(p[-1]) for p in paths], dtype=mx.int32)
        next_hidden = mx.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
        for i, row in enumerate(rows):
            row.hidden = next_hidden[i]
        self._keep(keep)
        return responses


@dataclass
class BatchResponse:
    """`batch_generate`'s result, as mlx-lm's: a text per prompt (in prompt order), with the
    token ids and finish reasons alongside."""

    texts: list[str]
    token_ids: list[list[int]]
    finish_reasons: list[str]
    forwards: int  # batched verification forwards (decode steps) run
    # with return_prompt_caches: each row's cache (its context and tokens, all but the last
    # token its last step emitted, as BatchStepResponse.step_tokens says)
    caches: list[list | None] | None = None


class _RowText:
    """One row's tokens and streamed text, cut where a stop string starts."""

    def __init__(self, detokenizer):
        self.detokenizer, self.tokens, self.text = detokenizer, [], ""
        detokenizer.reset()

    def add(self, tokens: list[int], stops: list[str]) -> bool:
        """Append tokens; True when a stop string completed (the text is then cut there)."""
        for token in tokens:
            self.tokens.append(token)
            self.detokenizer.add_token(token)
            self.text += self.detokenizer.last_segment
            hit = _find_stop(self.text, stops) if stops else None
            if hit is not None:
                self.text = self.text[:hit]
                return True
        return False

    def finish(self) -> None:
        self.detokenizer.finalize()
        self.text += self.detokenizer.last_segment


def batch_generate(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    drafter: Drafter | None = None,
    *,
    max_tokens: int | Sequence[int] = 128,
    sampling: SamplingParams | Sequence[SamplingParams] | None = None,
    seeds: Sequence[int | None] | None = None,
    prompt_caches: Sequence[list | None] | None = None,
    return_prompt_caches: bool = False,
    stop_strings: Sequence[str] | None = None,
    logits_processors: Sequence[Sequence[LogitsProcessor] | None] | None = None,
    completion_batch_size: int = DEFAULT_COMPLETION_BATCH_SIZE,
    **kwargs,
) -> BatchResponse:
    """ReDrafter for a list of token prompts; `kwargs` go to `BatchGenerator`.

    `sampling` and `seeds` are per prompt (or one `SamplingParams` for all; default greedy),
    as in `BatchGenerator.insert`, and so are `logits_processors` and `prompt_caches` (read,
    not written); with
    `return_prompt_caches` the response holds each row's final cache. More prompts than
    `completion_batch_size` are queued, as in mlx-lm: a row joins the running batch as soon as
    another leaves it. A row's text ends where one of `stop_strings` starts (the row leaves the
    batch at the token that completes it, as in `stream_generate`).
    """
    prompts = [list(p) for p in prompts]
    if not prompts:
        raise ValueError("prompts is empty: give at least one prompt (a list of token ids)")
    max_tokens, sampling, seeds, caches, processors = per_prompt_options(
        len(prompts), max_tokens, sampling, seeds, prompt_caches, logits_processors
    )
    gen = BatchGenerator(
        model,
        drafter,
        stop_tokens=tokenizer.eos_token_ids,
        completion_batch_size=completion_batch_size,
        return_prompt_caches=return_prompt_caches,
        tokenizer=tokenizer,  # for an 'auto' shape's calibration prompts
        **kwargs,
    )
    for i, p in enumerate(prompts):  # every prompt checked before any prefill runs
        if not p:
            raise ValueError(f"prompt {i} is empty: give at least one token")
        if gen.limit is not None and len(p) > gen.limit:
            raise ValueError(
                f"prompt {i} has {len(p)} tokens, more than the model's context of "
                f"{gen.limit} tokens"
            )
    stops = [s for s in (stop_strings or []) if s]
    texts: dict[int, _RowText] = {}
    reasons: dict[int, str] = {}
    finals: dict[int, list | None] = {}
    order: list[int] = []
    waiting = list(range(len(prompts)))
    while waiting or gen.busy:
        room = completion_batch_size - gen.active
        if waiting and room > 0:
            take, waiting = waiting[:room], waiting[room:]
            order += gen.insert(
                [prompts[i] for i in take],
                [max_tokens[i] for i in take],
                [sampling[i] for i in take],
                [seeds[i] for i in take],
                [caches[i] for i in take],
                [processors[i] for i in take],
            )
        for r in gen.next():
            row = texts.setdefault(r.uid, _RowText(tokenizer.detokenizer))
            if row.add(r.tokens, stops):  # a stop string: the row ends at its token
                reasons[r.uid] = "stop"
                left = gen.remove([r.uid], return_prompt_caches=return_prompt_caches)
                finals[r.uid] = (left or {}).get(r.uid, r.prompt_cache)
            elif r.finish_reason is not None:
                row.finish()
                reasons[r.uid], finals[r.uid] = r.finish_reason, r.prompt_cache
    ids = [texts[uid].tokens for uid in order]
    return BatchResponse(
        texts=[texts[uid].text for uid in order],
        token_ids=ids,
        finish_reasons=[reasons[uid] for uid in order],
        forwards=gen.forwards,
        caches=[finals[uid] for uid in order] if return_prompt_caches else None,
    )
