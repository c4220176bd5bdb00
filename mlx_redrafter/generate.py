"""Generation: the decode loop (draft -> pack -> verify -> accept -> commit), its streaming
wrappers, and the `mlx_redrafter.generate` CLI.

One step, top to bottom in `_decode_steps`:
1. draft   - the drafter beam-searches W beams of L tokens from the last hidden state and g0;
2. pack    - the beams reach the host (sync 1) and are packed into their prefix tree (greedy
             W=1 skips the sync: one beam is a chain, whatever its tokens);
3. verify  - one LLM forward over the packed tokens, tree mask and per-token RoPE;
4. accept  - longest kept run and the LLM's next token; (best, n, next) reach the host (sync 2);
5. commit  - the accepted path's keys/values are gathered contiguous; the rest is dropped.
With `drafter=None` decoding is plain autoregressive, pipelined like mlx-lm's
(`_autoregressive_steps`). A profiler passes a `probe` (`probe.StepProbe`) to see each phase
of this one loop, synced; without one the loop pays an `is None` test per phase.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.cache import trim_prompt_cache

from .accept import ACCEPT_RULES, accept_tree
from .cache import (
    check_cache,
    check_kv_quantization,
    commit,
    make_tree_cache,
    refuse_max_kv_size,
    set_quantization,
)
from .chat_template import chat_tokens, messages_for
from .cli_args import (
    add_kv_cache_arguments,
    add_model_arguments,
    add_model_source_args,
    add_sampling_args,
    kv_options,
    load_from_args,
    sampling_options,
)
from .distributed import (
    agree_on_run,
    broadcast_tokens,
    follow_rank0,
    init_group,
    model_group,
)
from .drafter import Drafter, check_beam_shape, check_drafter
from .guard import guard_for
from .kernels import ATTENTION_CHOICES, describe_attention
from .logprobs import TokenLogprobs, check_top, token_logprobs
from .lookup import DEFAULT_NGRAM_MAX, DEFAULT_NGRAM_MIN, PromptLookup, check_lookup
from .prompt_cache import continuation_prompt, read_for_cli, to_tree_cache
from .sampler_rule import Sampler, check_sampler
from .sampling import (
    LogitsProcessor,
    SamplingParams,
    choose_token,
    node_histories,
    process_logits,
)
from .speculation import (
    add_speculation_args,
    check_speculation_args,
    describe,
    resolve_from_args,
    resolve_speculation,
    speculation_options,
)
from .tree import PAD, pack_tree
from .verify import (
    context_length,
    embed_tokens,
    forward,
    prepare_model,
    set_attention,
    verify_tree,
)

if TYPE_CHECKING:
    from .probe import StepProbe

DEFAULT_BEAM_WIDTH = 4
DEFAULT_BEAM_LENGTH = 5
DEFAULT_MAX_TOKENS = 256  # generate_step's and the CLI's (mlx_lm.generate's CLI has 100)


@dataclass
class StepStats:
    accepted: int  # drafted tokens kept this step (0 for the prefill step and without drafter)
    tree_size: int  # tokens verified in this step's forward (0 for the prefill step)
    prefill: bool = False
    lookup_accepted: int = 0  # of `accepted`, how many the prompt-lookup branch had proposed
    logprobs: TokenLogprobs | None = None  # of this step's tokens, when asked (logprobs.py)


@dataclass
class GenerationResponse:
    """One decode step's output; mlx-lm's field names plus ReDrafter's own."""

    text: str
    token: int
    logprobs: TokenLogprobs | None  # of `tokens`, with generate_step's `logprobs` option
    from_draft: bool
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float
    finish_reason: str | None = None
    tokens: list[int] | None = None  # this step's tokens, in order (`token` is the last)
    # every token the engine produced this step, past an EOS or a stop too: the KV cache holds
    # the prompt and all of them but the last (what a caller keeping the cache must know)
    step_tokens: list[int] | None = None
    accepted: int = 0  # drafted tokens the LLM kept this step
    mean_accepted: float = 0.0  # generated tokens per verification forward (prefill excluded)


# ---------------------------------------------------------------------------- the loop
def generate_step(
    prompt: mx.array,
    model: nn.Module,
    drafter: Drafter | None,
    *,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    temp: float = 0.0,
    top_p: float = 0.0,
    top_k: int = 0,
    min_p: float = 0.0,
    logits_processors: Sequence[LogitsProcessor] | None = None,
    beam_width: int = DEFAULT_BEAM_WIDTH,
    beam_length: int = DEFAULT_BEAM_LENGTH,
    prompt_cache: list | None = None,
    seed: int | None = None,
    accept: str = "exact",
    prefill_step_size: int = 2048,
    kv_bits: int | None = None,
    max_kv_size: int | None = None,
    attention: str = "auto",
    prompt_lookup: int = 0,
    lookup_ngram_max: int = DEFAULT_NGRAM_MAX,
    lookup_ngram_min: int = DEFAULT_NGRAM_MIN,
    guard: bool = False,
    sampler: Sampler | None = None,
    kv_group_size: int = 64,
    quantized_kv_start: int = 5000,
    probe: StepProbe | None = None,
    logprobs: int | None = None,
) -> Generator[tuple[list[int], StepStats], None, None]:
    """Yield (new token ids, stats) per step: first the prefill's token, then 1..L per step.

    `prompt` holds the tokens not yet in `prompt_cache` (all of them for a new cache). Greedy
    (`temp == 0`) output equals the LLM's own greedy decoding token for token (up to float
    near-ties). Sampling (`temp > 0`) uses the `accept` rule: "exact" (default) emits tokens
    distributed exactly as the LLM's own sampling; "reference" is the ReDrafter reference's
    per-beam rule (not distribution-exact); "match" keeps a drafted token only when it equals the
    LLM's own sample (mlx-lm's rule; exact). Never yields more than `max_tokens` tokens in total.

    `prompt_lookup` N > 0 adds a prompt-lookup branch to every step's tree: up to N tokens
    copied from what followed the latest earlier occurrence of the text's last n-gram
    (`lookup_ngram_max` down to `lookup_ngram_min` tokens) in the prompt and the tokens
    generated since; with `drafter=None` it is lookup alone. The `reference` rule needs the
    drafter's probabilities for every branch, which a copied branch does not have: refused.

    `guard` (off by default) times the steps and runs each one the cheapest measured way:
    the whole tree, the lookup's copy alone (with both sources), or plain (no draft), probing
    the others now and then (`guard.SpeedGuard`). It is off by default because, measured
    against the tuned settings (which the tuner has already confirmed online against plain
    steps), it cost more than it saved (BENCHMARKS.md, "The guard, A/B"); it is a safety net for
    a fixed shape that may not pay on this machine. Greedy output is the same either way. A
    sampling run with an explicit `seed` runs without the guard, so that the seed alone fixes
    its tokens; without a seed nothing is reproducible anyway.
    An mlx-lm `sampler` (instead of temp/top_p/top_k/min_p) always uses the match rule: it
    hides the distribution the other rules need (see sampler_rule.py). `kv_bits`,
    `kv_group_size`, `quantized_kv_start`: mlx-lm's quantized KV cache (see cache.py);
    `max_kv_size` is refused (see `cache.refuse_max_kv_size`).

    `probe` (`probe.PhaseTimer`, for profilers and the tuner) is called at each phase of each
    verification step; it may sync to time them and, for cost models, override acceptance.
    With a probe, `drafter=None` runs one-token tree steps instead of the pipelined path. Pass
    `guard=False` with it to time the configuration given.

    `logprobs` k (None: off, no cost): each step's stats carry its tokens' log-probs and the k
    most likely tokens at each position, from the logits the step computed (`logprobs.py`).
    Without a drafter this runs one-token tree steps instead of the pipelined path.
    """
    check_top(logprobs)
    check_sampler(sampler, dict(temp=temp, top_p=top_p, top_k=top_k, min_p=min_p), accept)
    params = SamplingParams(temp=temp, top_p=top_p, top_k=top_k, min_p=min_p, sampler=sampler)
    quantization = check_kv_quantization(kv_bits, kv_group_size, quantized_kv_start)
    refuse_max_kv_size(max_kv_size)
    if accept not in ACCEPT_RULES:
        raise ValueError(f"unknown acceptance rule {accept!r} (choose from {ACCEPT_RULES})")
    check_lookup(prompt_lookup, lookup_ngram_max, lookup_ngram_min)
    if prompt_lookup and accept == "reference" and not params.greedy:
        raise ValueError(
            "accept='reference' needs the drafter's probability of every drafted token, which "
            "prompt-lookup branches do not have: use accept='exact' (or 'match') with "
            "prompt_lookup, or prompt_lookup=0"
        )
    if drafter is not None:
        if "auto" in (beam_width, beam_length):
            raise ValueError(
                "beam shape 'auto' is resolved by stream_generate/generate (it needs the "
                "tokenizer); here pass integers, e.g. from mlx_redrafter.tuning.resolve_shape"
            )
        check_beam_shape(beam_width, beam_length)
        check_drafter(model, drafter)
    prompt = _as_token_array(prompt)
    prepare_model(model)  # a caller-built model enters the engine here (no-op once loaded)
    if prompt_cache is None:
        prompt_cache = make_tree_cache(model, quantization)
    else:
        check_cache(prompt_cache)
        set_quantization(prompt_cache, quantization)
    # verification attention: "auto" | "kernel" | "sdpa" (mlx_redrafter.kernels)
    set_attention(model, attention)
    limit = context_length(model)
    start = prompt_cache[0].offset
    if limit is not None and start + prompt.size > limit:
        raise ValueError(
            f"prompt of {prompt.size} tokens (+{start} cached) exceeds the model's context "
            f"of {limit} tokens"
        )
    explicit_seed = seed is not None
    if seed is None:
        seed = int(mx.random.randint(0, 2**31 - 1, shape=()).item()) if not params.greedy else 0
    group = model_group(model)
    if group is not None:  # every rank must take rank 0's decisions (distributed.py)
        seed, explicit_seed = agree_on_run(
            group,
            seed,
            explicit_seed,
            prompt=prompt,
            start=start,
            settings=dict(
                max_tokens=max_tokens,
                sampling=(temp, top_p, top_k, min_p, sampler is not None, accept),
                processors=len(logits_processors or []),
                shape=(drafter is not None, beam_width, beam_length),
                lookup=(prompt_lookup, lookup_ngram_max, lookup_ngram_min),
                kv=(kv_bits, kv_group_size, quantized_kv_start),
                guard=guard,
                logprobs=logprobs,
            ),
        )
        if sampler is not None:  # an mlx-lm sampler draws from the global random state
            mx.random.seed(seed)
    return _decode_steps(
        prompt,
        model,
        drafter,
        prompt_cache,
        params,
        list(logits_processors or []),
        beam_width if drafter is not None else 1,
        beam_length if drafter is not None else 1,
        mx.random.key(seed),
        max_tokens,
        limit,
        prefill_step_size,
        accept,
        PromptLookup(prompt.tolist(), prompt_lookup, lookup_ngram_max, lookup_ngram_min)
        if prompt_lookup
        else None,
        follow_rank0(
            group,
            guard_for(
                (model, drafter),
                (
                    beam_width,
                    beam_length,
                    prompt_lookup,
                    lookup_ngram_max,
                    lookup_ngram_min,
                    params.greedy,
                ),
                len(guard_modes(drafter, prompt_lookup)),
            ),
        )
        if guard and not (explicit_seed and not params.greedy)
        else None,
        probe,
        logprobs,
    )


def _decode_steps(
    prompt,
    model,
    drafter,
    cache,
    params,
    processors,
    width,
    length,
    key,
    max_tokens,
    limit,
    prefill_step_size,
    accept="exact",
    lookup=None,
    guard=None,
    probe=None,
    top_logprobs=None,
):
    history = prompt if processors else None
    hidden, logits = prefill(model, cache, prompt, prefill_step_size)
    key, sub = mx.random.split(key)
    logits = process_logits(logits, [history], processors)
    g0 = int(choose_token(logits, params, sub).item())
    emitted = 1
    scores = None if top_logprobs is None else token_logprobs(logits[-1:], [g0], top_logprobs)
    yield [g0], StepStats(accepted=0, tree_size=0, prefill=True, logprobs=scores)
    if drafter is None and lookup is None and probe is None and top_logprobs is None:
        yield from _autoregressive_steps(
            model, cache, params, processors, key, g0, history, emitted, max_tokens, limit
        )
        return
    if lookup is not None:
        lookup.extend([g0])

    # Greedy W=1 needs no sync before verification: the chain's structure stands for any beam.
    # Sampling rules and logits processors read the tree's tokens on the host, so they sync.
    modes = guard_modes(drafter, lookup.max_draft if lookup is not None else 0)
    chained = drafter is not None and width == 1 and params.greedy and not processors
    chain = pack_tree(np.zeros((1, length), np.int32)) if chained else None
    longest = max(length if drafter is not None else 1, 1 + (lookup.max_draft if lookup else 0))
    while max_tokens < 0 or emitted < max_tokens:
        if limit is not None and cache[0].offset + longest > limit:
            return
        if probe is not None:
            probe.begin()
        # 1. draft: the lookup's copy (host, from emitted tokens), then the RNN's beams (lazy);
        # the guard may run this step with less (the copy alone, or g0 alone) when that pays,
        # judged apart for each length of the lookup's match
        copied = lookup.propose() if lookup is not None else []
        if guard is not None:
            use_rnn, use_lookup = modes[guard.choose(lookup.matched if lookup else 0)]
        else:
            use_rnn, use_lookup = modes[0]
        copied = copied if use_lookup else []
        beams = draft_log_probs = None
        if use_rnn:
            beams, draft_log_probs = drafter.beam_search(
                hidden, mx.array(g0), embed_tokens(model), width, length
            )
        if probe is not None:
            probe.phase("draft", beams, draft_log_probs)
        # 2. pack
        if chain is not None and beams is not None and not copied:
            # one beam is a chain whatever its tokens: verification is queued behind the draft
            # and the graph is built while the draft computes, with no sync between them
            tree, tree_tokens = chain, beams[0]
            mx.async_eval(tree_tokens)
        else:
            rnn = np.array(beams) if beams is not None else None  # sync 1
            branches = candidate_branches(g0, rnn, copied)
            tree = pack_tree(branches)
            tree_tokens = mx.array(tree.tokens)
            beams = mx.array(branches)
        if probe is not None:
            probe.phase("pack")
        # 3. verify
        cache_len = cache[0].offset
        tree_hidden, tree_logits = verify_tree(model, cache, tree, tree_tokens)
        if processors:
            history = mx.concatenate([history, mx.array([g0])])
            tree_logits = process_logits(tree_logits, node_histories(history, tree), processors)
        if probe is not None:
            probe.phase("verify", tree_hidden, tree_logits)
        # 4. accept
        key, sub = mx.random.split(key)
        decision = accept_tree(
            beams,
            tree,
            tree_logits,
            draft_log_probs,
            drafter if use_rnn else None,
            params,
            sub,
            accept,
        )
        best, n, next_token = decision.to_host()  # sync 2 (the beams are computed by now)
        if probe is not None:
            best, n = probe.accept(best, n, beams.shape[1] - 1)
        kept = np.array(beams)[best, 1 : n + 1].tolist()
        new_tokens = kept + [next_token]
        if max_tokens >= 0:
            new_tokens = new_tokens[: max_tokens - emitted]
        if probe is not None:
            probe.phase("accept")
        # 5. commit: g0 and the kept tokens before the last emitted one (that one is next g0)
        path = tree.path(best, len(new_tokens))
        commit(cache, cache_len, path)
        hidden = tree_hidden[int(path[-1])]
        if probe is not None:
            probe.phase("commit", [c.state for c in cache], hidden)
        if processors:
            history = mx.concatenate([history, mx.array(new_tokens[:-1], dtype=history.dtype)])
        if lookup is not None:
            lookup.extend(new_tokens)
        emitted += len(new_tokens)
        g0 = new_tokens[-1]
        from_lookup = _common_prefix(copied, kept)
        if guard is not None:
            guard.record(len(new_tokens))
        if top_logprobs is not None:  # row path[i] predicted new_tokens[i]
            rows = tree_logits[mx.array(path.astype(np.int32))]
            scores = token_logprobs(rows, new_tokens, top_logprobs)
        yield (
            new_tokens,
            StepStats(
                accepted=n, tree_size=tree.size, lookup_accepted=from_lookup, logprobs=scores
            ),
        )


def guard_modes(drafter, prompt_lookup: int) -> list[tuple[bool, bool]]:
    """The ways the guard may run a step, as (RNN drafts, lookup drafts), most first: the
    whole tree, the copy alone when there are both, and plain."""
    rnn, copy = drafter is not None, bool(prompt_lookup)
    modes = [(rnn, copy)]
    if rnn and copy:
        modes.append((False, True))
    if rnn or copy:
        modes.append((False, False))
    return modes


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the common prefix of two short token lists (at most the lookup's N)."""
    n = 0
    for x, y in zip(a, b):  # noqa: B905 - lengths differ by design
        if x != y:
            break
        n += 1
    return n


def candidate_branches(g0: int, beams: np.ndarray | None, copied: Sequence[int]) -> np.ndarray:
    """The step's branches as one right-padded array: the RNN's beams (W, L) in score order,
    then the lookup's copy [g0, c1, ...] when there is one (`tree.PAD` fills the shorter)."""
    rows = [] if beams is None else [list(row) for row in beams]
    if copied or not rows:
        rows.append([g0, *copied])
    width = max(len(row) for row in rows)
    out = np.full((len(rows), width), PAD, dtype=np.int32)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


def _autoregressive_steps(
    model, cache, params, processors, key, token, history, emitted, max_tokens, limit
):
    """drafter=None: one token a step, pipelined as mlx-lm does.

    The forward that consumes a token is queued (lazily, `async_eval`) before that token reaches
    the host, so Python builds the next graph while the device computes the current one; the
    step-by-step loop above leaves the device idle for that time, and plain decoding is the
    baseline every speculative figure is compared with.
    Same tokens, random keys and limits as the loop. The cost: while a token is being yielded
    the cache already holds it, so a consumer that stops there leaves one queued token, which
    is trimmed when the generator closes (the cache never holds the last yielded token).
    """

    def room(n: int) -> bool:  # may token n (1-based) be fed to produce token n + 1?
        wanted = max_tokens < 0 or n < max_tokens
        return wanted and (limit is None or cache[0].offset + 1 <= limit)

    def queue(token: mx.array) -> mx.array:
        nonlocal key, history
        if processors:
            history = mx.concatenate([history, token.reshape(1)])
        _, logits = forward(model, token.reshape(1), cache)
        logits = process_logits(logits, [history], processors)
        key, sub = mx.random.split(key)
        next_token = choose_token(logits, params, sub)
        mx.async_eval(next_token)
        return next_token

    if not room(emitted):
        return
    pending = queue(mx.array(token, dtype=mx.int32))
    while True:
        emitted += 1
        ahead = queue(pending) if room(emitted) else None
        try:
            yield [int(pending.item())], StepStats(accepted=0, tree_size=1)
        except GeneratorExit:
            if ahead is not None:
                trim_prompt_cache(cache, 1)
            raise
        if ahead is None:
            return
        pending = ahead


def prefill(
    model: nn.Module, cache: list, prompt: mx.array, step_size: int = 2048
) -> tuple[mx.array, mx.array]:
    """Run the prompt through the model in chunks; (hidden, logits) of its last token."""
    if prompt.size == 0:
        raise ValueError("the prompt is empty: give at least one token")
    # A quantizing cache takes mlx-lm's chunks (the last token alone), so that it switches to
    # quantized storage at the same token as mlx-lm's.
    quantizing = getattr(cache[0], "quantization", None) is not None
    while prompt.size > (1 if quantizing else step_size):
        n = min(step_size, prompt.size - 1) if quantizing else step_size
        model.model(prompt[None, :n], cache=cache)
        mx.eval([c.state for c in cache])
        prompt = prompt[n:]
    return forward(model, prompt, cache)


def _as_token_array(prompt) -> mx.array:
    if not isinstance(prompt, mx.array):
        prompt = mx.array(list(prompt), dtype=mx.int32)
    if prompt.ndim != 1:
        raise ValueError(f"prompt must be a 1-D array of token ids, got shape {prompt.shape}")
    if prompt.size == 0:
        raise ValueError("the prompt is empty: give at least one token")
    return prompt


# ---------------------------------------------------------------------------- streaming
def stream_generate(
    model: nn.Module,
    tokenizer,
    prompt: str | mx.array | list[int],
    *,
    drafter: Drafter | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    stop_strings: Sequence[str] | None = None,
    **kwargs,
) -> Generator[GenerationResponse, None, None]:
    """Stream one response per decode step (text of all tokens the step kept).

    `beam_width`, `beam_length` and `prompt_lookup` default to "auto": tuned for this device,
    model and drafter on first use (a minute or two on a slow CPU), confirmed against plain
    steps, then read from the cache (`speculation.resolve_speculation`); the tuner may decide
    that the RNN drafter (or all speculation) does not pay here. `retune=True` tunes again.
    """
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    if max_tokens == 0:
        raise ValueError("max_tokens must be non-zero (use -1 for no limit)")
    if not isinstance(tokenizer, TokenizerWrapper):
        tokenizer = TokenizerWrapper(tokenizer)
    prepare_model(model)  # before the tuner, which verifies on this model
    drafter, kwargs["beam_width"], kwargs["beam_length"], kwargs["prompt_lookup"] = (
        resolve_speculation(
            model,
            tokenizer,
            drafter,
            kwargs.get("beam_width", "auto"),
            kwargs.get("beam_length", "auto"),
            kwargs.get("prompt_lookup", "auto"),
            retune=kwargs.pop("retune", False),
            lookup_ngrams=(
                kwargs.get("lookup_ngram_max", DEFAULT_NGRAM_MAX),
                kwargs.get("lookup_ngram_min", DEFAULT_NGRAM_MIN),
            ),
        )
    )
    prompt_tokens = _encode(tokenizer, prompt)
    eos_ids = set(tokenizer.eos_token_ids)
    stops = [s for s in (stop_strings or []) if s]
    detokenizer = tokenizer.detokenizer
    detokenizer.reset()
    steps = generate_step(prompt_tokens, model, drafter, max_tokens=max_tokens, **kwargs)

    tic = time.perf_counter()
    prompt_tps = 0.0
    generated = forwards = 0
    text, sent = "", 0  # all text so far, and how much of it was yielded

    def respond(segment, kept, stats, finish, step) -> GenerationResponse:
        elapsed = max(time.perf_counter() - tic, 1e-9)
        return GenerationResponse(
            text=segment,
            token=kept[-1] if kept else -1,
            logprobs=stats.logprobs.head(len(kept)) if stats.logprobs is not None else None,
            from_draft=stats.accepted > 0,
            prompt_tokens=int(prompt_tokens.size),
            prompt_tps=prompt_tps,
            generation_tokens=generated,
            generation_tps=0.0 if stats.prefill else generated / elapsed,
            peak_memory=mx.get_peak_memory() / 1e9,
            finish_reason=finish,
            tokens=kept,
            step_tokens=step,
            accepted=stats.accepted,
            mean_accepted=(generated - 1) / forwards if forwards else 0.0,
        )

    stats = StepStats(accepted=0, tree_size=0, prefill=True)
    for tokens, stats in steps:
        if stats.prefill:
            prompt_tps = prompt_tokens.size / (time.perf_counter() - tic)
            tic = time.perf_counter()
        else:
            forwards += 1
        kept: list[int] = []
        finish = None
        for token in tokens:
            if token in eos_ids:  # counted as generated (as mlx-lm does), never shown
                generated += 1
                finish = "stop"
                break
            kept.append(token)
            detokenizer.add_token(token)
            generated += 1
            text += detokenizer.last_segment
            hit = _find_stop(text, stops) if stops else None
            if hit is not None:  # end the text where the stop string starts
                yield respond(text[sent:hit], kept, stats, "stop", tokens)
                return
            if max_tokens >= 0 and generated >= max_tokens:
                finish = "length"
                break
        if finish is not None:
            detokenizer.finalize()
            text += detokenizer.last_segment
            yield respond(text[sent:], kept, stats, finish, tokens)
            return
        # hold back a tail that may be the start of a stop string
        safe = len(text) - _stop_prefix_len(text, stops)
        yield respond(text[sent:safe], kept, stats, None, tokens)
        sent = safe
    # The context is full: generate_step ended before max_tokens.
    detokenizer.finalize()
    text += detokenizer.last_segment
    yield respond(text[sent:], [], stats, "length", [])


def _stop_prefix_len(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of text that is a proper prefix of a stop string."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best


def _find_stop(text: str, stops: Sequence[str]) -> int | None:
    """Index where the earliest stop string starts in text, if any."""
    hits = [text.find(s) for s in stops]
    hits = [h for h in hits if h >= 0]
    return min(hits) if hits else None


def _encode(tokenizer, prompt) -> mx.array:
    if isinstance(prompt, str):
        add_special = tokenizer.bos_token is None or not prompt.startswith(tokenizer.bos_token)
        prompt = tokenizer.encode(prompt, add_special_tokens=add_special)
    return _as_token_array(prompt)


def generate(
    model: nn.Module,
    tokenizer,
    prompt: str | mx.array | list[int],
    *,
    drafter: Drafter | None = None,
    verbose: bool = False,
    **kwargs,
) -> str:
    """Generate a whole response; with `verbose`, stream it and print speed figures (laid out
    as `mlx_lm.generate` prints them)."""
    if verbose:
        print("=" * 10)
    text = ""
    response = None
    for response in stream_generate(model, tokenizer, prompt, drafter=drafter, **kwargs):
        if verbose:
            print(response.text, end="", flush=True)
        text += response.text
    if verbose and response is not None:
        print()
        print("=" * 10)
        if not text:
            print("No text generated for this prompt")
        print_stats(response, sys.stdout)
    return text


def print_stats(response: GenerationResponse, stream) -> None:
    """mlx-lm's three lines, word for word, so scripts that parse them keep working; ReDrafter's
    own figure on a line of its own after them."""
    print(
        f"Prompt: {response.prompt_tokens} tokens, {response.prompt_tps:.3f} tokens-per-sec",
        file=stream,
    )
    print(
        f"Generation: {response.generation_tokens} tokens, "
        f"{response.generation_tps:.3f} tokens-per-sec",
        file=stream,
    )
    print(f"Peak memory: {response.peak_memory:.3f} GB", file=stream)
    print(f"Speculation: {response.mean_accepted:.2f} tokens per verification step", file=stream)


# ---------------------------------------------------------------------------- CLI
DEFAULT_PROMPT = "Hello! Who are you?"  # as in mlx-lm, stdin is read only for --prompt -


def setup_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlx_redrafter.generate",
        description="Generate text with ReDrafter speculative decoding (lossless when greedy).",
    )
    add_model_source_args(parser)
    parser.add_argument(
        "--prompt",
        "-p",
        default=DEFAULT_PROMPT,
        help=f"prompt text; '-' reads stdin (default: {DEFAULT_PROMPT!r})",
    )
    parser.add_argument(
        "--system-prompt",
        "--system",
        dest="system",
        default=None,
        help="system prompt for the chat template",
    )
    parser.add_argument("--ignore-chat-template", action="store_true")
    add_sampling_args(parser, max_tokens=DEFAULT_MAX_TOKENS)
    parser.add_argument(
        "--attention",
        choices=ATTENTION_CHOICES,
        default="auto",
        help="tree-verification attention: the Metal/CUDA kernel, SDPA with a dense mask, "
        "or auto (the kernel where available)",
    )
    parser.add_argument("--verbose", action="store_true", help="print speed and memory figures")
    add_speculation_args(parser)
    add_model_arguments(parser)
    add_kv_cache_arguments(parser)
    return parser


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    from ._cli import interrupted, note_no_drafter

    parser = setup_arg_parser()
    args = parser.parse_args(argv)
    started = False  # has reply text reached stdout (an interrupt then ends its line)
    # Started by `mlx.launch` (a group of more than one): the model is sharded over the ranks,
    # rank 0 reads the prompt and prints, the others follow (distributed.py). No flag: as
    # mlx-lm's server, the group's size says it.
    group = init_group()
    distributed, rank0 = group.size() > 1, group.rank() == 0
    try:
        if distributed and args.prompt_cache_file is not None:
            raise ValueError(
                "--prompt-cache-file holds a whole model's KV cache, not one rank's shard: it "
                "cannot continue a sharded run"
            )
        reads_stdin = args.prompt == "-" and rank0
        prompt_text = sys.stdin.read() if reads_stdin else args.prompt
        if rank0 and not prompt_text.strip():
            parser.error(
                "the prompt is empty"
                + (" (--prompt - read nothing from stdin)" if args.prompt == "-" else "")
            )
        if args.seed is not None:
            mx.random.seed(args.seed)
        check_speculation_args(args)
        sampling = sampling_options(args)
        kv = kv_options(args)
        refuse_max_kv_size(kv.pop("max_kv_size"), " (mlx_redrafter.generate --max-kv-size)")
        cached = read_for_cli(args.prompt_cache_file, args.model)  # (cache, model, tokenizer)
        model, tokenizer, drafter = load_from_args(
            args,
            model_path=cached[1] if cached else None,
            tokenizer_config=cached[2] if cached else None,
            use_drafter=not args.no_drafter,
            distributed=distributed,
        )
        if drafter is None and not args.no_drafter and rank0:
            note_no_drafter(args.model)
        if cached:
            kv["prompt_cache"] = to_tree_cache(cached[0], model, source=args.prompt_cache_file)
            prompt = continuation_prompt(
                tokenizer, prompt_text, args.system, not args.ignore_chat_template
            )
        else:
            messages = messages_for(args.system, (), prompt_text)
            prompt = chat_tokens(tokenizer, messages, not args.ignore_chat_template)
        if distributed:  # rank 0's prompt (its stdin, its template) on every rank
            prompt = broadcast_tokens(prompt if rank0 else None, group)
        drafter = resolve_from_args(model, tokenizer, drafter, args, log=_stderr)
        response = None
        for response in stream_generate(
            model,
            tokenizer,
            prompt,
            drafter=drafter,
            max_tokens=args.max_tokens,
            seed=args.seed,
            attention=args.attention,
            **speculation_options(args),
            **sampling,
            **kv,
        ):
            # marked before the print: a Ctrl-C inside it, after the text is out, still ends
            # the line
            started = started or bool(response.text)
            if rank0:
                print(response.text, end="", flush=True)
        if rank0:
            print()
        if args.verbose and response is not None and rank0:
            from ._blas import blas_description

            print("=" * 10, file=sys.stderr)
            print(
                f"Device: {mx.default_device()}; BLAS: {blas_description()}; "
                f"speculation: "
                + describe(drafter, args.beam_width, args.beam_length, args.prompt_lookup),
                file=sys.stderr,
            )
            print(f"Attention: {describe_attention(args.attention)}", file=sys.stderr)
            if distributed:
                print(f"Sharded over {group.size()} ranks (tensor parallel)", file=sys.stderr)
            print_stats(response, sys.stderr)
    except (ValueError, FileNotFoundError) as e:
        where = "" if rank0 else f" (rank {group.rank()})"
        print(f"mlx_redrafter.generate{where}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: nothing to clean up; one line, not a traceback
        if started and rank0:
            print(flush=True)
        return interrupted("mlx_redrafter.generate")
    return 0


if __name__ == "__main__":
    sys.exit(main())
