"""LLM states kept on disk between training runs (`train --states-cache DIR`).

The frozen LLM pass over the data is most of a training run on a CPU (BENCHMARKS.md), and it
gives the same result every time for the same model and tokens. So
each sequence's states are stored under a key made of the model's fingerprint, the top-k asked
for and the token ids: a run on grown data computes only the new sequences, and a second run
with other training settings (learning rate, epochs, --init) computes nothing.

One `.npz` per sequence (hidden states float16, as training uses them), written to a temporary
name and renamed, so an interrupted run leaves no half-written entry.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import mlx.nn as nn
import numpy as np

from ..atomic import atomic_write
from ..models import model_fingerprint
from .llm_states import SequenceStates, llm_states, states_bar

FORMAT = 1
CHUNK = 64  # sequences per LLM call between writes


def sequence_key(fingerprint: str, tokens: Sequence[int], top_k: int) -> str:
    h = hashlib.sha1(f"{FORMAT}:{fingerprint}:{top_k}:".encode())
    h.update(np.asarray(tokens, dtype=np.int32).tobytes())
    return h.hexdigest()


def _read(path: Path, length: int) -> SequenceStates | None:
    try:
        with np.load(path) as f:
            hidden = f["hidden"]
            top_ids = f["top_ids"] if "top_ids" in f else None
            top_logits = f["top_logits"] if "top_logits" in f else None
    except Exception:  # truncated zip, bad header, missing array: computed again, rewritten
        return None
    if hidden.shape[0] != length:
        return None
    return SequenceStates(hidden, top_ids, top_logits)


def _write(path: Path, states: SequenceStates) -> None:
    arrays = {"hidden": states.hidden}
    if states.top_ids is not None:
        arrays["top_ids"] = states.top_ids
        arrays["top_logits"] = states.top_logits
    # no fsync: an entry cut short by a power loss fails to read (`_read`) and is computed again
    atomic_write(path, lambda f: np.savez(f, **arrays), fsync=False)


def cached_llm_states(
    model: nn.Module,
    sequences: Sequence[Sequence[int]],
    cache_dir: str | Path,
    top_k: int = 0,
    progress: bool = True,
    log=print,
) -> list[SequenceStates]:
    """`llm_states`, with every sequence already on disk read back instead of computed."""
    folder = Path(cache_dir)
    folder.mkdir(parents=True, exist_ok=True)
    fingerprint = model_fingerprint(model)
    paths = [folder / f"{sequence_key(fingerprint, s, top_k)}.npz" for s in sequences]
    out: list[SequenceStates | None] = [
        _read(p, len(s)) if p.is_file() else None for p, s in zip(paths, sequences, strict=True)
    ]
    missing = [i for i, s in enumerate(out) if s is None]
    log(
        f"LLM states: {len(sequences) - len(missing)} of {len(sequences)} sequences from "
        f"{folder}, {len(missing)} to compute"
    )
    missing.sort(key=lambda i: len(sequences[i]))  # as llm_states batches them
    total = sum(len(sequences[i]) for i in missing)
    with states_bar(total, top_k, progress and bool(missing)) as bar:
        for start in range(0, len(missing), CHUNK):
            chunk = missing[start : start + CHUNK]  # stored as it is done: a stop keeps it
            computed = llm_states(model, [sequences[i] for i in chunk], top_k, bar=bar)
            for i, states in zip(chunk, computed, strict=True):
                _write(paths[i], states)
                out[i] = states
    return out  # type: ignore[return-value]
