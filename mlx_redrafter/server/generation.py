"""What the worker does with a request: tokenize, check it against the context, take a prompt
cache, stream the engine's steps as events, and put the cache back.

`GenerationRequest` is built by the HTTP handler from a validated body (plain data: no MLX);
`run_job` runs on the generation worker's thread.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..cache import make_tree_cache
from ..conversation import trim_cache
from ..drafter import check_beam_shape
from ..generate import stream_generate
from ..lookup import check_lookup
from .errors import APIError
from .jobs import Delta, Finished, Job, Started
from .prompt_lru import PromptCacheLRU
from .prompts import chat_tokens, text_tokens
from .ranks import announce, stop_here


@dataclass
class Defaults:
    """Request defaults (`--temp`, `--top-p`, `--max-tokens`, ...)."""

    temp: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    max_tokens: int = 512


@dataclass
class ServedModel:
    """The loaded model and everything fixed at start-up."""

    model: Any
    tokenizer: Any
    drafter: Any
    ids: list[str]  # names the `model` field may use; ids[0] is the one reported
    context: int | None  # the model's context length
    vocab_size: int
    speculation: dict[str, Any]  # beam_width, beam_length, prompt_lookup, lookup n-grams, guard
    engine_options: dict[str, Any]  # kv quantization, attention
    defaults: Defaults
    prompt_cache: PromptCacheLRU
    tool_markers: tuple[str, str] | None = None  # (start, end) when mlx-lm has a parser

    @classmethod
    def create(
        cls,
        model,
        tokenizer,
        drafter,
        ids: list[str],
        speculation: dict[str, Any],
        engine_options: dict[str, Any],
        defaults: Defaults,
        prompt_cache_entries: int,
        prompt_cache_bytes: int,
    ) -> ServedModel:
        from ..verify import context_length

        markers = None
        if getattr(tokenizer, "tool_parser", None) is not None and tokenizer.tool_call_start:
            markers = (tokenizer.tool_call_start, tokenizer.tool_call_end)
        return cls(
            model=model,
            tokenizer=tokenizer,
            drafter=drafter,
            ids=ids,
            context=context_length(model),
            vocab_size=int(model.args.vocab_size),
            speculation=speculation,
            engine_options=engine_options,
            defaults=defaults,
            prompt_cache=PromptCacheLRU(
                lambda: make_tree_cache(model), prompt_cache_entries, prompt_cache_bytes
            ),
            tool_markers=markers,
        )


@dataclass
class GenerationRequest:
    """One request's generation, as plain data (built on the event loop, run on the worker)."""

    messages: list[dict] | None = None  # chat
    tools: list[dict] | None = None
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    prompt: str | list[int] | None = None  # text completion
    max_tokens: int | None = None  # None: the server default, capped at the room left
    sampling: dict[str, Any] = field(default_factory=dict)  # temp, top_p, top_k, min_p, seed
    penalties: dict[str, Any] = field(default_factory=dict)  # make_logits_processors' args
    stop: list[str] = field(default_factory=list)
    top_logprobs: int | None = None  # None: no logprobs
    speculation: dict[str, Any] = field(default_factory=dict)  # per-request overrides


def prompt_ids(served: ServedModel, request: GenerationRequest) -> list[int]:
    if request.messages is not None:
        ids = chat_tokens(
            served.tokenizer, request.messages, request.tools, request.template_kwargs
        )
    else:
        ids = text_tokens(served.tokenizer, request.prompt, served.vocab_size)
    if not ids:
        raise APIError(400, "the prompt is empty", param="prompt")
    return ids


def token_budget(served: ServedModel, request: GenerationRequest, prompt_len: int) -> int:
    """max_tokens for this request; a 400 when the prompt or the request does not fit."""
    limit = served.context
    wanted = request.max_tokens
    if limit is None:
        return wanted if wanted is not None else served.defaults.max_tokens
    room = limit - prompt_len
    if room < 1:
        raise APIError(
            400,
            f"the prompt has {prompt_len} tokens, and the model's context is {limit} tokens: "
            "shorten the prompt",
            param="messages" if request.messages is not None else "prompt",
            code="context_length_exceeded",
        )
    if wanted is None:
        return min(served.defaults.max_tokens, room)
    if wanted > room:
        raise APIError(
            400,
            f"max_tokens is {wanted}, but the model's context ({limit} tokens) leaves {room} "
            f"after the prompt's {prompt_len} tokens",
            param="max_tokens",
            code="context_length_exceeded",
        )
    return wanted


def engine_kwargs(served: ServedModel, request: GenerationRequest) -> dict[str, Any]:
    """generate_step's options: server settings, then the request's own."""
    from mlx_lm.sample_utils import make_logits_processors

    spec = dict(served.speculation)
    overrides = request.speculation
    drafter = served.drafter if overrides.get("use_drafter", True) else None
    for name in ("beam_width", "beam_length", "prompt_lookup"):
        if overrides.get(name) is not None:
            spec[name] = overrides[name]
    try:
        if drafter is not None:
            check_beam_shape(spec["beam_width"], spec["beam_length"])
        check_lookup(spec["prompt_lookup"], spec["lookup_ngram_max"], spec["lookup_ngram_min"])
    except ValueError as e:
        raise APIError(400, str(e)) from e
    kwargs = dict(spec, **served.engine_options, **request.sampling)
    kwargs["drafter"] = drafter
    if request.top_logprobs is not None:
        kwargs["logprobs"] = request.top_logprobs
    processors = make_logits_processors(**request.penalties) if request.penalties else []
    if processors:
        kwargs["logits_processors"] = processors
    return kwargs


def run_job(served: ServedModel, job: Job) -> str:
    """Generate one request, emitting Started, Deltas and Finished; returns the outcome
    ("completed" or "cancelled"). An APIError raised before Started is the request's 4xx."""
    request = job.request
    announce(served, request)  # a sharded model: the other ranks run this request too
    prompt = prompt_ids(served, request)
    max_tokens = token_budget(served, request, len(prompt))
    kwargs = engine_kwargs(served, request)
    cache, cached = served.prompt_cache.fetch(prompt)
    responses = stream_generate(
        served.model,
        served.tokenizer,
        prompt[cached:],
        max_tokens=max_tokens,
        stop_strings=request.stop,
        prompt_cache=cache,
        **kwargs,
    )
    shown: list[int] = []
    last = None
    finish = None
    healthy = False
    try:
        for response in responses:
            if last is None:
                job.emit(Started(prompt_tokens=len(prompt), cached_tokens=cached))
            last = response
            shown.extend(response.tokens or [])
            job.emit(
                Delta(
                    response.text,
                    list(response.tokens or []),
                    response.logprobs,
                    _token_texts(served.tokenizer, response.logprobs, response.tokens),
                )
            )
            if response.finish_reason is not None:
                finish = response.finish_reason
                break
            if stop_here(served, job):  # the job's cancellation (rank 0's, when sharded)
                finish = "cancelled"
                break
        healthy = True
    except ValueError as e:
        if last is None:  # refused before any token (a setting generate_step rejects)
            raise APIError(400, str(e)) from e
        raise
    finally:
        responses.close()
        if healthy:
            _keep_cache(served.prompt_cache, cache, prompt + shown)
    finish = finish or "length"
    job.emit(Finished(finish, _usage(len(prompt), cached, last, kwargs)))
    return "cancelled" if finish == "cancelled" else "completed"


def _keep_cache(lru: PromptCacheLRU, cache: list, tokens: list[int]) -> None:
    """Put the request's cache back holding a prefix of prompt + shown tokens it is sure of.

    After each step the engine's cache holds the prompt and every emitted token but the last
    (tokens past EOS or a stop string included); the shown tokens are a prefix of the emitted
    ones, so the first min(offset, len(tokens)) positions hold exactly `tokens`' prefix.
    """
    held = min(cache[0].offset, len(tokens))
    trim_cache(cache, held)
    lru.insert(tokens[:held], cache)


def _usage(prompt_tokens: int, cached: int, last, kwargs: dict[str, Any]) -> dict[str, Any]:
    completion = last.generation_tokens if last is not None else 0
    drafter = kwargs.get("drafter")
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
        # extension: generated tokens per verification forward (1.0 = no speculation gain)
        "tokens_per_step": round(last.mean_accepted, 4) if last is not None else 0.0,
        "speculation": {
            "drafter": drafter is not None,
            "beam_width": kwargs["beam_width"] if drafter is not None else 0,
            "beam_length": kwargs["beam_length"] if drafter is not None else 0,
            "prompt_lookup": kwargs["prompt_lookup"],
        },
    }


def _token_texts(tokenizer, logprobs, tokens) -> dict[int, str] | None:
    if logprobs is None:
        return None
    ids = set(tokens or [])
    for row in logprobs.top_tokens:
        ids.update(row)
    return {i: tokenizer.decode([i]) for i in ids}
