"""Prompt files and chat prompts.

A prompt file is JSONL, one question per line: `{"question_id", "category", "turns": [...]}`
(MT-Bench's layout). The default is the 80 MT-Bench questions shipped with the package
(`data/mt_bench.jsonl`, package data), so the benchmarks run from any folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mlx_redrafter.prompt_files import read_jsonl

DATA = Path(__file__).resolve().parent / "data"
DEFAULT_PROMPTS = DATA / "mt_bench.jsonl"


@dataclass
class Question:
    question_id: str
    category: str
    turns: list[str]


def load_questions(path: str | Path, limit: int | None = None) -> list[Question]:
    """The questions of a JSONL prompt file; errors name the file and the line."""
    questions = []
    for n, row in read_jsonl(path):
        turns = row.get("turns") or ([row["prompt"]] if "prompt" in row else None)
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns):
            raise ValueError(f"{path}:{n}: needs a list of strings under 'turns'")
        questions.append(
            Question(str(row.get("question_id", n)), str(row.get("category", "all")), turns)
        )
    if not questions:
        raise ValueError(f"prompt file {path} holds no questions")
    return questions[:limit] if limit is not None else questions


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


def chat_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of the chat-templated conversation, or of the last message without template."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        if isinstance(ids, str):
            ids = tokenizer.encode(ids, add_special_tokens=False)
        return [int(t) for t in ids]
    return [int(t) for t in tokenizer.encode(messages[-1]["content"])]


def turn_messages(question: Question, turn: int, answers: list[str]) -> list[dict]:
    """Messages for turn `turn` (0-based): earlier turns with their answers, then the question."""
    messages: list[dict] = []
    for i in range(turn):
        messages += [
            {"role": "user", "content": question.turns[i]},
            {"role": "assistant", "content": answers[i]},
        ]
    return messages + [{"role": "user", "content": question.turns[turn]}]
