"""Offline greedy acceptance: how many tokens a speculation setting would emit per step along
answers the LLM itself wrote, without running the decode loop.

Along a sequence the LLM produced greedily, greedy ReDrafter's behaviour is fixed by the data.
At a state (hidden h_t, next token g0 = x_{t+1}) the drafter's beams depend only on (h_t, g0),
so one teacher-forced LLM pass gives every h_t, one batched beam search drafts from every
position at once, and the acceptance walk (t -> t + n + 1) runs on the host. This is exact for
greedy decoding up to floating-point near-ties, and fast enough for sweeps. Hybrid trees
(`prompt_lookup`): the lookup's copy at t depends only on x_0..x_{t+1}, so one incremental index
walked along the sequence gives every position's copied run; a step keeps the longer of the
RNN's and the copy's runs, as greedy acceptance over their joint tree does.

The tuner predicts with it (`tuning.choose`); the drafter's `evaluate` command
(`train.evaluate`) reports it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..drafter import Drafter
from ..lookup import DEFAULT_NGRAM_MAX, DEFAULT_NGRAM_MIN, PromptLookup
from ..verify import embed_tokens


@dataclass
class AcceptanceResult:
    tokens: int  # tokens emitted by verification steps (the prefill's token excluded)
    steps: int  # verification forwards
    histogram: np.ndarray  # counts of tokens per step (index = tokens emitted, 1..L)

    @property
    def mean(self) -> float:
        return self.tokens / self.steps if self.steps else 0.0

    def __add__(self, other: AcceptanceResult) -> AcceptanceResult:
        size = max(len(self.histogram), len(other.histogram))
        hist = np.zeros(size, dtype=np.int64)
        hist[: len(self.histogram)] += self.histogram
        hist[: len(other.histogram)] += other.histogram
        return AcceptanceResult(self.tokens + other.tokens, self.steps + other.steps, hist)


def matched_lengths(beams: np.ndarray, sequence: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """For each position t: max over beams of the run of drafted tokens equal to x_{t+2...}.

    beams: (P, W, L) drafted from (h_t, x_{t+1}); returns (P,) accepted drafted tokens.
    """
    length = beams.shape[-1]
    padded = np.concatenate([sequence, np.full(length, -1, dtype=sequence.dtype)])
    truth = padded[positions[:, None] + 2 + np.arange(length - 1)[None, :]]  # (P, L-1)
    equal = beams[:, :, 1:] == truth[:, None, :]
    return np.cumprod(equal, axis=-1).sum(axis=-1).max(axis=-1)


def acceptance_walk(accepted_at: dict[int, int] | np.ndarray, start: int, end: int, length: int):
    """Walk t -> t + n + 1 from `start` (the last prompt position) until the sequence ends.

    `end` is the index of the sequence's last token; each step emits min(n + 1, remaining).
    """
    hist = np.zeros(length + 1, dtype=np.int64)
    t, tokens, steps = start, 0, 0
    while t + 1 < end:  # x_{t+1} (g0) is already emitted; tokens after it remain
        remaining = end - (t + 1)
        n = int(accepted_at[t - start])
        emitted = min(n + 1, remaining)
        hist[emitted] += 1
        tokens += emitted
        steps += 1
        t += emitted
    return AcceptanceResult(tokens, steps, hist)


def lookup_lengths(
    sequence: Sequence[int],
    positions: np.ndarray,
    max_draft: int,
    ngram_max: int = DEFAULT_NGRAM_MAX,
    ngram_min: int = DEFAULT_NGRAM_MIN,
) -> np.ndarray:
    """For each position t: the run of the lookup's copy (proposed after x_0..x_{t+1}) equal to
    x_{t+2...}, as the engine's index would propose it there."""
    sequence = [int(t) for t in sequence]
    out = np.zeros(len(positions), dtype=np.int64)
    if max_draft == 0 or len(positions) == 0:
        return out
    first = int(positions[0])
    lookup = PromptLookup(sequence[: first + 2], max_draft, ngram_max, ngram_min)
    for i, t in enumerate(positions):
        t = int(t)
        if len(lookup.tokens) < t + 2:
            lookup.extend(sequence[len(lookup.tokens) : t + 2])
        truth = sequence[t + 2 : t + 2 + max_draft]
        run = 0
        for copied, true in zip(lookup.propose(), truth):  # noqa: B905 - the text may end first
            if copied != true:
                break
            run += 1
        out[i] = run
    return out


def offline_acceptance(
    model: nn.Module,
    drafter: Drafter,
    prompt: Sequence[int],
    response: Sequence[int],
    beam_width: int,
    beam_length: int,
    hidden: np.ndarray | mx.array | None = None,
    batch: int = 128,
) -> AcceptanceResult:
    """Simulated greedy ReDrafter along prompt + response (the LLM's greedy response)."""
    return offline_acceptance_by_length(
        model, drafter, prompt, response, beam_width, [beam_length], hidden, batch
    )[beam_length]


def offline_acceptance_by_length(
    model: nn.Module,
    drafter: Drafter | None,
    prompt: Sequence[int],
    response: Sequence[int],
    beam_width: int,
    beam_lengths: Sequence[int],
    hidden: np.ndarray | mx.array | None = None,
    batch: int = 128,
    prompt_lookup: int = 0,
    lookup_ngram_max: int = DEFAULT_NGRAM_MAX,
    lookup_ngram_min: int = DEFAULT_NGRAM_MIN,
) -> dict[int, AcceptanceResult]:
    """`offline_acceptance` for several beam lengths from one search of the longest: the beams
    after k steps of a beam search are those of a search of length k + 1.

    `prompt_lookup` N > 0 adds the lookup's copied branch to every tree; `drafter=None` (or
    `beam_width=0`) simulates lookup alone (the result is then keyed by each given length).
    """
    grid = offline_acceptance_grid(
        model,
        drafter,
        prompt,
        response,
        beam_width,
        beam_lengths,
        [prompt_lookup],
        hidden=hidden,
        batch=batch,
        lookup_ngram_max=lookup_ngram_max,
        lookup_ngram_min=lookup_ngram_min,
    )
    return {length: res for (length, _), res in grid.items()}


def offline_acceptance_grid(
    model: nn.Module,
    drafter: Drafter | None,
    prompt: Sequence[int],
    response: Sequence[int],
    beam_width: int,
    beam_lengths: Sequence[int],
    prompt_lookups: Sequence[int],
    hidden: np.ndarray | mx.array | None = None,
    batch: int = 128,
    lookup_ngram_max: int = DEFAULT_NGRAM_MAX,
    lookup_ngram_min: int = DEFAULT_NGRAM_MIN,
) -> dict[tuple[int, int], AcceptanceResult]:
    """Greedy acceptance for every (L, N) of one width from one beam search and one lookup
    walk per N: keyed (L, N). Without an RNN (`drafter=None` or W=0) every L gets lookup
    alone."""
    sequence = np.asarray(list(prompt) + list(response), dtype=np.int32)
    start, end = len(prompt) - 1, len(sequence) - 1
    positions = np.arange(start, end - 1)  # states whose g0 is not the last token
    lookups = sorted(set(prompt_lookups))
    copied = {
        n: lookup_lengths(sequence, positions, n, lookup_ngram_max, lookup_ngram_min)
        for n in lookups
    }
    lengths = sorted(set(beam_lengths))
    if drafter is None or beam_width == 0:
        return {
            (length, n): acceptance_walk(copied[n], start, end, n + 1)
            for length in lengths
            for n in lookups
        }
    if hidden is None:
        hidden = model.model(mx.array(sequence)[None])[0]
    hidden = mx.array(hidden).astype(mx.float32) if not isinstance(hidden, mx.array) else hidden
    embed = embed_tokens(model)
    accepted: dict[int, list[np.ndarray]] = {n: [] for n in lengths}
    for i in range(0, len(positions), batch):
        pos = positions[i : i + batch]
        steps = drafter.beam_steps(
            hidden[mx.array(pos)].astype(mx.float32),
            mx.array(sequence[pos + 1]),
            embed,
            beam_width,
            lengths[-1],
        )
        for k, (beams, _) in enumerate(steps, start=2):
            if k in accepted:
                accepted[k].append(matched_lengths(np.array(beams), sequence, pos))
    out = {}
    for length in lengths:
        runs = accepted[length]
        at = np.concatenate(runs) if runs else np.zeros(0, dtype=np.int64)
        for n in lookups:
            hybrid = np.maximum(at, copied[n])
            out[(length, n)] = acceptance_walk(hybrid, start, end, max(length, n + 1))
    return out


def mean_copy_length(
    sequences: Sequence[Sequence[int]],
    starts: Sequence[int],
    max_draft: int,
    ngram_max: int = DEFAULT_NGRAM_MAX,
    ngram_min: int = DEFAULT_NGRAM_MIN,
) -> float:
    """Mean number of tokens the lookup proposes per response position (0 where it finds no
    match): what a copied branch adds to a tree at most (less where it merges with a beam)."""
    total = count = 0
    for sequence, first in zip(sequences, starts, strict=True):
        sequence = [int(t) for t in sequence]
        if max_draft == 0 or first + 2 > len(sequence):
            continue
        lookup = PromptLookup(sequence[: first + 1], max_draft, ngram_max, ngram_min)
        for t in range(first + 1, len(sequence)):
            lookup.extend([sequence[t]])
            total += len(lookup.propose())
            count += 1
    return total / count if count else 0.0


def acceptance_by_shape(
    model: nn.Module,
    drafter: Drafter | None,
    sequences: Sequence[tuple[Sequence[int], Sequence[int]]],
    shapes: Sequence[tuple[int, int]],
    lookups: Sequence[int] = (0,),
    lookup_ngrams: tuple[int, int] = (DEFAULT_NGRAM_MAX, DEFAULT_NGRAM_MIN),
) -> dict[tuple[int, int, int], AcceptanceResult]:
    """Offline greedy acceptance per (W, L, N) over (prompt ids, response ids) pairs: one beam
    search per width and one lookup walk per N serve every length. Keys (0, 0, N) hold
    lookup alone. `lookup_ngrams` (longest, shortest) are the lookup's n-gram sizes."""
    ngrams = dict(lookup_ngram_max=lookup_ngrams[0], lookup_ngram_min=lookup_ngrams[1])
    shapes = [tuple(s) for s in shapes] if drafter is not None else []
    widths = sorted({w for w, _ in shapes})
    hiddens = [model.model(mx.array(list(p) + list(r))[None])[0] for p, r in sequences]
    mx.eval(hiddens)
    out: dict = {}

    def add(key, res):
        out[key] = res if out.get(key) is None else out[key] + res

    for (prompt, response), hidden in zip(sequences, hiddens, strict=True):
        if len(response) < 2:
            continue
        for width in widths:
            lengths = [n for w, n in shapes if w == width]
            grid = offline_acceptance_grid(
                model, drafter, prompt, response, width, lengths, lookups, hidden=hidden, **ngrams
            )
            for (length, n), res in grid.items():
                add((width, length, n), res)
        for n in lookups:
            if n:
                grid = offline_acceptance_grid(model, None, prompt, response, 0, [0], [n], **ngrams)
                add((0, 0, n), grid[(0, n)])
    return out
