"""The server's prompt cache: KV caches kept across requests, least recently used dropped first.

A request takes the entry sharing the longest token prefix with its prompt and prefills only
the rest (the next turn of a chat extends the previous prompt and reply). An entry that is
wholly a prefix of the prompt is handed over (moved: the request extends it in place); one
that only shares a part is copied up to the shared prefix and stays for others (a common
system prompt). When the request ends, its cache goes back in with the tokens it holds.

Bounded two ways, with mlx-lm server's option names: `max_entries` (`--prompt-cache-size`)
and `max_bytes` (`--prompt-cache-bytes`, the arrays' allocated bytes). Used on the generation
worker's thread only; `entries` and `nbytes` may be read from others (plain ints).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ..cache import cache_nbytes, copy_prefix


@dataclass
class _Entry:
    tokens: np.ndarray
    cache: list
    nbytes: int


def shared_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(a.size, b.size)
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if differ.size else n


class PromptCacheLRU:
    def __init__(self, make_cache: Callable[[], list], max_entries: int, max_bytes: int):
        if max_entries < 0 or max_bytes < 0:
            raise ValueError("prompt cache bounds must be >= 0")
        self._make_cache = make_cache
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self._entries: OrderedDict[int, _Entry] = OrderedDict()
        self._next_key = 0
        self.nbytes = 0
        self.hits = 0  # requests that reused at least one token

    @property
    def entries(self) -> int:
        return len(self._entries)

    def fetch(self, prompt: Sequence[int]) -> tuple[list, int]:
        """(a cache for this prompt, how many of its tokens the cache already holds).

        At least one prompt token is always left to prefill (its logits give the first token).
        """
        wanted = np.asarray(prompt, dtype=np.int64)
        best_key, best = None, 0
        for key, entry in self._entries.items():
            n = shared_prefix(entry.tokens, wanted)
            if n > best:
                best_key, best = key, n
        best = min(best, wanted.size - 1)
        if best_key is None or best <= 0:
            return self._make_cache(), 0
        self.hits += 1
        entry = self._entries[best_key]
        if best == entry.tokens.size:
            self._remove(best_key)
            return entry.cache, best
        self._entries.move_to_end(best_key)
        return copy_prefix(entry.cache, best), best

    def insert(self, tokens: Sequence[int], cache: list) -> None:
        """Keep a request's cache, which holds exactly `tokens`; evict to stay in bounds."""
        nbytes = cache_nbytes(cache)
        if not len(tokens) or nbytes > self.max_bytes or self.max_entries == 0:
            return
        held = np.asarray(tokens, dtype=np.int64)
        # entries that are a prefix of this one are served as well by a copy of it
        for key in [
            k for k, e in self._entries.items() if shared_prefix(e.tokens, held) == e.tokens.size
        ]:
            self._remove(key)
        self._entries[self._next_key] = _Entry(held, cache, nbytes)
        self._next_key += 1
        self.nbytes += nbytes
        while len(self._entries) > self.max_entries or self.nbytes > self.max_bytes:
            self._remove(next(iter(self._entries)))

    def clear(self) -> None:
        self._entries.clear()
        self.nbytes = 0

    def _remove(self, key: int) -> None:
        self.nbytes -= self._entries.pop(key).nbytes
