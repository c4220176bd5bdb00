"""Calibration: the answers the LLM itself writes to a few prompts (greedy, by the engine's own
decode loop), and the per-step time outside the forward that those steps measured.

Calibration prompts are never MT-Bench (the benchmark's evaluation set): by default a short
built-in set written for this purpose, or a JSONL file, e.g. one shipped with the drafter.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from ..chat_template import chat_tokens, messages_for

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


def load_calibration_prompts(path: str | Path | None = None, limit: int = 4) -> list[str]:
    """The first `limit` built-in prompts, or the first turns of a JSONL prompt file."""
    if path is None:
        return list(CALIBRATION_PROMPTS[:limit])
    from ..prompt_files import load_questions

    return [q.turns[0] for q in load_questions(path, limit=limit)]


def calibration_answers(
    model: nn.Module, tokenizer, prompts: Sequence[str], max_tokens: int
) -> tuple[list[tuple[list[int], list[int]]], float]:
    """The LLM's greedy answers as (prompt ids, response ids), and the mean seconds per step
    spent outside the forward (accept, commit, Python): the cost model's overhead.

    The engine writes them (`generate_step`, `drafter=None`, guard off) with a synced
    `PhaseTimer` probe, which runs one-token tree steps so that the forward can be told apart.
    """
    import time

    from ..generate import generate_step
    from ..probe import PhaseTimer

    sequences, steps, overhead = [], 0, 0.0
    eos = set(tokenizer.eos_token_ids)
    for text in prompts:
        ids = chat_tokens(tokenizer, messages_for(None, (), text))
        timer = PhaseTimer()
        stream = generate_step(
            mx.array(ids, dtype=mx.int32),
            model,
            None,
            max_tokens=max_tokens,
            guard=False,
            probe=timer,
        )
        out, _ = next(stream)  # the prefill's token
        tic = time.perf_counter()
        if out[0] not in eos:
            for new, _stats in stream:
                out += new
                if any(t in eos for t in new):
                    break
        decode_s = time.perf_counter() - tic
        stream.close()
        sequences.append((ids, [t for t in out if t not in eos]))
        steps += timer.steps
        overhead += decode_s - timer.seconds["verify"]
    return sequences, (overhead / steps if steps else 0.0)
