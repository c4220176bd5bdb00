"""Distillation data: the LLM answers prompts in batches; answers go to append-only shards.

Layout of an output folder (one folder = one model and one set of generation settings):

    manifest.json              model, settings, counts, shard list (a summary; shards are the truth)
    shard-00000.jsonl.gz       one JSON record per answered prompt (token ids as lists)
    topk-00000.npz             top-k log-probs for shard 00000, when asked for (large: git-ignored)
    instructions-00000.jsonl.gz  self-instruct attempts (see self_instruct.py)

A record: {"id", "source", "question_id", "category", "text" (the user message), "prompt"
(chat-templated token ids), "response" (token ids, the end-of-sequence token included when
produced), "finish_reason" ("stop" | "length")}. A top-k file holds `ids` (int32) and
`logprobs` (float16), both [positions, K] over the shard's responses in record order, `offsets`
([records + 1], where each record's positions start) and `record_ids`.

Every shard is written to a hidden temp file and renamed into place (`mlx_redrafter.atomic`),
so a crash never leaves a partial shard; a resumed run skips the prompt ids already present in
the shards.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import json
import re
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..atomic import TMP_MARK, atomic_write
from .prompts import Prompt, prompt_id

FORMAT = "mlx_redrafter.distill/1"
MANIFEST = "manifest.json"
RESPONSES = "shard"
INSTRUCTIONS = "instructions"
TOPK = "topk"
LOCK = ".lock"
# Settings that must match to add to an existing folder.
PINNED_SETTINGS = ("model", "max_tokens", "temp", "seed", "top_k_logprobs", "system")


# ------------------------------------------------------------------------------- records


@dataclass
class Completion:
    """One prompt answered: the response ids and, when asked for, the top-k per position."""

    prompt: Prompt
    tokens: list[int]
    finish_reason: str  # "stop" (end-of-sequence or stop token, included) or "length"
    topk_ids: np.ndarray | None = None  # [len(tokens), K] int32
    topk_logprobs: np.ndarray | None = None  # [len(tokens), K] float16

    def record(self) -> dict:
        p = self.prompt
        return {
            "id": p.id,
            "source": p.source,
            "question_id": p.question_id,
            "category": p.category,
            "text": p.text,
            "prompt": list(p.tokens),
            "response": list(self.tokens),
            "finish_reason": self.finish_reason,
        }


def write_jsonl_gz(f, records: Iterable[dict]) -> None:
    # mtime=0: the same records give the same bytes (stable diffs when shards are committed).
    with gzip.GzipFile(fileobj=f, mode="wb", mtime=0) as gz:
        for r in records:
            gz.write(json.dumps(r, ensure_ascii=False, separators=(",", ":")).encode() + b"\n")


def read_jsonl_gz(path: str | Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ------------------------------------------------------------------------------- store


@dataclass
class Counts:
    records: int = 0
    prompt_tokens: int = 0
    response_tokens: int = 0
    finish: Counter = field(default_factory=Counter)
    by_category: Counter = field(default_factory=Counter)
    by_source: Counter = field(default_factory=Counter)

    def add(self, record: dict) -> None:
        self.records += 1
        self.prompt_tokens += len(record["prompt"])
        self.response_tokens += len(record["response"])
        self.finish[record["finish_reason"]] += 1
        self.by_category[str(record.get("category"))] += 1
        self.by_source[record["source"]] += 1

    def as_dict(self) -> dict:
        return {
            "records": self.records,
            "prompt_tokens": self.prompt_tokens,
            "response_tokens": self.response_tokens,
            "finish_reason": dict(sorted(self.finish.items())),
            "by_category": dict(sorted(self.by_category.items())),
            "by_source": dict(sorted(self.by_source.items())),
        }


class DistillStore:
    """An output folder of append-only shards; `open()` takes an exclusive lock on it."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.counts = Counts()
        self.done: set[str] = set()
        self.shards: list[dict] = []
        self._lock_file = None

    # -- lifecycle

    @contextlib.contextmanager
    def open(self, settings: dict, extra: dict | None = None):
        """Lock the folder, check `settings` against its manifest, load what is done."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock_file = open(self.folder / LOCK, "w")  # noqa: SIM115
        try:
            try:
                fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RuntimeError(f"another run is writing to {self.folder}") from None
            for stale in self.folder.glob(f".*{TMP_MARK}*"):  # left by a killed run
                stale.unlink()
            old = self.read_manifest()
            if old is not None:
                check_settings(old.get("settings", {}), settings, self.folder)
            self.settings = settings
            self.extra = dict(old.get("extra", {})) if old else {}
            self.extra.update(extra or {})
            self._scan()
            self.write_manifest()
            yield self
        finally:
            self._lock_file.close()
            self._lock_file = None

    def _scan(self) -> None:
        self.counts = Counts()
        self.done = set()
        self.shards = []
        for path in shard_paths(self.folder, RESPONSES):
            records = read_jsonl_gz(path)
            for r in records:
                self.counts.add(r)
                self.done.add(r["id"])
            self.shards.append(self._shard_entry(path, records))

    def _shard_entry(self, path: Path, records: list[dict]) -> dict:
        topk = topk_path(path)
        return {
            "file": path.name,
            "records": len(records),
            "response_tokens": sum(len(r["response"]) for r in records),
            "topk": topk.name if topk.is_file() else None,
        }

    # -- manifest

    def read_manifest(self) -> dict | None:
        path = self.folder / MANIFEST
        return json.loads(path.read_text()) if path.is_file() else None

    def write_manifest(self) -> None:
        manifest = {
            "format": FORMAT,
            "model": self.settings.get("model"),
            "settings": self.settings,
            "counts": self.counts.as_dict(),
            "shards": self.shards,
            "extra": self.extra,
            "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        text = json.dumps(manifest, indent=1, ensure_ascii=False) + "\n"
        atomic_write(self.folder / MANIFEST, lambda f: f.write(text.encode()))

    # -- writing

    def write(self, completions: Sequence[Completion]) -> Path:
        """Store finished completions as the next shard (top-k file first, then the shard)."""
        records = [c.record() for c in completions]
        path = next_shard_path(self.folder, RESPONSES)
        if any(c.topk_ids is not None for c in completions):
            arrays = topk_arrays(completions)
            atomic_write(topk_path(path), lambda f: np.savez(f, **arrays))
        atomic_write(path, lambda f: write_jsonl_gz(f, records))
        for r in records:
            self.counts.add(r)
            self.done.add(r["id"])
        self.shards.append(self._shard_entry(path, records))
        self.write_manifest()
        return path

    def write_instructions(self, records: Sequence[dict]) -> Path:
        path = next_shard_path(self.folder, INSTRUCTIONS)
        atomic_write(path, lambda f: write_jsonl_gz(f, records))
        return path


def check_settings(old: dict, new: dict, folder: Path) -> None:
    diff = {k: (old.get(k), new.get(k)) for k in PINNED_SETTINGS if old.get(k) != new.get(k)}
    if diff:
        lines = ", ".join(f"{k}: stored {a!r}, now {b!r}" for k, (a, b) in diff.items())
        raise ValueError(
            f"{folder} holds data made with other settings ({lines}); "
            "use the same settings to add to it, or another --out folder"
        )


def shard_paths(folder: str | Path, prefix: str = RESPONSES) -> list[Path]:
    pattern = re.compile(rf"{re.escape(prefix)}-(\d+)\.jsonl\.gz")
    found = [p for p in Path(folder).glob(f"{prefix}-*.jsonl.gz") if pattern.fullmatch(p.name)]
    return sorted(found, key=lambda p: int(pattern.fullmatch(p.name).group(1)))


def next_shard_path(folder: Path, prefix: str) -> Path:
    existing = shard_paths(folder, prefix)
    index = int(existing[-1].name[len(prefix) + 1 :].split(".")[0]) + 1 if existing else 0
    return folder / f"{prefix}-{index:05d}.jsonl.gz"


def topk_path(shard: Path) -> Path:
    index = shard.name[len(RESPONSES) + 1 :].split(".")[0]
    return shard.with_name(f"{TOPK}-{index}.npz")


def topk_arrays(completions: Sequence[Completion]) -> dict[str, np.ndarray]:
    lengths = [len(c.tokens) for c in completions]
    return {
        "ids": np.concatenate([c.topk_ids for c in completions]).astype(np.int32),
        "logprobs": np.concatenate([c.topk_logprobs for c in completions]).astype(np.float16),
        "offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        "record_ids": np.array([c.prompt.id for c in completions]),
    }


def read_records(folder: str | Path, with_topk: bool = False) -> Iterator[dict]:
    """Yield every stored record in shard order; `with_topk` adds `topk_ids`/`topk_logprobs`."""
    for path in shard_paths(folder, RESPONSES):
        records = read_jsonl_gz(path)
        topk = None
        if with_topk:
            tp = topk_path(path)
            if not tp.is_file():
                raise FileNotFoundError(f"{path.name} has no top-k file {tp.name}")
            with np.load(tp) as arrays:  # each key read once, not once per record
                topk = {name: arrays[name] for name in arrays.files}
            if list(topk["record_ids"]) != [r["id"] for r in records]:
                raise ValueError(f"{tp.name} does not match {path.name}")
        for i, r in enumerate(records):
            if topk is not None:
                a, b = topk["offsets"][i], topk["offsets"][i + 1]
                r["topk_ids"] = topk["ids"][a:b]
                r["topk_logprobs"] = topk["logprobs"][a:b]
            yield r


def read_instruction_attempts(folder: str | Path) -> list[dict]:
    return [r for p in shard_paths(folder, INSTRUCTIONS) for r in read_jsonl_gz(p)]


# ------------------------------------------------------------------------------- generation


def row_sampler(temp: float, seed: int | None, key_text: str):
    """A sampler for one sequence with its own random stream (seeded by seed and prompt id).

    A prompt's sampled answer then depends on the seed and the prompt alone, not on which
    other prompts share its batch, so resumed and uninterrupted runs agree.
    """
    digest = prompt_id(str(seed), key_text)
    state = [mx.random.key(int(digest[:8], 16))]
    scale = 1.0 / temp

    def sample(logprobs: mx.array) -> mx.array:
        state[0], sub = mx.random.split(state[0])
        return mx.random.categorical(logprobs * scale, key=sub)

    return sample


@dataclass
class _Row:
    prompt: Prompt
    tokens: list[int] = field(default_factory=list)
    topk_ids: list[np.ndarray] = field(default_factory=list)
    topk_logprobs: list[np.ndarray] = field(default_factory=list)


def top_k_log_probs(logprobs: mx.array, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k most likely ids per row, most likely first, and their log-probs (float16)."""
    ids = mx.argpartition(-logprobs, kth=k - 1, axis=-1)[:, :k]
    values = mx.take_along_axis(logprobs, ids, axis=-1)
    order = mx.argsort(-values, axis=-1)
    ids = mx.take_along_axis(ids, order, axis=-1)
    values = mx.take_along_axis(values, order, axis=-1)
    return np.array(ids.astype(mx.int32)), np.array(values.astype(mx.float16))


def generate_completions(
    model,
    prompts: Sequence[Prompt],
    *,
    stop_ids: Iterable[int],
    max_tokens: int = 256,
    batch_size: int = 32,
    temp: float = 0.0,
    seed: int | None = None,
    top_k_logprobs: int = 0,
    max_kv_tokens: int | None = None,
    prefill_batch_size: int = 8,
    on_tokens: Callable[[int], None] | None = None,
) -> Iterator[Completion]:
    """Answer `prompts` (token ids filled in) with continuous batching; yield as each finishes.

    mlx-lm's BatchGenerator does the batching: finished rows leave the batch and waiting
    prompts join it. Prompts join in the given order while fewer than `batch_size` are active
    and, when `max_kv_tokens` is set, while active rows x the longest (prompt + max_tokens)
    stays within it (at least one row always runs). `on_tokens(n)` gets each step's count.
    """
    from mlx_lm.generate import BatchGenerator

    gen = BatchGenerator(
        model,
        stop_tokens=[[t] for t in sorted(set(stop_ids))],
        completion_batch_size=batch_size,
        prefill_batch_size=min(prefill_batch_size, batch_size),
    )
    pending = deque(prompts)
    active: dict[int, _Row] = {}
    longest = 0

    def room_for(p: Prompt) -> bool:
        if not active:
            return True
        if len(active) >= batch_size:
            return False
        if max_kv_tokens is None:
            return True
        need = max(longest, len(p.tokens) + max_tokens)
        return (len(active) + 1) * need <= max_kv_tokens

    try:
        while pending or active:
            while pending and room_for(pending[0]):
                p = pending.popleft()
                if not p.tokens:
                    raise ValueError(f"prompt {p.id} has no tokens")
                samplers = [row_sampler(temp, seed, p.id)] if temp > 0 else None
                (uid,) = gen.insert([p.tokens], [max_tokens], samplers=samplers)
                active[uid] = _Row(p)
                longest = max(longest, len(p.tokens) + max_tokens)
            responses = gen.next_generated()
            if not responses:
                raise RuntimeError("batch generator stopped with prompts still active")
            if top_k_logprobs > 0:
                stacked = mx.stack([r.logprobs for r in responses])
                ids, values = top_k_log_probs(stacked, top_k_logprobs)
            for i, r in enumerate(responses):
                row = active[r.uid]
                row.tokens.append(int(r.token))
                if top_k_logprobs > 0:
                    row.topk_ids.append(ids[i])
                    row.topk_logprobs.append(values[i])
                if r.finish_reason is not None:
                    del active[r.uid]
                    if not active:
                        longest = 0
                    yield _finish(row, r.finish_reason, top_k_logprobs)
            if on_tokens is not None:
                on_tokens(len(responses))
    finally:
        gen.close()


def _finish(row: _Row, finish_reason: str, k: int) -> Completion:
    ids = logprobs = None
    if k > 0:
        ids = np.stack(row.topk_ids).astype(np.int32)
        logprobs = np.stack(row.topk_logprobs).astype(np.float16)
    return Completion(row.prompt, row.tokens, finish_reason, ids, logprobs)


def stop_token_ids(tokenizer) -> list[int]:
    ids = getattr(tokenizer, "eos_token_ids", None)
    if ids is None:
        ids = [tokenizer.eos_token_id]
    return sorted(int(i) for i in ids if i is not None)


# ------------------------------------------------------------------------------- driver


@dataclass
class RunSummary:
    prompts: int  # asked for
    skipped: int  # already stored
    answered: int  # answered in this run
    response_tokens: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.response_tokens / self.seconds if self.seconds > 0 else 0.0


def answer_prompts(
    model,
    tokenizer,
    prompts: Sequence[Prompt],
    store: DistillStore,
    *,
    max_tokens: int,
    batch_size: int,
    temp: float = 0.0,
    seed: int | None = None,
    top_k_logprobs: int = 0,
    system: str | None = None,
    shard_size: int | None = None,
    max_kv_tokens: int | None = None,
    progress: bool = True,
) -> RunSummary:
    """Answer the prompts not yet in `store` (an opened DistillStore), one shard per batch.

    Pending prompts run shortest first (less padding in each batch). Every `shard_size`
    finished answers (default: the batch size) become a shard; if the run stops on an
    exception, the answers already finished are still written before it propagates.
    """
    from tqdm import tqdm

    from .prompts import tokenize_prompts

    todo = [p for p in prompts if p.id not in store.done]
    tokenize_prompts(tokenizer, todo, system)
    todo.sort(key=lambda p: len(p.tokens))
    shard_size = shard_size or batch_size
    buffer: list[Completion] = []
    generated = 0
    start = time.perf_counter()
    bar = tqdm(
        total=len(todo),
        unit="prompt",
        disable=not progress,
        dynamic_ncols=True,
        mininterval=progress_interval(),
    )

    def on_tokens(n: int) -> None:
        nonlocal generated
        generated += n
        elapsed = time.perf_counter() - start
        bar.set_postfix_str(f"{generated} tok, {generated / max(elapsed, 1e-9):.1f} tok/s", False)

    answered = 0
    try:
        for completion in generate_completions(
            model,
            todo,
            stop_ids=stop_token_ids(tokenizer),
            max_tokens=max_tokens,
            batch_size=batch_size,
            temp=temp,
            seed=seed,
            top_k_logprobs=top_k_logprobs,
            max_kv_tokens=max_kv_tokens,
            on_tokens=on_tokens,
        ):
            buffer.append(completion)
            answered += 1
            bar.update(1)
            if len(buffer) >= shard_size:
                batch, buffer = buffer, []
                store.write(batch)
    finally:
        # Finished answers are complete records: keep them even when the run is interrupted.
        if buffer:
            store.write(buffer)
        bar.close()
    return RunSummary(
        prompts=len(prompts),
        skipped=len(prompts) - len(todo),
        answered=answered,
        response_tokens=generated,
        seconds=time.perf_counter() - start,
    )


def progress_interval() -> float:
    """Seconds between progress-bar redraws: often on a terminal, rarely into a log file."""
    import sys

    return 0.5 if sys.stderr.isatty() else 60.0


def generation_settings(
    model_name: str,
    *,
    max_tokens: int,
    temp: float,
    seed: int | None,
    top_k_logprobs: int,
    system: str | None,
) -> dict:
    return {
        "model": model_name,
        "max_tokens": max_tokens,
        "temp": temp,
        # Greedy answers do not depend on the seed: any seed may add to a greedy folder.
        "seed": seed if temp > 0 else None,
        "top_k_logprobs": top_k_logprobs,
        "system": system,
    }
