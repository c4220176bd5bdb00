"""The benchmark's numbers, as pure functions (unit-tested with hand-computed values).

Definitions (BENCHMARKS.md repeats them):
- tokens/s excludes prefill, as mlx-lm's `generation_tps`: generated tokens (the prefill's token
  and an end-of-sequence token included) over the time from the prefill's token to the last one;
- speedup of decoder D = median over repeats of D's tokens/s / the same median for mlx-lm's
  autoregressive decoding; for a group of prompts (a category, all), each repeat's tokens/s is
  the group's total tokens over its total decode time;
- mean accepted tokens per step = generated tokens / verification forwards (the bonus token
  counted, the prefill's token not);
- ideal speedup = mean_accepted * t(1) / (t_verify(tree) + t_draft), from profiled parts.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

# The tuner's cost model lives in the engine; the benchmark reports it.
from mlx_redrafter.tuning.choose import predicted_speedup  # noqa: F401

NEAR_TIE_TOL = 1e-4  # docs/DESIGN.md section 5: top-2 gap relative to the largest |logit|
EOS = -1  # stands for "an end-of-sequence token" in compared token lists


# ---------------------------------------------------------------------------- speed
def median(values: Iterable[float | None]) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return float(np.median(vals)) if vals else None


def percentile(values: Iterable[float | None], q: float) -> float | None:
    """The q-th percentile (0..100, linear interpolation between samples); None skipped."""
    vals = [float(v) for v in values if v is not None]
    return float(np.percentile(vals, q)) if vals else None


def median_ratio(numerator: Sequence[float | None], denominator: Sequence[float | None]):
    """median(numerator) / median(denominator); None when either is missing or zero."""
    a, b = median(numerator), median(denominator)
    if a is None or not b:
        return None
    return a / b


def tokens_per_second(tokens: int, seconds: float) -> float | None:
    return tokens / seconds if seconds > 0 and tokens > 1 else None


def group_tps(runs: Sequence[Mapping], repeat: int) -> float | None:
    """One repeat's tokens/s over a group of prompts: total tokens / total decode time."""
    chosen = [r for r in runs if r["repeat"] == repeat and r.get("decode_s")]
    seconds = sum(r["decode_s"] for r in chosen)
    tokens = sum(r["generation_tokens"] for r in chosen)
    return tokens / seconds if seconds > 0 else None


def geometric_mean(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v]
    return math.exp(sum(math.log(v) for v in vals) / len(vals)) if vals else None


# ---------------------------------------------------------------------------- acceptance
def accepted_histogram(tokens_per_step: Iterable[int], length: int | None = None) -> list[int]:
    """counts[k] = steps that emitted k tokens (k = accepted drafted tokens + the LLM's own)."""
    steps = [int(t) for t in tokens_per_step]
    size = max(length or 0, max(steps, default=0)) + 1
    return np.bincount(np.asarray(steps, dtype=np.int64), minlength=size).tolist()


def add_histograms(histograms: Iterable[Sequence[int]]) -> list[int]:
    total: list[int] = []
    for hist in histograms:
        if len(hist) > len(total):
            total += [0] * (len(hist) - len(total))
        for i, count in enumerate(hist):
            total[i] += count
    return total


def histogram_mean(hist: Sequence[int]) -> float | None:
    steps = sum(hist)
    return sum(k * c for k, c in enumerate(hist)) / steps if steps else None


def mean_accepted(generated_tokens: int, verification_steps: int) -> float | None:
    """Generated tokens per verification forward; the prefill's token is not counted."""
    return (generated_tokens - 1) / verification_steps if verification_steps else None


# ---------------------------------------------------------------------------- parity
def first_divergence(expected: Sequence[int], got: Sequence[int]) -> int | None:
    """First index where the two token lists differ (a length difference counts); else None."""
    n = min(len(expected), len(got))
    for i in range(n):
        if expected[i] != got[i]:
            return i
    return None if len(expected) == len(got) else n


def near_tie(
    logits: np.ndarray,
    expected_token: int | None,
    got_token: int | None,
    eos_ids: Iterable[int] = (),
    tol: float = NEAR_TIE_TOL,
) -> tuple[bool, float]:
    """Is a divergence at these logits a floating-point near-tie? Returns (tie, relative gap).

    The rule of mlx_redrafter.benchmarks.tiny.first_divergence_is_tie (docs/DESIGN.md section 5):
    the reference's top-2 logits are within `tol` of each other relative to the largest |logit|,
    and both tokens are those two. `EOS` stands for any id in `eos_ids`; None (one output was cut
    by max_tokens) never ties.
    """
    logits = np.asarray(logits, dtype=np.float64).reshape(-1)
    order = np.argsort(logits)
    top2 = [int(order[-1]), int(order[-2])]
    scale = float(np.abs(logits).max()) or 1.0
    gap = float(logits[top2[0]] - logits[top2[1]]) / scale
    eos = set(eos_ids)

    def contender(token) -> bool:
        if token is None:
            return False
        if token == EOS:
            return any(t in eos for t in top2)
        return token in top2

    return bool(gap < tol and contender(expected_token) and contender(got_token)), gap


def with_eos(tokens: Sequence[int], eos_ids: Iterable[int], ended_by_eos: bool) -> list[int]:
    """Tokens up to the first end-of-sequence id, then `EOS` when the output ended with one."""
    eos = set(eos_ids)
    out = []
    for t in tokens:
        if t in eos:
            return out + [EOS]
        out.append(int(t))
    return out + [EOS] if ended_by_eos else out


def token_at(tokens: Sequence[int], i: int) -> int | None:
    return tokens[i] if i < len(tokens) else None


# ---------------------------------------------------------------------------- where time goes
def ideal_speedup(
    accepted_per_step: float, t_one: float, t_verify: float, t_draft: float
) -> float | None:
    """mean_accepted * t(1) / (t_verify(tree) + t_draft): the speedup if nothing else cost."""
    denom = t_verify + t_draft
    return accepted_per_step * t_one / denom if denom > 0 else None


def efficiency(measured: float | None, ideal: float | None) -> float | None:
    return measured / ideal if measured is not None and ideal else None


def shares(parts: Mapping[str, float]) -> dict[str, float]:
    total = sum(parts.values())
    return {k: (v / total if total > 0 else 0.0) for k, v in parts.items()}
