"""Acceptance evaluation: mean tokens per LLM verification step, offline and online.

Offline: simulated along answers the LLM itself wrote (`tuning.simulate`, the engine's module,
re-exported here): exact for greedy decoding up to floating-point near-ties.

Online: the real engine generates, and the figure is its own count.
"""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..drafter import Drafter
from ..lookup import DEFAULT_NGRAM_MAX, DEFAULT_NGRAM_MIN
from ..tuning.simulate import (
    AcceptanceResult,
    acceptance_walk,
    lookup_lengths,
    matched_lengths,
    mean_copy_length,
    offline_acceptance,
    offline_acceptance_by_length,
    offline_acceptance_grid,
)

__all__ = [
    "AcceptanceResult",
    "acceptance_walk",
    "lookup_lengths",
    "matched_lengths",
    "mean_copy_length",
    "offline_acceptance",
    "offline_acceptance_by_length",
    "offline_acceptance_grid",
    "online_acceptance",
]


def online_acceptance(
    model: nn.Module,
    drafter: Drafter,
    prompt: Sequence[int],
    max_tokens: int,
    beam_width: int,
    beam_length: int,
    eos_ids: Sequence[int] = (),
    temp: float = 0.0,
    accept: str = "exact",
    seed: int | None = None,
    prompt_lookup: int = 0,
    lookup_ngram_max: int = DEFAULT_NGRAM_MAX,
    lookup_ngram_min: int = DEFAULT_NGRAM_MIN,
) -> tuple[AcceptanceResult, list[int]]:
    """Run the real engine (greedy, or sampling with an `accept` rule); returns its acceptance
    and its output (through EOS)."""
    from ..generate import generate_step

    hist = np.zeros(max(beam_length, prompt_lookup + 1) + 1, dtype=np.int64)
    out: list[int] = []
    tokens = steps = 0
    eos = set(eos_ids)
    for new, stats in generate_step(
        mx.array(list(prompt)),
        model,
        drafter,
        max_tokens=max_tokens,
        beam_width=beam_width,
        beam_length=beam_length,
        temp=temp,
        accept=accept,
        seed=seed,
        prompt_lookup=prompt_lookup,
        lookup_ngram_max=lookup_ngram_max,
        lookup_ngram_min=lookup_ngram_min,
        guard=False,  # acceptance of the drafter, not the speed guard's choices
    ):
        cut = next((i + 1 for i, t in enumerate(new) if t in eos), len(new))
        new = new[:cut]
        out += new
        if not stats.prefill:
            hist[len(new)] += 1
            tokens += len(new)
            steps += 1
        if any(t in eos for t in new):
            break
    return AcceptanceResult(tokens, steps, hist), out
