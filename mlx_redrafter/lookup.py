"""Prompt lookup: draft by copying what followed the latest earlier match of the text's suffix.

The RNN drafter reads only the last hidden state, so it cannot copy names, code or whole
sentences from the context; an n-gram match can. `PromptLookup` keeps, for each n-gram size, a
dict from n-gram to the position right after its most recent occurrence, over the prompt and
every token emitted since. Appending a token inserts one n-gram per size, and a proposal looks
up one key per size: the per-step cost does not grow with the context.

A proposal depends only on tokens already emitted, so a tree holding it keeps every acceptance
rule's guarantee (`accept.exact_accept` holds for any tree built from emitted tokens).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

DEFAULT_NGRAM_MAX = 3
# No copy behind a lone matching token: what follows a 1-gram match is rarely what comes next
# (offline, a copy behind a 1-gram match kept a fraction of a token on average, behind a
# 3-gram several), and every copied token widens the tree the LLM verifies. Measured online
# as the faster minimum on this project's CPU (BENCHMARKS.md); --lookup-ngram-min 1 restores
# the old behaviour.
DEFAULT_NGRAM_MIN = 2


def check_lookup(max_draft: int, ngram_max: int, ngram_min: int) -> None:
    """Names a bad lookup setting before anything loads."""
    if max_draft < 0:
        raise ValueError(f"prompt_lookup must be >= 0 (0 turns it off), got {max_draft}")
    if ngram_min < 1:
        raise ValueError(f"lookup n-gram sizes must be >= 1, got minimum {ngram_min}")
    if ngram_max < ngram_min:
        raise ValueError(
            f"lookup n-gram maximum {ngram_max} is smaller than the minimum {ngram_min}"
        )


class PromptLookup:
    """Incremental n-gram index over a growing token sequence."""

    def __init__(
        self,
        tokens: Iterable[int],
        max_draft: int,
        ngram_max: int = DEFAULT_NGRAM_MAX,
        ngram_min: int = DEFAULT_NGRAM_MIN,
    ):
        check_lookup(max_draft, ngram_max, ngram_min)
        self.max_draft = max_draft
        self.sizes = range(ngram_max, ngram_min - 1, -1)  # longest match first
        self.tokens: list[int] = []
        self.matched = 0  # the n-gram size behind the latest proposal (0: none)
        self._after: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in self.sizes}
        self.extend(tokens)

    def extend(self, new_tokens: Iterable[int]) -> None:
        """Append emitted tokens: each n-gram that now has a successor points at it."""
        tokens = self.tokens
        for token in new_tokens:
            end = len(tokens)  # the n-grams ending just before `token` are followed by it
            tokens.append(int(token))
            for n in self.sizes:
                if end >= n:
                    self._after[n][tuple(tokens[end - n : end])] = end

    def propose(self) -> list[int]:
        """Up to `max_draft` tokens that followed the latest earlier match of the longest
        matching suffix; [] when no suffix occurred before. `matched` keeps the n-gram size.

        Where the match is so recent that its continuation runs into the end of the text, the
        text is periodic over that stretch, and the draft continues the period (a greedy loop
        repeats; a copy that stops at the end would miss the rest of it).
        """
        tokens = self.tokens
        self.matched = 0
        for n in self.sizes:
            if len(tokens) < n:
                continue
            start = self._after[n].get(tuple(tokens[-n:]))
            if start is None:
                continue
            draft = tokens[start : start + self.max_draft]
            period = len(tokens) - start
            while len(draft) < self.max_draft:
                draft.append(draft[len(draft) - period])
            self.matched = n
            return draft
        return []


# A verbatim repeat this long marks a greedy loop (a small model's answer that cycles): where
# copying is trivially right. Figures "on loop-free answers" leave such answers out.
LOOP_REPEAT_TOKENS = 16


def has_repeat(tokens: Sequence[int], n: int = LOOP_REPEAT_TOKENS) -> bool:
    """Whether some n-token run occurs twice in `tokens` (a verbatim repeat)."""
    seen = set()
    for i in range(len(tokens) - n + 1):
        window = tuple(tokens[i : i + n])
        if window in seen:
            return True
        seen.add(window)
    return False


def lookup_arg(value: str) -> int | str:
    """argparse type of --prompt-lookup: a length >= 0 (0: off), or 'auto' (tuned)."""
    import argparse

    if value == "auto":
        return value
    if not value.strip().isdigit():
        raise argparse.ArgumentTypeError(f"expected an integer >= 0 or 'auto', got {value!r}")
    return int(value)
