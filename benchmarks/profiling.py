"""The engine's greedy decode step, re-composed from its module functions, with phase timers.

`mlx_redrafter.generate._decode_steps` runs draft -> pack -> verify -> accept -> commit with two
host syncs per step; MLX is lazy, so the time of a phase is only visible with a sync after it.
`profiled_decode` calls the same functions (`Drafter.beam_search`, `tree.pack_tree`,
`verify.verify_tree`, `accept.greedy_accept`, `cache.commit`) in the same order and, with
`sync=True`, evaluates after each phase to time it. The extra syncs cost time, so phase figures
come from this separate pass, never from the timed runs. Greedy only; its output equals the
engine's (checked in tests). The engine overlaps some of these phases, which this pass cannot
show: with `drafter=None` it pipelines one-token steps as mlx-lm does, and at W=1 it queues the
verification behind the draft without sync 1.

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

from mlx_redrafter.accept import greedy_accept
from mlx_redrafter.cache import commit, make_tree_cache
from mlx_redrafter.generate import prefill
from mlx_redrafter.tree import pack_tree
from mlx_redrafter.verify import embed_tokens, verify_tree

PHASES = ("draft", "pack", "verify", "accept", "commit")


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
) -> ProfileResult:
    """Greedy decoding as the engine does it; phase times summed over steps.

    `drafter=None` runs one-token tree steps (the engine's autoregressive path without its
    pipelining). With `sync=False` only the engine's two syncs per step remain (W > 1; the
    engine itself skips the first at greedy W=1); phase times are then not meaningful.
    """
    eos = set(eos_ids)
    width, length = (beam_width, beam_length) if drafter is not None else (1, 1)
    cache = make_tree_cache(model)
    embed = embed_tokens(model)
    seconds = dict.fromkeys((*PHASES, "other"), 0.0)
    tree_sizes: list[int] = []
    per_step: list[int] = []

    tic = time.perf_counter()
    hidden, logits = prefill(model, cache, mx.array(list(prompt), dtype=mx.int32))
    g0 = int(mx.argmax(logits[-1]).item())
    prefill_s = time.perf_counter() - tic
    out = [g0]

    start = time.perf_counter()
    while len(out) < max_tokens and g0 not in eos:
        t0 = time.perf_counter()
        # 1. draft
        if drafter is not None:
            beams, _ = drafter.beam_search(hidden, mx.array(g0), embed, width, length)
            beams_host = np.array(beams)  # the engine's sync 1
        else:
            beams_host = np.array([[g0]], dtype=np.int32)
        t1 = time.perf_counter()
        # 2. pack
        tree = pack_tree(beams_host)
        t2 = time.perf_counter()
        # 3. verify
        cache_len = cache[0].offset
        tree_hidden, tree_logits = verify_tree(model, cache, tree, mx.array(tree.tokens))
        if sync:
            mx.eval(tree_hidden, tree_logits)
        t3 = time.perf_counter()
        # 4. accept
        decision = greedy_accept(
            mx.array(beams_host), mx.argmax(tree_logits, axis=-1)[mx.array(tree.unpacker)]
        )
        best, n, next_token = decision.to_host()  # the engine's sync 2
        if forced_accept is not None:
            best, n = 0, min(int(forced_accept()), length - 1)
        new_tokens = beams_host[best, 1 : n + 1].tolist() + [next_token]
        new_tokens = new_tokens[: max_tokens - len(out)]
        t4 = time.perf_counter()
        # 5. commit
        path = tree.path(best, len(new_tokens))
        commit(cache, cache_len, path)
        hidden = tree_hidden[int(path[-1])]
        if sync:
            mx.eval([c.state for c in cache], hidden)
        t5 = time.perf_counter()

        if forced_accept is None and any(t in eos for t in new_tokens):
            new_tokens = new_tokens[: next(i for i, t in enumerate(new_tokens) if t in eos) + 1]
        out += new_tokens
        g0 = new_tokens[-1]
        tree_sizes.append(tree.size)
        per_step.append(len(new_tokens))
        marks = (t0, t1, t2, t3, t4, t5)
        for i, phase in enumerate(PHASES):
            seconds[phase] += marks[i + 1] - marks[i]
    decode_s = time.perf_counter() - start
    seconds["other"] = max(decode_s - sum(seconds[p] for p in PHASES), 0.0)
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
