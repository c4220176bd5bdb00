"""Beam shape from measured costs: `choose_shape(model, drafter, tokenizer) -> (W, L)`.

For each shape (W, L) the predicted speedup over one-token steps is

    mean_accepted(W, L) * (t(1) + o) / (t(n(W, L)) + t_draft(W, L) + o)

- mean_accepted: greedy acceptance simulated offline (`train.evaluate.offline_acceptance`,
  exact for greedy decoding up to near-ties) along calibration answers the LLM itself wrote;
- t(n): the LLM forward time over the shape's mean packed tree size n (measured, `cost_curve`);
- t_draft: the beam search with its host sync and packing (measured);
- o: the per-step time outside forward and draft (accept, commit, Python), measured while the
  calibration answers are generated.

Calibration prompts are never MT-Bench (the benchmark's evaluation set): by default a short
built-in set written for this purpose, or a JSONL file (`prompts=`), e.g. one shipped with the
drafter. The choice is cached per device, model, drafter, grid, calibration set, package
version and `TUNER_VERSION` in `<cache_home>/autotune/`.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

import mlx_redrafter
from mlx_redrafter.train.evaluate import offline_acceptance

from .cost_curve import draft_costs, filled_cache, interpolate, sample_states, time_forward
from .metrics import predicted_speedup
from .profiling import profiled_decode
from .prompts import chat_prompt

# Part of the cache key. Bump it whenever the decode step or the beam search changes cost
# (2: the beam search reads each row's top-50 candidates, and greedy W=1 skips a sync), so
# that shapes tuned against the old costs are measured again instead of reused.
TUNER_VERSION = 2
DEFAULT_SHAPES = tuple((w, l) for w in (1, 2, 3, 4, 8) for l in (2, 3, 4, 5, 6))  # noqa: E741
CALIBRATION_PROMPTS = (
    "Explain how a refrigerator keeps food cold, step by step.",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Give me five practical tips for learning to cook at home.",
    "Write a Python function that returns the n-th Fibonacci number, with a docstring.",
    "Summarize the main causes of the water cycle in a paragraph.",
    "Compare trains and airplanes for a 500 km trip: cost, time and comfort.",
    "Write a friendly email inviting a colleague to a team lunch on Friday.",
    "What are common misconceptions about sleep? List a few and correct them.",
)


@dataclass
class ShapeEstimate:
    beam_width: int
    beam_length: int
    mean_accepted: float
    histogram: list[int]
    tree_size: float
    draft_s: float
    verify_s: float
    predicted_speedup: float


# ---------------------------------------------------------------------------- identity
def device_description() -> str:
    from mlx_redrafter._blas import blas_description

    info = {}
    try:
        info = mx.device_info()
    except Exception:  # older MLX or a back-end without it
        pass
    name = info.get("device_name") or platform.processor() or "unknown"
    return (
        f"{mx.default_device()} | {name} | {platform.machine()} | cores={os.cpu_count()} | "
        f"BLAS: {blas_description()} | mlx {mx.__version__}"
    )


def fingerprint(module) -> str:
    """A short hash of a module's parameter names, shapes, dtypes and a sample of values."""
    h = hashlib.sha256()
    for name, value in sorted(tree_flatten(module.parameters()), key=lambda kv: kv[0]):
        h.update(f"{name}:{tuple(value.shape)}:{value.dtype};".encode())
        sample = value.reshape(-1)[:64].astype(mx.float32)
        h.update(np.array(sample).tobytes())
    return h.hexdigest()[:16]


def cache_path(key: dict, cache_dir: str | Path | None = None) -> Path:
    from mlx_redrafter.default_model import cache_home

    root = Path(cache_dir) if cache_dir is not None else cache_home() / "autotune"
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return root / f"{digest}.json"


# ---------------------------------------------------------------------------- estimates
def acceptance_by_shape(model, drafter, sequences, shapes) -> dict:
    """Offline greedy acceptance per shape over (prompt ids, response ids) pairs."""
    hiddens = [model.model(mx.array(list(p) + list(r))[None])[0] for p, r in sequences]
    mx.eval(hiddens)
    out = {}
    for width, length in shapes:
        total = None
        for (prompt, response), hidden in zip(sequences, hiddens, strict=True):
            if len(response) < 2:
                continue
            res = offline_acceptance(model, drafter, prompt, response, width, length, hidden=hidden)
            total = res if total is None else total + res
        out[(width, length)] = total
    return out


def estimate_shapes(
    model,
    drafter,
    sequences: Sequence[tuple[list[int], list[int]]],
    shapes: Iterable[tuple[int, int]] = DEFAULT_SHAPES,
    *,
    cache_len: int = 256,
    overhead_s: float = 0.0,
    curve: dict[int, float] | None = None,
    repeats: int = 3,
    log: Callable[[str], None] | None = None,
) -> tuple[list[ShapeEstimate], dict[int, float]]:
    """Predicted speedup per shape; also returns the forward-time curve it measured."""
    shapes = list(shapes)
    say = log or (lambda _msg: None)
    say(f"autotune: offline acceptance for {len(shapes)} shapes on {len(sequences)} answers")
    acceptance = acceptance_by_shape(model, drafter, sequences, shapes)
    say("autotune: beam-search cost per shape")
    states = sample_states(model, [list(p) + list(r) for p, r in sequences], count=4)
    drafts = draft_costs(model, drafter, shapes, states, repeats=max(1, repeats - 1))
    curve = dict(curve or {})
    needed = {1} | {max(1, int(round(d["tree_size"]))) for d in drafts.values()}
    missing = sorted(n for n in needed if n not in curve)
    if missing:
        say(f"autotune: forward time at {missing} tokens after a {cache_len}-token cache")
        cache = filled_cache(model, cache_len)
        for n in missing:
            curve[n] = time_forward(model, cache, n, repeats=repeats)
    estimates = []
    for width, length in shapes:
        acc = acceptance[(width, length)]
        mean = acc.mean if acc is not None else 1.0
        size = drafts[(width, length)]["tree_size"]
        verify_s = interpolate(curve, size)
        draft_s = drafts[(width, length)]["draft_s"]
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
            )
        )
    return estimates, curve


def best_shape(estimates: Sequence[ShapeEstimate]) -> ShapeEstimate:
    """Highest predicted speedup; among near-equal ones (within 0.5%) the smaller tree."""
    top = max(e.predicted_speedup for e in estimates)
    close = [e for e in estimates if e.predicted_speedup >= top * 0.995]
    return min(close, key=lambda e: (e.tree_size, e.beam_width, e.beam_length))


# ---------------------------------------------------------------------------- calibration
def load_calibration_prompts(path: str | Path | None = None, limit: int = 4) -> list[str]:
    if path is None:
        return list(CALIBRATION_PROMPTS[:limit])
    from .prompts import load_questions

    return [q.turns[0] for q in load_questions(path, limit=limit)]


def calibration_answers(model, tokenizer, prompts: Sequence[str], max_tokens: int):
    """The LLM's greedy answers (engine, one-token steps), and per-step overhead seconds."""
    sequences, steps, overhead = [], 0, 0.0
    eos = tokenizer.eos_token_ids
    for text in prompts:
        ids = chat_prompt(tokenizer, [{"role": "user", "content": text}])
        res = profiled_decode(model, None, ids, max_tokens=max_tokens, eos_ids=eos)
        response = [t for t in res.tokens if t not in set(eos)]
        sequences.append((ids, response))
        steps += res.steps
        overhead += res.decode_s - res.seconds["verify"]
    return sequences, (overhead / steps if steps else 0.0)


def autotune(
    model,
    drafter,
    tokenizer,
    *,
    prompts: Sequence[str] | str | Path | None = None,
    shapes: Iterable[tuple[int, int]] = DEFAULT_SHAPES,
    max_tokens: int = 64,
    num_prompts: int = 4,
    cache_len: int = 256,
    use_cache: bool = True,
    refresh: bool = False,
    cache_dir: str | Path | None = None,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Measure and predict every shape; returns the record (cached) with `choice` = [W, L]."""
    if prompts is None or isinstance(prompts, str | Path):
        prompt_list = load_calibration_prompts(prompts, limit=num_prompts)
    else:
        prompt_list = list(prompts)[:num_prompts]
    shapes = [tuple(s) for s in shapes]
    key = {
        "tuner": TUNER_VERSION,
        "package": mlx_redrafter.__version__,
        "device": device_description(),
        "model": fingerprint(model),
        "drafter": fingerprint(drafter),
        "shapes": shapes,
        "prompts": hashlib.sha256("\n".join(prompt_list).encode()).hexdigest()[:16],
        "max_tokens": max_tokens,
        "cache_len": cache_len,
    }
    path = cache_path(key, cache_dir)
    if use_cache and not refresh and path.is_file():
        try:
            record = json.loads(path.read_text())
            if record.get("key") == json.loads(json.dumps(key)):
                record["cached"] = str(path)
                return record
        except (OSError, json.JSONDecodeError):
            pass
    say = log or (lambda _msg: None)
    tic = time.perf_counter()
    say(f"autotune: greedy calibration answers for {len(prompt_list)} prompts")
    sequences, overhead = calibration_answers(model, tokenizer, prompt_list, max_tokens)
    estimates, curve = estimate_shapes(
        model, drafter, sequences, shapes, cache_len=cache_len, overhead_s=overhead, log=log
    )
    best = best_shape(estimates)
    record = {
        "key": key,
        "choice": [best.beam_width, best.beam_length],
        "predicted_speedup": best.predicted_speedup,
        "overhead_s": overhead,
        "forward_curve_s": {str(n): t for n, t in sorted(curve.items())},
        "estimates": [asdict(e) for e in estimates],
        "seconds": time.perf_counter() - tic,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(record, indent=1) + "\n")
        tmp.replace(path)
    record["cached"] = None
    return record


def choose_shape(model, drafter, tokenizer, **kwargs) -> tuple[int, int]:
    """(W, L) with the best predicted speedup on this device (see `autotune` for options)."""
    width, length = autotune(model, drafter, tokenizer, **kwargs)["choice"]
    return int(width), int(length)


def auto_grid(width: int | str, length: int | str) -> list[tuple[int, int]]:
    """The shapes to tune over when W and/or L is 'auto': a fixed value pins its axis."""
    widths = sorted({w for w, _ in DEFAULT_SHAPES}) if width == "auto" else [int(width)]
    lengths = sorted({n for _, n in DEFAULT_SHAPES}) if length == "auto" else [int(length)]
    return [(w, n) for w in widths for n in lengths]


def resolve_shape(
    model, drafter, tokenizer, width: int | str, length: int | str, **kwargs
) -> tuple[int, int]:
    """(W, L) with any 'auto' replaced by the tuned value (measured once, then cached)."""
    if "auto" not in (width, length):
        return int(width), int(length)
    return choose_shape(model, drafter, tokenizer, shapes=auto_grid(width, length), **kwargs)
