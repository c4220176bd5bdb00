"""Prompt sources for distillation: JSONL question files, plain-text files, chat templating.

A `Prompt` is one user message with a stable id: a hash of its source name and its text, so the
same prompt read again (a resumed run, another machine) maps to the same stored record, and two
sources may hold the same text without colliding.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..chat_template import chat_tokens, messages_for
from ..prompt_files import is_jsonl, read_jsonl, read_lines


@dataclass
class Prompt:
    id: str  # prompt_id(source, text)
    source: str  # file name (or "self-instruct")
    text: str  # the user message (first turn)
    category: str | None = None
    question_id: str | int | None = None
    tokens: list[int] = field(default_factory=list, repr=False)  # chat-templated token ids


def prompt_id(source: str, text: str) -> str:
    """Stable 16-hex-digit id of a prompt: sha256 over its source and text."""
    return hashlib.sha256(f"{source}\x00{text}".encode()).hexdigest()[:16]


def make_prompt(source: str, text: str, category=None, question_id=None) -> Prompt:
    return Prompt(prompt_id(source, text), source, text, category, question_id)


def read_prompts(path: str | Path, limit: int | None = None) -> list[Prompt]:
    """Read a prompt file: JSONL (`turns`, first turn used) by suffix, else one prompt a line.

    JSONL rows may also give the text as `prompt`, `instruction` or `text`; `category` and
    `question_id` are kept when present. Blank lines are skipped; duplicates are dropped. A file
    with no prompts is an error: a run on it would silently do nothing.
    """
    path = Path(path)
    source = path.name
    if is_jsonl(path):
        prompts = [
            make_prompt(
                source, _first_turn(row, f"{path}:{n}"), row.get("category"), row.get("question_id")
            )
            for n, row in read_jsonl(path)
        ]
    else:
        prompts = [make_prompt(source, text, None, n) for n, text in read_lines(path)]
    if not prompts:
        raise ValueError(f"prompt file {path} holds no prompts")
    prompts = unique_prompts(prompts)
    return prompts[:limit] if limit is not None else prompts


def _first_turn(row: dict, where: str) -> str:
    turns = row.get("turns")
    if turns:
        if not isinstance(turns, list):
            raise ValueError(f"{where}: `turns` must be a list of messages")
        text = turns[0]
        if isinstance(text, dict):  # {"role": ..., "content": ...}
            text = text.get("content", "")
    else:
        text = row.get("prompt") or row.get("instruction") or row.get("text")
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{where}: no prompt text (expected `turns`, `prompt` or `text`)")
    return text


def unique_prompts(prompts: Iterable[Prompt]) -> list[Prompt]:
    """Drop repeated ids, keeping the first occurrence and the order."""
    seen = set()
    out = []
    for p in prompts:
        if p.id not in seen:
            seen.add(p.id)
            out.append(p)
    return out


def tokenize_prompts(tokenizer, prompts: Sequence[Prompt], system: str | None = None) -> None:
    """Fill in each prompt's chat-templated token ids."""
    for p in prompts:
        p.tokens = chat_tokens(tokenizer, messages_for(system, (), p.text))
