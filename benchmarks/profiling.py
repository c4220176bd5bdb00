"""Phase timings of the engine's own decode loop.

`mlx_redrafter.generate._decode_steps` runs draft -> pack -> verify -> accept -> commit with two
host syncs per step; MLX is lazy, so the time of a phase is only visible with a sync after it.
`profiled_decode` runs that loop (`generate_step`, greedy, guard off) with a
`probe.PhaseTimer`, which, with `sync=True`, evaluates each phase's outputs before its clock
stops. The extra syncs cost time, so phase figures come from this separate pass, never from
the timed runs. The engine overlaps some of these phases, which this pass cannot show: with
`drafter=None` it pipelines one-token steps as mlx-lm does (a probe runs one-token tree steps
instead), and at W=1 it queues the verification behind the draft without sync 1.

`forced_accept` replaces the accepted length of each step with a drawn one (the step still runs
and pays for every phase): end-to-end cost at a chosen acceptance distribution, on models whose
outputs mean nothing (random weights on the GPU script). Output tokens are then meaningless.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

from mlx_redrafter.generate import generate_step
from mlx_redrafter.probe import PHASES, PhaseTimer

__all__ = ["PHASES", "ProfileResult", "combine", "phase_summary", "profiled_decode"]


@dataclass
class ProfileResult:
    tokens: list[int]  # generated ids (prefill's token first)
    steps: int  # verification forwards
    seconds: dict[str, float]  # summed time per phase, plus "other" (loop bookkeeping)
    decode_s: float  # wall time of all steps (prefill excluded)
    prefill_s: float
    tree_sizes: list[int] = field(default_factory=list)
    tokens_per_step: list[int] = field(default_factory=list)

    @property
    def generated(self) -> int:
        return len(self.tokens)

    @property
    def mean_accepted(self) -> float | None:
        """Tokens emitted per verification step (the prefill's token not counted)."""
        return sum(self.tokens_per_step) / self.steps if self.steps else None

    def per_step(self, phase: str) -> float | None:
        return self.seconds[phase] / self.steps if self.steps else None

    def to_json(self) -> dict:
        return {
            "steps": self.steps,
            "generated_tokens": self.generated,
            "mean_accepted": self.mean_accepted,
            "decode_s": self.decode_s,
            "prefill_s": self.prefill_s,
            "seconds": self.seconds,
            "mean_tree_size": float(np.mean(self.tree_sizes)) if self.tree_sizes else None,
        }


def profiled_decode(
    model,
    drafter,
    prompt: Iterable[int],
    *,
    max_tokens: int,
    beam_width: int = 4,
    beam_length: int = 5,
    eos_ids: Iterable[int] = (),
    sync: bool = True,
    forced_accept: Callable[[], int] | None = None,
    prompt_lookup: int = 0,
) -> ProfileResult:
    """Greedy decoding by the engine (`generate_step`, guard off) with a `PhaseTimer` probe;
    phase times summed over steps, stopping at an end-of-sequence token.

    `drafter=None` runs one-token tree steps (the engine's autoregressive path without its
    pipelining). With `sync=False` only the engine's own syncs remain; phase times are then
    not meaningful.
    """
    eos = set(eos_ids)
    timer = PhaseTimer(sync=sync, forced_accept=forced_accept)
    tic = time.perf_counter()
    steps = generate_step(
        mx.array(list(prompt), dtype=mx.int32),
        model,
        drafter,
        max_tokens=max_tokens,
        beam_width=beam_width,
        beam_length=beam_length,
        prompt_lookup=prompt_lookup,
        guard=False,
        probe=timer,
    )
    out, _ = next(steps)  # the prefill's token
    prefill_s = time.perf_counter() - tic
    tree_sizes: list[int] = []
    per_step: list[int] = []
    start = time.perf_counter()
    if out[0] not in eos:
        for new, stats in steps:
            if forced_accept is None and any(t in eos for t in new):
                new = new[: next(i for i, t in enumerate(new) if t in eos) + 1]
            out += new
            tree_sizes.append(stats.tree_size)
            per_step.append(len(new))
            if forced_accept is None and new[-1] in eos:
                break
    decode_s = time.perf_counter() - start
    steps.close()
    seconds = {**timer.seconds, "other": max(decode_s - sum(timer.seconds.values()), 0.0)}
    return ProfileResult(
        tokens=out,
        steps=len(per_step),
        seconds=seconds,
        decode_s=decode_s,
        prefill_s=prefill_s,
        tree_sizes=tree_sizes,
        tokens_per_step=per_step,
    )


def combine(results: list[ProfileResult]) -> ProfileResult | None:
    """One result summing several runs' steps and phase times."""
    if not results:
        return None
    return ProfileResult(
        tokens=[t for r in results for t in r.tokens],
        steps=sum(r.steps for r in results),
        seconds={k: sum(r.seconds[k] for r in results) for k in results[0].seconds},
        decode_s=sum(r.decode_s for r in results),
        prefill_s=sum(r.prefill_s for r in results),
        tree_sizes=[s for r in results for s in r.tree_sizes],
        tokens_per_step=[s for r in results for s in r.tokens_per_step],
    )


def phase_summary(ar: ProfileResult | None, rd: ProfileResult | None) -> dict:
    """Per-step phase times and shares for the engine's AR path and for ReDrafter."""
    out = {}
    for name, res in (("ours_ar", ar), ("redrafter", rd)):
        if res is None or not res.steps:
            continue
        draft = res.seconds["draft"] + res.seconds["pack"]
        verify = res.seconds["verify"]
        accept_commit = res.seconds["accept"] + res.seconds["commit"] + res.seconds["other"]
        total = draft + verify + accept_commit
        out[name] = {
            **res.to_json(),
            "per_step_s": {
                "draft": draft / res.steps,
                "verify": verify / res.steps,
                "accept_commit": accept_commit / res.steps,
                "total": total / res.steps,
            },
            "shares": {
                "draft": draft / total if total else 0.0,
                "verify": verify / total if total else 0.0,
                "accept_commit": accept_commit / total if total else 0.0,
            },
        }
    return out
