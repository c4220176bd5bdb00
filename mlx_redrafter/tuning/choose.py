"""Speculation settings from measured costs: `resolve_speculation(...) -> (W, L, N)`.

The options are the RNN's beam shape (W, L; W = 0: no RNN) and the longest prompt-lookup copy
N (0: none), alone or together in one tree. For each option the predicted speedup over
one-token steps is

    mean_accepted(W, L) * (t(1) + o) / (t(n(W, L)) + t_draft(W, L) + o)

- mean_accepted: greedy acceptance simulated offline (`simulate.offline_acceptance_grid`,
  exact for greedy decoding up to near-ties) along calibration answers the LLM itself wrote
  (`calibrate`);
- t(n): the LLM forward time over the option's mean packed tree size n (measured,
  `costs`; a copied branch adds its mean proposed length, an upper bound);
- t_draft: the beam search with its host sync and packing (measured);
- o: the per-step time outside forward and draft (accept, commit, Python), measured while the
  calibration answers are generated.

A prediction can be wrong (a busy machine while tuning, a cost the model misses), so the
best predictions are then confirmed online: short greedy generations with each candidate and
with plain one-token steps, interleaved, by the engine's own decode loop, and the fastest
measured one is kept (plain steps included: the choice (0, 0, 0) means no speculation).
Nothing is cached before it is confirmed. The choice is cached per device, model, drafter,
grid, lookup n-gram sizes, calibration set, package version and `cache.TUNER_VERSION`
(`cache`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from ..drafter import Drafter
from ..lookup import DEFAULT_NGRAM_MAX, DEFAULT_NGRAM_MIN
from . import cache as record_cache
from .calibrate import calibration_answers, calibration_prompt_list
from .costs import draft_costs, filled_cache, forward_cost_curve, interpolate, sample_states
from .simulate import acceptance_by_shape, mean_copy_length

DEFAULT_SHAPES = tuple((w, l) for w in (1, 2, 3, 4, 8) for l in (2, 3, 4, 5, 6))  # noqa: E741
DEFAULT_LOOKUPS = (0, 4, 8)  # longest copied branch; 0: none
CONFIRM_CANDIDATES = 3
DEFAULT_NGRAMS = (DEFAULT_NGRAM_MAX, DEFAULT_NGRAM_MIN)  # the lookup's (longest, shortest)


def predicted_speedup(
    accepted_per_step: float,
    t_one: float,
    t_verify: float,
    t_draft: float,
    overhead: float = 0.0,
) -> float:
    """Cost model for a beam shape: tokens per step over step time, relative to one token.

    t_one and t_verify are LLM forward times (1 token; the shape's tree); overhead is the
    per-step time outside forward and draft (pack, accept, commit, Python), added to both.
    """
    return accepted_per_step * (t_one + overhead) / (t_verify + t_draft + overhead)


@dataclass
class ShapeEstimate:
    """One option's prediction and the parts it was computed from (kept in the record)."""

    beam_width: int
    beam_length: int
    mean_accepted: float
    histogram: list[int]
    tree_size: float
    draft_s: float
    verify_s: float
    predicted_speedup: float
    prompt_lookup: int = 0  # longest copied branch (0: none); beam_width 0: lookup alone

    @property
    def option(self) -> tuple[int, int, int]:
        return (self.beam_width, self.beam_length, self.prompt_lookup)


def estimate_shapes(
    model: nn.Module,
    drafter: Drafter | None,
    sequences: Sequence[tuple[list[int], list[int]]],
    shapes: Iterable[tuple[int, int]] = DEFAULT_SHAPES,
    *,
    lookups: Sequence[int] = (0,),
    lookup_ngrams: tuple[int, int] = DEFAULT_NGRAMS,
    cache_len: int = 256,
    overhead_s: float = 0.0,
    curve: dict[int, float] | None = None,
    repeats: int = 3,
    log: Callable[[str], None] | None = None,
) -> tuple[list[ShapeEstimate], dict[int, float]]:
    """Predicted speedup per option (W, L, N); also returns the forward-time curve it measured.
    Without a drafter only lookup alone is estimated."""
    shapes = list(shapes) if drafter is not None else []
    lookups = sorted(set(lookups))
    say = log or (lambda _msg: None)
    options = [(w, n, k) for w, n in shapes for k in lookups] + [(0, 0, k) for k in lookups if k]
    say(f"autotune: offline acceptance for {len(options)} options on {len(sequences)} answers")
    acceptance = acceptance_by_shape(model, drafter, sequences, shapes, lookups, lookup_ngrams)
    drafts: dict = {}
    if shapes:
        say("autotune: beam-search cost per shape")
        states = sample_states(model, [list(p) + list(r) for p, r in sequences], count=4)
        drafts = draft_costs(model, drafter, shapes, states, repeats=max(1, repeats - 1))
    copy_len = {
        k: mean_copy_length(
            [list(p) + list(r) for p, r in sequences],
            [len(p) - 1 for p, _ in sequences],
            k,
            *lookup_ngrams,
        )
        for k in lookups
    }

    def tree_size(w, n, k):
        base = drafts[(w, n)]["tree_size"] if w else 1.0
        return base + copy_len[k]

    curve = dict(curve or {})
    needed = {1} | {max(1, int(round(tree_size(*o)))) for o in options}
    missing = sorted(n for n in needed if n not in curve)
    if missing:
        say(f"autotune: forward time at {missing} tokens after a {cache_len}-token cache")
        cache = filled_cache(model, cache_len)
        curve.update(forward_cost_curve(model, missing, cache=cache, repeats=repeats))
    estimates = []
    for width, length, lookup in options:
        acc = acceptance.get((width, length, lookup))
        mean = acc.mean if acc is not None else 1.0
        size = tree_size(width, length, lookup)
        verify_s = interpolate(curve, size)
        draft_s = drafts[(width, length)]["draft_s"] if width else 0.0
        estimates.append(
            ShapeEstimate(
                beam_width=width,
                beam_length=length,
                mean_accepted=mean,
                histogram=acc.histogram.tolist() if acc is not None else [],
                tree_size=size,
                draft_s=draft_s,
                verify_s=verify_s,
                predicted_speedup=predicted_speedup(mean, curve[1], verify_s, draft_s, overhead_s),
                prompt_lookup=lookup,
            )
        )
    return estimates, curve


def best_shape(estimates: Sequence[ShapeEstimate]) -> ShapeEstimate:
    """Highest predicted speedup; among near-equal ones (within 0.5%) the smaller tree."""
    top = max(e.predicted_speedup for e in estimates)
    close = [e for e in estimates if e.predicted_speedup >= top * 0.995]
    return min(close, key=lambda e: (e.tree_size, e.beam_width, e.beam_length, e.prompt_lookup))


def confirm_online(
    model: nn.Module,
    drafter: Drafter | None,
    candidates: Sequence[tuple[int, int, int]],
    prompts: Sequence[list[int]],
    *,
    max_tokens: int = 48,
    lookup_ngrams: tuple[int, int] = DEFAULT_NGRAMS,
    log: Callable[[str], None] | None = None,
) -> dict[tuple[int, int, int], float]:
    """Measured greedy tokens/s of each option and of plain steps (0, 0, 0), interleaved per
    prompt; the guard is off so that each option is measured as it is."""
    from ..generate import generate_step

    options = list(dict.fromkeys([(0, 0, 0), *candidates]))
    say = log or (lambda _msg: None)
    say(f"autotune: confirming {len(options) - 1} options online against plain steps")
    tokens = dict.fromkeys(options, 0)
    seconds = dict.fromkeys(options, 0.0)
    for prompt in prompts:
        for width, length, lookup in options:
            steps = generate_step(
                mx.array(prompt),
                model,
                drafter if width else None,
                max_tokens=max_tokens,
                beam_width=max(width, 1),
                beam_length=max(length, 2),
                prompt_lookup=lookup,
                lookup_ngram_max=lookup_ngrams[0],
                lookup_ngram_min=lookup_ngrams[1],
                guard=False,
            )
            next(steps)  # the prefill's token: not part of decoding speed
            tic = time.perf_counter()
            count = sum(len(new) for new, _ in steps)
            seconds[(width, length, lookup)] += time.perf_counter() - tic
            tokens[(width, length, lookup)] += count
    return {o: tokens[o] / seconds[o] if seconds[o] else 0.0 for o in options}


def autotune(
    model: nn.Module,
    drafter: Drafter | None,
    tokenizer,
    *,
    prompts: Sequence[str] | str | Path | None = None,
    shapes: Iterable[tuple[int, int]] = DEFAULT_SHAPES,
    lookups: Sequence[int] = (0,),
    lookup_ngrams: tuple[int, int] = DEFAULT_NGRAMS,
    max_tokens: int = 64,
    num_prompts: int = 4,
    cache_len: int = 256,
    use_cache: bool = True,
    refresh: bool = False,
    confirm: bool = True,
    cache_dir: str | Path | None = None,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Measure and predict every option, confirm the best online; returns the record (cached)
    with `choice` = [W, L, N] (W = 0: no RNN; [0, 0, 0]: plain one-token steps). The lookup
    is simulated and measured with `lookup_ngrams` (longest, shortest n-gram it matches), the
    sizes the generation will use."""
    prompt_list = calibration_prompt_list(prompts, num_prompts)
    shapes = [tuple(s) for s in shapes] if drafter is not None else []
    lookups = sorted({int(k) for k in lookups})
    if not shapes and not any(lookups):
        raise ValueError("nothing to tune: no drafter and no prompt-lookup length above 0")
    lookup_ngrams = (int(lookup_ngrams[0]), int(lookup_ngrams[1]))
    key = record_cache.tuning_key(
        model,
        drafter,
        shapes,
        lookups,
        prompt_list,
        max_tokens,
        cache_len,
        confirm,
        lookup_ngrams=list(lookup_ngrams),
    )
    path, record = record_cache.cached_record(key, cache_dir, use_cache, refresh)
    if record is not None:
        return record
    say = log or (lambda _msg: None)
    tic = time.perf_counter()
    say(f"autotune: greedy calibration answers for {len(prompt_list)} prompts")
    sequences, overhead = calibration_answers(model, tokenizer, prompt_list, max_tokens)
    estimates, curve = estimate_shapes(
        model,
        drafter,
        sequences,
        shapes,
        lookups=lookups,
        lookup_ngrams=lookup_ngrams,
        cache_len=cache_len,
        overhead_s=overhead,
        log=log,
    )
    best = best_shape(estimates)
    choice = best.option
    measured = None
    if confirm:
        ranked = sorted(estimates, key=lambda e: -e.predicted_speedup)
        candidates = [e.option for e in ranked[:CONFIRM_CANDIDATES]]
        alone = [e.option for e in ranked if e.beam_width == 0]
        if alone and alone[0] not in candidates:
            candidates.append(alone[0])  # the best lookup alone is always measured too
        measured = confirm_online(
            model,
            drafter,
            candidates,
            [p for p, _ in sequences],
            max_tokens=max_tokens,
            lookup_ngrams=lookup_ngrams,
            log=log,
        )
        choice = max(measured, key=measured.get)
    record = {
        "key": key,
        "choice": list(choice),
        "predicted_best": list(best.option),
        "predicted_speedup": best.predicted_speedup,
        "confirmed_tps": (
            {"W{}L{}N{}".format(*o): t for o, t in measured.items()} if measured else None
        ),
        "overhead_s": overhead,
        "forward_curve_s": {str(n): t for n, t in sorted(curve.items())},
        "estimates": [asdict(e) for e in estimates],
        "seconds": time.perf_counter() - tic,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if use_cache:
        record_cache.write_record(path, record)
    record["cached"] = None
    return record


def choose_shape(model: nn.Module, drafter: Drafter, tokenizer, **kwargs) -> tuple[int, int]:
    """(W, L) with the best predicted speedup on this device, RNN only, unconfirmed (see
    `autotune` for options; `resolve_speculation` is what the engine uses)."""
    kwargs.setdefault("confirm", False)
    width, length, _ = autotune(model, drafter, tokenizer, **kwargs)["choice"]
    return int(width), int(length)


def auto_grid(width: int | str, length: int | str) -> list[tuple[int, int]]:
    """The shapes to tune over when W and/or L is 'auto': a fixed value pins its axis."""
    widths = sorted({w for w, _ in DEFAULT_SHAPES}) if width == "auto" else [int(width)]
    lengths = sorted({n for _, n in DEFAULT_SHAPES}) if length == "auto" else [int(length)]
    return [(w, n) for w in widths for n in lengths]


def resolve_shape(
    model: nn.Module, drafter: Drafter, tokenizer, width: int | str, length: int | str, **kwargs
) -> tuple[int, int]:
    """(W, L) with any 'auto' replaced by the tuned value (measured once, then cached)."""
    if "auto" not in (width, length):
        return int(width), int(length)
    return choose_shape(model, drafter, tokenizer, shapes=auto_grid(width, length), **kwargs)


def resolve_speculation(
    model: nn.Module,
    drafter: Drafter | None,
    tokenizer,
    width: int | str,
    length: int | str,
    lookup: int | str,
    **kwargs,
) -> tuple[int, int, int]:
    """(W, L, N) with every 'auto' tuned and confirmed on this device (once, then cached).

    W = 0 in the result means: decode without the RNN drafter (lookup alone, or plain steps
    when N = 0 too). A fixed value pins its axis; without a drafter only N is tuned.
    """
    if "auto" not in (width, length, lookup):
        return int(width), int(length), int(lookup)
    shapes = auto_grid(width, length) if drafter is not None else []
    lookups = DEFAULT_LOOKUPS if lookup == "auto" else (int(lookup),)
    if drafter is None and lookup != "auto":
        return 0, 0, int(lookup)
    record = autotune(model, drafter, tokenizer, shapes=shapes, lookups=lookups, **kwargs)
    w, n, k = (int(v) for v in record["choice"])
    return w, n, k
