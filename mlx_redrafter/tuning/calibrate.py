"""Calibration: the answers the LLM itself writes to a few prompts (greedy, by the engine's own
decode loop), and the per-step time outside the forward that those steps measured.

Calibration prompts are never MT-Bench (the benchmark's evaluation set): by default a short
built-in set written for this purpose, or a JSONL file, e.g. one shipped with the drafter.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from ..chat_template import chat_tokens, messages_for

# Half of them carry a text to work on (restate, annotate, extract, correct), as real requests
# often do: that is where copying from the context (prompt lookup) pays, and a set of free
# questions alone hides it from the tuner. The order alternates, so that the first 4 (the
# default set, which the online confirmation runs too) hold both kinds.
CALIBRATION_PROMPTS = (
    "Rewrite this recipe as a numbered list of steps, keeping every quantity:\n"
    "Pancakes. Whisk 200 g of flour with 2 teaspoons of baking powder and a pinch of salt. "
    "In another bowl beat 2 eggs with 300 ml of milk and 30 g of melted butter. Pour the wet "
    "ingredients into the dry ones and stir until just combined. Heat a lightly oiled pan over "
    "medium heat, pour 3 tablespoons of batter per pancake and cook for 2 minutes on each side.",
    "Explain how a refrigerator keeps food cold, step by step.",
    "Add a short comment above each line of this Python function, then explain what it "
    "returns:\n```python\ndef merge_counts(first, second):\n    merged = dict(first)\n"
    "    for key, value in second.items():\n        merged[key] = merged.get(key, 0) + value\n"
    "    return sorted(merged.items(), key=lambda item: item[1], reverse=True)\n```",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "List every person, date and place named in this paragraph as JSON:\n"
    "On 14 March 1879 Albert Einstein was born in Ulm. His family moved to Munich in 1880, "
    "and in 1896 he entered the Swiss Federal Polytechnic in Zurich, where he met Mileva "
    "Maric. He worked at the patent office in Bern from 1902 to 1909.",
    "Give me five practical tips for learning to cook at home.",
    "Correct the grammar and spelling of this email and keep its meaning:\n"
    "Hi Sam, i wanted to let you know that the meeting have been moved to thursday at 3pm. "
    "Please bring the report we was discussing last week, and dont forget the budget numbers. "
    "Let me know if their is any problem with the new time. Thanks, Alex",
    "Write a friendly email inviting a colleague to a team lunch on Friday.",
)


def load_calibration_prompts(path: str | Path | None = None, limit: int = 4) -> list[str]:
    """The first `limit` built-in prompts, or the first turns of a JSONL prompt file."""
    if path is None:
        return list(CALIBRATION_PROMPTS[:limit])
    from ..prompt_files import load_questions

    return [q.turns[0] for q in load_questions(path, limit=limit)]


def calibration_prompt_list(prompts: str | Path | Iterable[str] | None, limit: int) -> list[str]:
    """The calibration prompts a tuner uses: the built-in ones (None), a JSONL file's first
    turns (a path), or the caller's own strings, at most `limit` of them."""
    if prompts is None or isinstance(prompts, str | Path):
        return load_calibration_prompts(prompts, limit=limit)
    return list(prompts)[:limit]


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
