"""The speculation shape per batch size: `batch_autotune(...)["table"] = {B: (W, L, N)}`.

For each batch size B (1, 2, 4, ... up to completion_batch_size) and each option (W, L, N)
(W = 0: no RNN; (0, 0, 0): plain one-token steps, no drafting) the predicted total tokens/s is

    B * mean_accepted(W, L, N) / (t(B, n(B, W, L, N)) + t_draft(B, W, L) + o)

- mean_accepted: the single-sequence tuner's offline greedy acceptance per option
  (`simulate.acceptance_by_shape` along calibration answers the LLM wrote): a row's
  acceptance does not depend on the other rows of its batch;
- t(B, n): one batched verification forward of B rows x n tokens (`batch_costs`), linear in
  n between the measured sizes; n is the step's PADDED tree (the largest row's): the RNN's
  padded size is measured per B; a copied branch adds N where at least one of the B rows
  proposes one, estimated as N * (1 - (1 - q)^B) with q the fraction of positions where the
  lookup proposes (a proposal always holds N tokens; an upper bound, as copies may merge with
  beams);
- t_draft: one batched beam search for B rows with the sync, packing and padding (measured);
- o: the per-step time outside forward and draft, measured once by the calibration at B = 1
  and taken as the same at every B (the per-row host work of drafting is in t_draft).

The prediction misses host work that grows with B (each row's packing, lookup and
bookkeeping), so, as the single-sequence tuner does, the best predicted drafting option at
each B is then confirmed online against plain steps (`confirm_per_batch`): B calibration
prompts decoded together by the real `BatchGenerator`, a few dozen steps each way,
interleaved; the faster measured one is kept. On other text the generator's guard (see
`batch`) still falls back to plain steps where the kept option stops paying. The record is
cached with the tuner's key (`cache`) plus the batch sizes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import mlx.nn as nn

from ..batch import PLAIN, shape_for
from ..drafter import Drafter
from ..verify import prepare_model
from . import cache as record_cache
from .batch_costs import (
    batch_draft_costs,
    batch_forward_cost_curve,
    batch_sizes_up_to,
)
from .calibrate import calibration_answers, calibration_prompt_list
from .choose import DEFAULT_LOOKUPS, DEFAULT_NGRAMS, DEFAULT_SHAPES
from .costs import interpolate, sample_states
from .simulate import acceptance_by_shape, mean_copy_length

__all__ = ["PLAIN", "BatchEstimate", "batch_autotune", "batch_estimates", "best_drafting"]
__all__ += ["choose_per_batch", "confirm_per_batch"]
__all__ += ["padded_copy_length", "predicted_batch_tps", "shape_for", "table_from_record"]


@dataclass
class BatchEstimate:
    """One option at one batch size: the prediction and the parts it was computed from."""

    batch: int
    beam_width: int
    beam_length: int
    prompt_lookup: int
    mean_accepted: float  # tokens per row per step
    tree_size: float  # padded tree size n (1: plain steps)
    verify_s: float  # t(B, n)
    draft_s: float
    predicted_tps: float  # total tokens/s of the batch

    @property
    def option(self) -> tuple[int, int, int]:
        return (self.beam_width, self.beam_length, self.prompt_lookup)


def predicted_batch_tps(
    batch: int, mean_accepted: float, t_verify: float, t_draft: float, overhead: float = 0.0
) -> float:
    """Total tokens/s of B rows: each step gives every row `mean_accepted` tokens."""
    step = t_verify + t_draft + overhead
    if step <= 0:
        raise ValueError(f"a step must take some time, got {step} s")
    return batch * mean_accepted / step


def padded_copy_length(max_draft: int, mean_copy: float, batch: int) -> float:
    """Expected tokens a copied branch adds to the padded tree of B rows: N when any row
    proposes (a proposal holds N tokens), with each row proposing at rate mean_copy / N."""
    if max_draft <= 0:
        return 0.0
    rate = min(max(mean_copy / max_draft, 0.0), 1.0)
    return max_draft * (1.0 - (1.0 - rate) ** batch)


def batch_estimates(
    batch_sizes: Iterable[int],
    acceptance: Mapping[tuple[int, int, int], float],
    curve: Mapping[tuple[int, int], float],
    drafts: Mapping[tuple[int, int, int], Mapping[str, float]],
    copy_lengths: Mapping[int, float] | None = None,
    overhead_s: float = 0.0,
) -> list[BatchEstimate]:
    """Every option of `acceptance` ({(W, L, N): mean accepted per step}) and plain steps, at
    every batch size; a pure function of the measured parts (tests inject fake costs).

    curve: {(B, N): seconds} with N = 1 measured for every B; drafts: {(B, W, L): {"draft_s",
    "tree_size"}} (the padded RNN tree); copy_lengths: {N: mean proposed tokens per position}.
    """
    copy_lengths = dict(copy_lengths or {})
    out = []
    for b in sorted({int(b) for b in batch_sizes}):
        row = {n: t for (bb, n), t in curve.items() if bb == b}
        if 1 not in row:
            raise ValueError(f"the cost curve has no N = 1 forward at B = {b}")
        options = [PLAIN, *(o for o in acceptance if tuple(o) != PLAIN)]
        for width, length, lookup in options:
            if width:
                part = drafts.get((b, width, length))
                if part is None:
                    raise ValueError(f"no beam-search cost for B={b} W={width} L={length}")
                size, draft_s = float(part["tree_size"]), float(part["draft_s"])
            else:
                size, draft_s = 1.0, 0.0
            size += padded_copy_length(lookup, copy_lengths.get(lookup, float(lookup)), b)
            mean = 1.0 if (width, length, lookup) == PLAIN else acceptance[(width, length, lookup)]
            verify_s = interpolate(row, size)
            out.append(
                BatchEstimate(
                    b,
                    width,
                    length,
                    lookup,
                    float(mean),
                    size,
                    verify_s,
                    draft_s,
                    predicted_batch_tps(b, mean, verify_s, draft_s, overhead_s),
                )
            )
    return out


def choose_per_batch(estimates: Sequence[BatchEstimate]) -> dict[int, tuple[int, int, int]]:
    """{B: the option with the highest predicted tokens/s}; among near-equal ones (within
    0.5%) the smaller tree, so plain steps win a tie (drafting must pay to be used)."""
    table = {}
    for b in sorted({e.batch for e in estimates}):
        at = [e for e in estimates if e.batch == b]
        top = max(e.predicted_tps for e in at)
        close = [e for e in at if e.predicted_tps >= top * 0.995]
        best = min(close, key=lambda e: (e.tree_size, e.beam_width, e.beam_length))
        table[b] = best.option
    return table


def best_drafting(estimates: Sequence[BatchEstimate], batch: int) -> tuple | None:
    """The drafting option (not plain) with the highest predicted tokens/s at `batch`."""
    at = [e for e in estimates if e.batch == batch and e.option != PLAIN]
    return max(at, key=lambda e: e.predicted_tps).option if at else None


def confirm_per_batch(
    model: nn.Module,
    drafter: Drafter | None,
    prompts: Sequence[Sequence[int]],
    candidates: Mapping[int, Sequence[tuple[int, int, int]]],
    *,
    max_tokens: int = 32,
    lookup_ngrams: tuple[int, int] = DEFAULT_NGRAMS,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[int, dict[tuple[int, int, int], float]]:
    """{B: {option: measured total decode tokens/s}}: for each B, the B rows (the prompts in
    turn) decoded together by `BatchGenerator` with each candidate option and with plain steps,
    interleaved, `max_tokens` tokens a row (no stop token, so every row does the same work)."""
    from ..batch import BatchGenerator

    measured: dict[int, dict[tuple[int, int, int], float]] = {}
    for b, options in sorted(candidates.items()):
        rows = [list(prompts[i % len(prompts)]) for i in range(b)]
        tps = {}
        for option in dict.fromkeys([PLAIN, *options]):
            generator = BatchGenerator(
                model,
                drafter if option[0] else None,
                shape_table={b: option},
                completion_batch_size=b,
                lookup_ngram_max=lookup_ngrams[0],
                lookup_ngram_min=lookup_ngrams[1],
                guard=False,  # the option itself is measured
            )
            generator.insert(rows, max_tokens=max_tokens)
            tokens, tic = 0, clock()
            while generator.busy:
                tokens += sum(len(r.tokens) for r in generator.next())
            tps[option] = tokens / max(clock() - tic, 1e-9)
        measured[b] = tps
    return measured


def batch_autotune(
    model: nn.Module,
    drafter: Drafter | None,
    tokenizer,
    completion_batch_size: int,
    *,
    prompts: Sequence[str] | str | Path | None = None,
    shapes: Iterable[tuple[int, int]] = DEFAULT_SHAPES,
    lookups: Sequence[int] = DEFAULT_LOOKUPS,
    lookup_ngrams: tuple[int, int] = DEFAULT_NGRAMS,
    max_tokens: int = 64,
    num_prompts: int = 4,
    cache_len: int = 256,
    repeats: int = 3,
    use_cache: bool = True,
    refresh: bool = False,
    confirm: bool = True,
    cache_dir: str | Path | None = None,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Measure t(B, N) and the batched beam search, predict every option per batch size,
    confirm the best drafting one against plain steps online; returns the record (cached) with
    `table` = {str(B): [W, L, N]}."""
    prepare_model(model)  # a caller-built model meets the batched seam here
    prompt_list = calibration_prompt_list(prompts, num_prompts)
    shapes = [tuple(s) for s in shapes] if drafter is not None else []
    lookups = sorted({int(k) for k in lookups})
    batches = batch_sizes_up_to(completion_batch_size)
    # a per-batch-size table, not the single-sequence choice
    key = record_cache.tuning_key(
        model,
        drafter,
        shapes,
        lookups,
        prompt_list,
        max_tokens,
        cache_len,
        confirm,
        batch=batches,
        lookup_ngrams=[int(n) for n in lookup_ngrams],
    )
    path, record = record_cache.cached_record(key, cache_dir, use_cache, refresh)
    if record is not None:
        return record
    say = log or (lambda _msg: None)
    tic = time.perf_counter()
    say(f"batch autotune: greedy calibration answers for {len(prompt_list)} prompts")
    sequences, overhead = calibration_answers(model, tokenizer, prompt_list, max_tokens)
    acc = acceptance_by_shape(model, drafter, sequences, shapes, lookups, lookup_ngrams)
    acceptance = {o: r.mean for o, r in acc.items() if r is not None}
    texts = [list(p) + list(r) for p, r in sequences]
    starts = [len(p) - 1 for p, _ in sequences]
    copies = {k: mean_copy_length(texts, starts, k, *lookup_ngrams) for k in lookups}
    drafts: dict = {}
    if shapes:
        say(f"batch autotune: batched beam search per shape at B in {batches}")
        states = sample_states(model, texts, count=min(max(batches), 8))
        drafts = batch_draft_costs(model, drafter, batches, shapes, states, repeats=repeats)
    largest = max([1.0] + [d["tree_size"] for d in drafts.values()]) + max(lookups, default=0)
    sizes = [1]
    while sizes[-1] < largest:
        sizes.append(sizes[-1] * 2)
    say(f"batch autotune: t(B, N) for B in {batches}, N in {sizes}, {cache_len} cached tokens")
    curve = batch_forward_cost_curve(model, batches, sizes, cache_len=cache_len, repeats=repeats)
    estimates = batch_estimates(batches, acceptance, curve, drafts, copies, overhead)
    table = choose_per_batch(estimates)
    confirmed = None
    if confirm:
        drafting = {b: [o for o in [best_drafting(estimates, b)] if o is not None] for b in table}
        say(f"batch autotune: confirming the best drafting option at B in {batches} online")
        confirmed = confirm_per_batch(
            model, drafter, [p for p, _ in sequences], drafting, lookup_ngrams=lookup_ngrams
        )
        table = {b: max(tps, key=tps.get) for b, tps in confirmed.items()}
    record = {
        "key": key,
        "table": {str(b): list(o) for b, o in table.items()},
        "overhead_s": overhead,
        "forward_curve_s": {f"{b},{n}": t for (b, n), t in sorted(curve.items())},
        "estimates": [asdict(e) for e in estimates],
        "predicted_table": {str(b): list(o) for b, o in choose_per_batch(estimates).items()},
        "confirmed": confirmed is not None,
        "confirmed_tps": (
            {
                str(b): {"W{}L{}N{}".format(*o): t for o, t in tps.items()}
                for b, tps in confirmed.items()
            }
            if confirmed
            else None
        ),
        "seconds": time.perf_counter() - tic,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if use_cache:
        record_cache.write_record(path, record)
    record["cached"] = None
    return record


def table_from_record(record: Mapping) -> dict[int, tuple[int, int, int]]:
    """The record's {B: (W, L, N)} with integer keys."""
    return {int(b): tuple(int(v) for v in o) for b, o in record["table"].items()}
