"""Prompt files and the messages of each benchmark turn.

A prompt file is JSONL, one question per line: `{"question_id", "category", "turns": [...]}`
(MT-Bench's layout). The default is the 80 MT-Bench questions shipped with the package
(`data/mt_bench.jsonl`, package data), so the benchmarks run from any folder.
"""

from __future__ import annotations

from pathlib import Path

# The readers live in the engine (the tuner reads calibration files too).
from mlx_redrafter.prompt_files import Question, load_questions

__all__ = ["DATA", "DEFAULT_PROMPTS", "Question", "load_questions"]
__all__ += ["quick_subset", "turn_messages"]

DATA = Path(__file__).resolve().parent / "data"
DEFAULT_PROMPTS = DATA / "mt_bench.jsonl"


def quick_subset(questions: list[Question], n: int) -> list[Question]:
    """n questions spread over the categories (round robin, file order within a category)."""
    by_category: dict[str, list[Question]] = {}
    for q in questions:
        by_category.setdefault(q.category, []).append(q)
    chosen: list[Question] = []
    while len(chosen) < min(n, len(questions)):
        for group in by_category.values():
            if group and len(chosen) < n:
                chosen.append(group.pop(0))
    return chosen


def turn_messages(question: Question, turn: int, answers: list[str]) -> list[dict]:
    """Messages for turn `turn` (0-based): earlier turns with their answers, then the question."""
    messages: list[dict] = []
    for i in range(turn):
        messages += [
            {"role": "user", "content": question.turns[i]},
            {"role": "assistant", "content": answers[i]},
        ]
    return messages + [{"role": "user", "content": question.turns[turn]}]
