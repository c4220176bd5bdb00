"""Conversation bookkeeping for `mlx_redrafter.chat`: pure functions over messages and token ids.

The chat keeps two things apart: the conversation (a system prompt and (user, assistant) turns,
as text) and the KV cache, described by the token ids it holds. Before each turn the whole
conversation is rendered (`chat_template.chat_tokens`); the cache is trimmed to the longest common
prefix of the tokens it holds and that rendering, and only the rest is prefilled. This one rule
covers every way the two can differ:

- the engine's cache never holds the last generated token (it is the next step's g0);
- a step that hit EOS may have committed tokens after EOS;
- a template may re-render earlier turns differently (or a reply re-tokenizes differently);
- a changed system prompt, dropped turns or an interrupted reply.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from .chat_template import Turn


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def reusable_prefix(cached: Sequence[int], full: Sequence[int]) -> int:
    """How many cached tokens a turn keeps: the common prefix, leaving at least one to feed.

    The engine needs at least one new token to prefill (its logits give the first reply token).
    """
    return min(common_prefix_len(cached, full), len(full) - 1)


def fit_to_budget(
    render_turns: Callable[[Sequence[Turn]], list[int]],
    turns: Sequence[Turn],
    budget: int | None,
    reserve: int,
) -> tuple[int, list[int]]:
    """Drop the oldest turns until the rendered conversation leaves `reserve` tokens free.

    Returns (turns dropped, rendered tokens). Only whole turns are dropped and the new message
    is always kept, so the result can still exceed the budget; the caller checks that.
    """
    dropped = 0
    tokens = render_turns(turns)
    if budget is None:
        return 0, tokens
    while len(tokens) + reserve > budget and dropped < len(turns):
        dropped += 1
        tokens = render_turns(turns[dropped:])
    return dropped, tokens


def cached_after_reply(
    full: Sequence[int], emitted: Sequence[int], kept_before: int, prefilled: bool
) -> list[int]:
    """Tokens the cache holds for sure once a reply ends, however it ended.

    `full` is the rendered prompt, `emitted` every token the engine yielded (past EOS too),
    `kept_before` the cached prefix reused before the prompt was fed. After each yielded step
    the cache holds `full + emitted[:-1]`; before the prefill's token arrives (an interrupt
    during prefill) only the old prefix is known to be intact. Positions before these are never
    rewritten by a later step, so trimming every layer to this length is always consistent.
    """
    if not prefilled:
        return list(full[:kept_before])
    return list(full) + list(emitted[:-1])


def trim_cache(cache: list, length: int) -> None:
    """Trim every layer of a KV cache to its first `length` tokens.

    Not mlx-lm's `trim_prompt_cache`, on purpose: that drops a count of tokens and, when a layer
    cannot be trimmed, silently drops none. Chat needs the cache to end exactly where its token
    record (`cached_after_reply`) says, so this trims to a length and raises when a layer holds
    fewer tokens than that, instead of letting the record and the cache disagree.
    """
    for layer in cache:
        if layer.offset < length:
            raise ValueError(f"cache layer holds {layer.offset} tokens, fewer than {length}")
        layer.trim(layer.offset - length)
