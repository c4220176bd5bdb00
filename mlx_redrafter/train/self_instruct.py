"""Self-instruct: the LLM writes its own user requests from topics x request kinds.

Small chat models follow "write a question about X" poorly (they answer it, or greet), but they
continue a list well. So the LLM sees a plain-text list of example requests (few-shot, drawn
from `topics.EXAMPLES`, one of the same kind) ending in `Topic: {topic} | Kind: {kind}` and
`Request:`, and its continuation up to the first newline is the new request. Each line is
cleaned, checked and deduplicated; every attempt is stored (instruction shards in the output
folder), so a resumed run reuses them.

Which requests are used is deterministic: (round, topic, kind) items are taken in an order
shuffled by the seed, and the first `n` distinct valid requests in that order win. Rounds past
the first reuse the pairs with other few-shot examples.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..prompt_files import read_lines
from .data import (
    Completion,
    DistillStore,
    generate_completions,
    progress_interval,
    read_instruction_attempts,
    stop_token_ids,
)
from .prompts import Prompt, make_prompt
from .topics import CODING_TOPICS, EXAMPLES, KINDS, TOPICS

SOURCE = "self-instruct"
BUILTIN = "builtin"
HEADER = "Below are requests that users sent to an AI assistant, one per line.\n\n"
NUM_SHOTS = 4
MAX_ROUNDS = 3
MAX_INSTRUCTION_TOKENS = 80
MIN_WORDS = 4
MAX_CHARS = 500


@dataclass(frozen=True)
class Item:
    round: int
    topic: str
    category: str
    kind: str

    @property
    def key(self) -> str:
        return f"{self.round}|{self.topic}|{self.kind}"


def read_topics(spec: str | Path | None) -> list[str]:
    """The built-in topics ('builtin' or None), or a text file with one topic a line."""
    if spec is None or str(spec) == BUILTIN:
        return list(TOPICS)
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"topics file {path} does not exist (or use '{BUILTIN}')")
    topics = [text for _, text in read_lines(path, "topics file")]
    topics = list(dict.fromkeys(t for t in topics if not t.startswith("#")))
    if not topics:
        raise ValueError(f"topics file {path} lists no topics")
    return topics


def plan(topics: Sequence[str], seed: int | None, rounds: int = MAX_ROUNDS) -> list[Item]:
    """Every (round, topic, kind) item, rounds in turn, pairs shuffled by the seed.

    Coding kinds pair only with the built-in programming topics (a bug fix about the French
    Revolution makes a poor request); a user's own topics pair with every kind.
    """
    builtin = set(topics) <= set(TOPICS)
    pairs = [
        (t, c, k)
        for t in topics
        for c, k in KINDS
        if c != "coding" or not builtin or t in CODING_TOPICS
    ]
    random.Random(0 if seed is None else seed).shuffle(pairs)
    return [Item(r, t, c, k) for r in range(rounds) for t, c, k in pairs]


def _stable_rng(text: str) -> random.Random:
    return random.Random(int(hashlib.sha256(text.encode()).hexdigest()[:16], 16))


def instruction_prompt(item: Item) -> str:
    """The few-shot text the LLM continues: examples, then the item's topic and kind."""
    rng = _stable_rng(item.key)
    same = [e for e in EXAMPLES if e[1] == item.kind]
    others = [e for e in EXAMPLES if e[1] != item.kind]
    # The same-kind example comes last, nearest the item: the model follows it most.
    shots = rng.sample(others, NUM_SHOTS - 1) + rng.sample(same, 1)
    lines = [f"Topic: {t} | Kind: {k}\nRequest: {r}\n\n" for t, k, r in shots]
    return HEADER + "".join(lines) + f"Topic: {item.topic} | Kind: {item.kind}\nRequest:"


_LEADING = re.compile(r"^\s*(?:request\s*:|[-*\u2022]|\d+\s*[.)])\s*", re.IGNORECASE)
_QUOTES = "\"'\u201c\u201d\u2018\u2019`"
_LABELS = re.compile(r"\b(?:topic|kind|request)\s*:", re.IGNORECASE)


def clean_instruction(raw: str, finish_reason: str | None = None) -> str | None:
    """The request in the first line of `raw`, tidied; None when it is not a usable request.

    Rejected: lines cut off by the token limit, fewer than 4 words, over 500 characters,
    leaked template labels (`Topic:`), no letters, and degenerate repetition.
    """
    if finish_reason == "length":
        return None
    text = raw.strip().split("\n", 1)[0]
    for _ in range(2):
        text = _LEADING.sub("", text).strip()
        if len(text) >= 2 and text[0] in _QUOTES and text[-1] in _QUOTES:
            text = text[1:-1].strip()
    text = " ".join(text.split())
    words = text.split()
    if len(words) < MIN_WORDS or len(text) > MAX_CHARS or not re.search(r"[A-Za-z]", text):
        return None
    if _LABELS.search(text) or _repetitive(words):
        return None
    return text


def _repetitive(words: list[str]) -> bool:
    lowered = [w.lower().strip(".,!?;:") for w in words]
    trigrams = list(zip(lowered, lowered[1:], lowered[2:], strict=False))
    if trigrams and max(trigrams.count(t) for t in set(trigrams)) >= 3:
        return True
    return len(lowered) >= 12 and len(set(lowered)) < 0.5 * len(lowered)


def dedup_key(text: str) -> str:
    """Case, punctuation and spacing do not make two requests different."""
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def select(items: Sequence[Item], attempts: dict[str, dict], n: int) -> list[tuple[Item, str]]:
    """The first `n` distinct valid requests among the attempted items, in plan order."""
    chosen, seen = [], set()
    for item in items:
        attempt = attempts.get(item.key)
        if attempt is None or attempt.get("text") is None:
            continue
        k = dedup_key(attempt["text"])
        if k not in seen:
            seen.add(k)
            chosen.append((item, attempt["text"]))
            if len(chosen) == n:
                break
    return chosen


def missing_items(
    items: Sequence[Item], attempts: dict[str, dict], n: int, min_batch: int
) -> list[Item]:
    """Unattempted items that could complete the first `n` (at least `min_batch` of them)."""
    missing, usable, seen = [], 0, set()
    for item in items:
        attempt = attempts.get(item.key)
        if attempt is None:
            if usable + len(missing) < n or len(missing) < min_batch:
                missing.append(item)
            else:
                break
        elif attempt.get("text") is not None and dedup_key(attempt["text"]) not in seen:
            seen.add(dedup_key(attempt["text"]))
            usable += 1
            if usable >= n and not missing:
                break
    return missing


def newline_token_ids(tokenizer) -> list[int]:
    """Every token id whose text contains a newline (ends an instruction line)."""
    vocab = len(tokenizer.get_vocab())
    texts = tokenizer.batch_decode([[i] for i in range(vocab)])
    return [i for i, t in enumerate(texts) if "\n" in t]


def attempt_record(item: Item, completion: Completion, tokenizer) -> dict:
    tokens = completion.tokens
    if tokens and tokens[-1] in set(stop_token_ids(tokenizer)):
        tokens = tokens[:-1]
    raw = tokenizer.decode(tokens)
    return {
        "key": item.key,
        "round": item.round,
        "topic": item.topic,
        "category": item.category,
        "kind": item.kind,
        "raw": raw,
        "finish_reason": completion.finish_reason,
        "text": clean_instruction(raw, completion.finish_reason),
    }


def self_instruct(
    model,
    tokenizer,
    store: DistillStore,
    n: int,
    topics: Sequence[str],
    *,
    seed: int | None = None,
    batch_size: int = 32,
    temp: float = 0.0,
    max_kv_tokens: int | None = None,
    progress: bool = True,
) -> list[Prompt]:
    """Write (or reuse) `n` distinct requests; return them as prompts to answer.

    Attempts are stored one shard per batch in `store` (opened), so a resumed run continues.
    Returns fewer than `n` when every (round, topic, kind) item is used up.
    """
    from tqdm import tqdm

    items = plan(topics, seed)
    by_key = {item.key: item for item in items}
    attempts = {a["key"]: a for a in read_instruction_attempts(store.folder)}
    stops = sorted(set(stop_token_ids(tokenizer)) | set(newline_token_ids(tokenizer)))
    bar = tqdm(
        total=n,
        unit="request",
        disable=not progress,
        dynamic_ncols=True,
        mininterval=progress_interval(),
    )
    bar.set_description("writing requests")
    bar.update(len(select(items, attempts, n)))
    while True:
        todo = missing_items(items, attempts, n, batch_size)
        if not todo:
            break
        prompts = []
        for item in todo:
            p = make_prompt(SOURCE, instruction_prompt(item), item.category, item.key)
            p.tokens = list(tokenizer.encode(p.text))
            prompts.append(p)
        batch: list[dict] = []
        try:
            for c in generate_completions(
                model,
                prompts,
                stop_ids=stops,
                max_tokens=MAX_INSTRUCTION_TOKENS,
                batch_size=batch_size,
                temp=temp,
                seed=seed,
                max_kv_tokens=max_kv_tokens,
            ):
                record = attempt_record(by_key[c.prompt.question_id], c, tokenizer)
                batch.append(record)
                if len(batch) >= batch_size:
                    done, batch = batch, []
                    _keep(store, done, attempts)
                have = len(select(items, attempts | {r["key"]: r for r in batch}, n))
                bar.update(have - bar.n)
        finally:
            if batch:
                _keep(store, batch, attempts)
    bar.close()
    chosen = select(items, attempts, n)
    return [make_prompt(SOURCE, text, item.category, item.key) for item, text in chosen]


def _keep(store: DistillStore, records: list[dict], attempts: dict[str, dict]) -> None:
    store.write_instructions(records)
    attempts.update({r["key"]: r for r in records})
