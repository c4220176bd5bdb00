"""One timed generation per call, for each decoder the benchmark compares.

- `mlx_lm`:      mlx-lm's own `stream_generate` (autoregressive), on the model with its
                 original RoPE modules (`pristine_rope` undoes the engine's wrapper meanwhile);
- `draft_model`: the same with `draft_model=` (mlx-lm's speculative decoding);
- `ours_ar`:     `mlx_redrafter.stream_generate` with `drafter=None`;
- `redrafter`:   `mlx_redrafter.stream_generate` with the drafter at a beam shape W, L.

Every run returns a `RunRecord`: its tokens (for the exact-match check) and its speed as the
decoder's own streaming API reports it (tokens/s excluding prefill).
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field

import mlx.core as mx

from mlx_redrafter.generate import stream_generate as redrafter_stream_generate
from mlx_redrafter.verify import TreeRoPE

from .metrics import accepted_histogram, mean_accepted


@dataclass
class Decoder:
    name: str  # key in results: mlx_lm, ours_ar, redrafter, draft_model, redrafter_W2L4, ...
    kind: str  # "mlx_lm", "draft_model" or "engine"
    label: str  # for tables and plots
    beam_width: int | None = None
    beam_length: int | None = None
    num_draft_tokens: int | None = None
    prompt_lookup: int = 0  # longest prompt-lookup copy in each tree (engine decoders)
    guard: bool = False  # the never-slower guard (the default row runs what users get)


@dataclass
class RunRecord:
    decoder: str
    tokens: list[int]  # generated ids, end-of-sequence excluded
    ended_by_eos: bool
    generation_tokens: int  # as the streaming API counts them (end-of-sequence included)
    decode_s: float  # time from the prefill's token to the last token
    tps: float | None  # generation_tokens / decode_s (None for a one-token answer)
    prompt_tps: float
    peak_memory_gb: float
    steps: int | None = None  # verification forwards (ours)
    mean_accepted: float | None = None  # generated tokens per verification forward (ours)
    accepted_hist: list[int] | None = None  # steps by tokens emitted (ours)
    draft_tokens: int | None = None  # tokens that came from the draft model (mlx-lm)
    extra: dict = field(default_factory=dict)

    def to_json(self, keep_tokens: bool = False) -> dict:
        d = asdict(self)
        if not keep_tokens:
            d.pop("tokens")
        return d


@contextlib.contextmanager
def pristine_rope(model):
    """Give each attention its original RoPE module for the duration (mlx-lm's own runs)."""
    swapped = []
    for layer in getattr(model, "layers", []):
        attn = getattr(layer, "self_attn", None)
        rope = getattr(attn, "rope", None) if attn is not None else None
        if isinstance(rope, TreeRoPE):
            attn.rope = rope.rope
            swapped.append((attn, rope))
    try:
        yield model
    finally:
        for attn, wrapper in swapped:
            attn.rope = wrapper


def _decode_seconds(response) -> float:
    tps = response.generation_tps
    return response.generation_tokens / tps if tps and tps > 0 else 0.0


def run_mlx_lm(
    model,
    tokenizer,
    prompt: list[int],
    *,
    max_tokens: int,
    temp: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    seed: int | None = None,
    draft_model=None,
    num_draft_tokens: int = 2,
    name: str = "mlx_lm",
) -> RunRecord:
    import mlx_lm
    from mlx_lm.sample_utils import make_sampler

    if seed is not None:
        mx.random.seed(seed)
    kwargs = {"sampler": make_sampler(temp=temp, top_p=top_p, min_p=min_p, top_k=top_k)}
    if draft_model is not None:
        kwargs.update(draft_model=draft_model, num_draft_tokens=num_draft_tokens)
    mx.reset_peak_memory()
    tokens, from_draft, last = [], 0, None
    eos = set(tokenizer.eos_token_ids)
    with pristine_rope(model):
        if draft_model is not None:
            stack = pristine_rope(draft_model)
        else:
            stack = contextlib.nullcontext()
        with stack:
            for last in mlx_lm.stream_generate(
                model, tokenizer, mx.array(prompt), max_tokens=max_tokens, **kwargs
            ):
                tokens.append(int(last.token))
                from_draft += bool(last.from_draft)
    ended = bool(tokens) and tokens[-1] in eos
    seconds = _decode_seconds(last)
    return RunRecord(
        decoder=name,
        tokens=tokens[:-1] if ended else tokens,
        ended_by_eos=ended,
        generation_tokens=int(last.generation_tokens),
        decode_s=seconds,
        tps=last.generation_tps if last.generation_tokens > 1 else None,
        prompt_tps=float(last.prompt_tps),
        peak_memory_gb=mx.get_peak_memory() / 1e9,
        draft_tokens=from_draft if draft_model is not None else None,
    )


def run_engine(
    model,
    tokenizer,
    prompt: list[int],
    *,
    drafter,
    max_tokens: int,
    temp: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    seed: int | None = None,
    beam_width: int = 4,
    beam_length: int = 5,
    name: str = "redrafter",
    accept: str = "exact",
    prompt_lookup: int = 0,
    guard: bool = False,
) -> RunRecord:
    mx.reset_peak_memory()
    tokens: list[int] = []
    per_step: list[int] = []
    last = None
    for i, response in enumerate(
        redrafter_stream_generate(
            model,
            tokenizer,
            prompt,
            drafter=drafter,
            max_tokens=max_tokens,
            temp=temp,
            top_p=top_p,
            top_k=top_k,
            min_p=min_p,
            seed=seed,
            beam_width=beam_width,
            beam_length=beam_length,
            accept=accept,
            prompt_lookup=prompt_lookup,
            guard=guard,
        )
    ):
        if i > 0 and not (
            response.tokens == []
            and last is not None
            and response.generation_tokens == last.generation_tokens
        ):
            per_step.append(response.accepted + 1)  # drafted tokens kept + the LLM's own
        tokens += response.tokens or []
        last = response
    steps = len(per_step)
    length = beam_length if drafter is not None else 1
    return RunRecord(
        decoder=name,
        tokens=tokens,
        ended_by_eos=last.finish_reason == "stop",
        generation_tokens=int(last.generation_tokens),
        decode_s=_decode_seconds(last),
        tps=last.generation_tps if last.generation_tokens > 1 else None,
        prompt_tps=float(last.prompt_tps),
        peak_memory_gb=mx.get_peak_memory() / 1e9,
        steps=steps,
        mean_accepted=mean_accepted(last.generation_tokens, steps),
        accepted_hist=accepted_histogram(per_step, length),
    )


def run_decoder(decoder: Decoder, ctx, prompt: list[int], *, max_tokens: int, seed=None):
    """Dispatch one timed run; ctx (`run.Context`) holds the models and the sampling settings."""
    sampling = dict(temp=ctx.temp, top_p=ctx.top_p, top_k=ctx.top_k, min_p=ctx.min_p)
    if decoder.kind == "mlx_lm":
        return run_mlx_lm(
            ctx.model, ctx.tokenizer, prompt, max_tokens=max_tokens, seed=seed, **sampling
        )
    if decoder.kind == "draft_model":
        return run_mlx_lm(
            ctx.model,
            ctx.tokenizer,
            prompt,
            max_tokens=max_tokens,
            seed=seed,
            draft_model=ctx.draft_model,
            num_draft_tokens=decoder.num_draft_tokens or 2,
            name=decoder.name,
            **sampling,
        )
    drafter = ctx.drafter if decoder.beam_width else None
    return run_engine(
        ctx.model,
        ctx.tokenizer,
        prompt,
        prompt_lookup=decoder.prompt_lookup,
        guard=decoder.guard,
        drafter=drafter,
        max_tokens=max_tokens,
        seed=seed,
        beam_width=decoder.beam_width or 1,
        beam_length=decoder.beam_length or 2,
        name=decoder.name,
        accept=ctx.accept,
        **sampling,
    )
