"""Continuous batching for the server: the worker's requests share one `BatchGenerator`.

Every `step` is one batched decode step (one LLM forward) for all active requests; each row's
new text goes to its own client as a `Delta`, and a request that ends (EOS, a stop string,
max_tokens, the context, its client hanging up) leaves the batch without stopping the others.
New requests join between two steps (`admit`), prefilled together.

A request runs alone on the sequential path (`generation.run_job`) when the batch cannot serve
it as asked (`runs_alone` says why): log-probs (the batched step computes none), or its own
speculation shape (the batch has one shape for all its rows: the server's). Everything else
(sampling settings and seeds, penalties and logit bias, stop strings, the prompt cache)
is per row in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from ..batch import BatchGenerator, BatchStepResponse
from ..generate import _find_stop, _stop_prefix_len
from ..sampling import SamplingParams
from .errors import APIError
from .generation import (
    GenerationRequest,
    ServedModel,
    _keep_cache,
    _usage,
    prompt_ids,
    token_budget,
)
from .jobs import Delta, Failed, Finished, Job, Started

# mlx_lm.server's defaults for --decode-concurrency and --prompt-concurrency
DEFAULT_DECODE_CONCURRENCY = 32
DEFAULT_PROMPT_CONCURRENCY = 8


@dataclass(frozen=True)
class BatchLimits:
    """How many requests decode together, and how many prompts are prefilled together."""

    decode_concurrency: int = DEFAULT_DECODE_CONCURRENCY
    prompt_concurrency: int = DEFAULT_PROMPT_CONCURRENCY

    def __post_init__(self) -> None:
        if self.decode_concurrency < 1:
            raise ValueError(f"--decode-concurrency must be >= 1, got {self.decode_concurrency}")
        if self.prompt_concurrency < 1:
            raise ValueError(f"--prompt-concurrency must be >= 1, got {self.prompt_concurrency}")


def runs_alone(served: ServedModel, request: GenerationRequest) -> str | None:
    """Why this request cannot join the batch (it then runs alone, after the batch drains),
    or None when it can."""
    if request.top_logprobs is not None:
        return "logprobs"
    overrides = request.speculation
    if not overrides.get("use_drafter", True) and served.drafter is not None:
        return "its own speculation shape"
    for name in ("beam_width", "beam_length", "prompt_lookup"):
        value = overrides.get(name)
        if value is not None and value != served.speculation[name]:
            return "its own speculation shape"
    return None


@dataclass
class _Live:
    """One request in the batch: its job, and its text so far."""

    job: Job
    prompt: list[int]
    cached: int
    detokenizer: Any
    stops: list[str]
    shown: list[int] = field(default_factory=list)  # tokens the text shows (stop token incl.)
    text: str = ""
    sent: int = 0  # characters of `text` already streamed
    generated: int = 0  # tokens generated, EOS included (as mlx-lm counts)
    steps: int = 0  # batched decode steps this row took part in


@dataclass
class BatchStats:
    forwards: int = 0  # batched verification forwards (one per step, whatever the rows)
    row_steps: int = 0  # the sum over requests of the steps each took part in
    joined: int = 0  # requests served by the batch
    alone: int = 0  # requests that ran alone (sequential path)


class BatchSession:
    """The worker's batch: `admit` jobs, `step` them all, `abort` on shutdown. MLX is called
    from the worker thread only; `jobs` may be read from another (a snapshot)."""

    def __init__(self, served: ServedModel, limits: BatchLimits):
        self.served, self.limits = served, limits
        self.stats = BatchStats()
        self._live: dict[int, _Live] = {}
        self._generator = self._new_generator()

    def _new_generator(self) -> BatchGenerator:
        spec = self.served.speculation
        return BatchGenerator(
            self.served.model,
            self.served.drafter,
            stop_tokens=self.served.tokenizer.eos_token_ids,
            beam_width=spec["beam_width"],
            beam_length=spec["beam_length"],
            prompt_lookup=spec["prompt_lookup"],
            lookup_ngram_max=spec["lookup_ngram_max"],
            lookup_ngram_min=spec["lookup_ngram_min"],
            shape_table=spec.get("shape_table"),  # 'auto': the shape per batch size
            guard=bool(spec.get("guard", False)),  # --guard, as for a request run alone
            completion_batch_size=self.limits.decode_concurrency,
            prefill_batch_size=self.limits.prompt_concurrency,
            return_prompt_caches=True,
        )

    @property
    def room(self) -> int:
        return self.limits.decode_concurrency - len(self._live)

    @property
    def busy(self) -> bool:
        return bool(self._live)

    def jobs(self) -> list[Job]:
        return [live.job for live in tuple(self._live.values())]

    # ---------------------------------------------------------------- in
    def admit(self, jobs: list[Job]) -> list[tuple[Job, str]]:
        """Prefill the jobs together and add them to the batch (Started each); returns the
        (job, outcome) of those that failed ("failed", their Failed emitted)."""
        served, failed = self.served, []
        ready: list[tuple[Job, list[int], int, SamplingParams, int | None, list]] = []
        for job in jobs:
            try:
                ready.append((job, *self._prepare(job.request)))
            except APIError as e:
                job.emit(Failed(e))
                failed.append((job, "failed"))
        if not ready:
            return failed
        fetched = [served.prompt_cache.fetch(prompt) for _, prompt, *_ in ready]
        pairs = zip(ready, fetched, strict=True)
        try:
            uids = self._generator.insert(
                [prompt[cached:] for (_, prompt, *_), (_, cached) in pairs],
                [r[2] for r in ready],
                [r[3] for r in ready],
                [r[4] for r in ready],
                [cache if cached else None for cache, cached in fetched],
                [r[5] for r in ready],
            )
        except Exception as e:  # a setting the engine refuses (400), or a broken prefill
            error = (
                APIError(400, str(e))
                if isinstance(e, ValueError)
                else APIError(500, f"generation failed: {type(e).__name__}: {e}")
            )
            for job, *_ in ready:
                job.emit(Failed(error))
                failed.append((job, "failed"))
            return failed
        for uid, (job, prompt, *_), (_, cached) in zip(uids, ready, fetched, strict=True):
            self._live[uid] = _Live(
                job, prompt, cached, served.tokenizer.detokenizer, list(job.request.stop)
            )
            self._live[uid].detokenizer.reset()
            job.emit(Started(prompt_tokens=len(prompt), cached_tokens=cached))
            self.stats.joined += 1
        return failed

    def _prepare(self, request: GenerationRequest) -> tuple:
        """(prompt, max_tokens, sampling, seed, logits processors); a 4xx names a problem."""
        from mlx_lm.sample_utils import make_logits_processors

        prompt = prompt_ids(self.served, request)
        max_tokens = token_budget(self.served, request, len(prompt))
        settings = dict(request.sampling)
        seed = settings.pop("seed", None)
        try:
            params = SamplingParams(**settings)
        except ValueError as e:
            raise APIError(400, str(e)) from e
        processors = make_logits_processors(**request.penalties) if request.penalties else []
        return prompt, max_tokens, params, seed, processors

    # ---------------------------------------------------------------- one step
    def step(self) -> list[tuple[Job, str]]:
        """Drop the rows whose clients left, then one decode step of the others; returns the
        (job, outcome) of every request that ended ("completed", "cancelled" or "failed")."""
        ended = self._cancel_left()
        if not self._live and not self._generator.busy:
            return ended
        try:
            responses = self._generator.next()
        except Exception:  # the step broke: the worker fails every row, the server lives on
            self._live.clear()
            self._generator = self._new_generator()
            raise
        if any(r.tree_size for r in responses):
            self.stats.forwards += 1
        for response in responses:
            outcome = self._on_response(response)
            if outcome is not None:
                ended.append(outcome)
        return ended

    def _cancel_left(self) -> list[tuple[Job, str]]:
        gone = [uid for uid, live in self._live.items() if live.job.cancelled.is_set()]
        if not gone:
            return []
        caches = self._generator.remove(gone, return_prompt_caches=True) or {}
        ended = []
        for uid in gone:
            live = self._live.pop(uid)
            if uid in caches:
                _keep_cache(self.served.prompt_cache, caches[uid], live.prompt + live.shown)
            live.job.emit(Finished("cancelled", self._usage(live)))
            ended.append((live.job, "cancelled"))
        return ended

    def _on_response(self, r: BatchStepResponse) -> tuple[Job, str] | None:
        live = self._live.get(r.uid)
        if live is None:  # removed in this step (cannot happen: removals run before next)
            return None
        if r.tree_size:
            live.steps += 1
            self.stats.row_steps += 1
        kept: list[int] = []
        hit = None
        for token in r.tokens:
            kept.append(token)
            live.detokenizer.add_token(token)
            live.generated += 1
            live.text += live.detokenizer.last_segment
            hit = _find_stop(live.text, live.stops) if live.stops else None
            if hit is not None:
                break
        live.shown += kept
        finish, cache = r.finish_reason, r.prompt_cache
        if hit is not None:  # a stop string: the text ends where it starts, the row leaves
            segment, finish = live.text[live.sent : hit], "stop"
            if r.finish_reason is None:
                cache = (self._generator.remove([r.uid], return_prompt_caches=True) or {})[r.uid]
        elif finish is not None:
            if finish == "stop":  # EOS: counted as generated, never shown
                live.generated += 1
            live.detokenizer.finalize()
            live.text += live.detokenizer.last_segment
            segment = live.text[live.sent :]
        else:  # hold back a tail that may be the start of a stop string
            safe = len(live.text) - _stop_prefix_len(live.text, live.stops)
            segment, live.sent = live.text[live.sent : safe], safe
        live.job.emit(Delta(segment, kept))
        if finish is None:
            return None
        del self._live[r.uid]
        if cache is not None:
            _keep_cache(self.served.prompt_cache, cache, live.prompt + live.shown)
        live.job.emit(Finished(finish, self._usage(live)))
        return live.job, "completed"

    def abort(self) -> list[Job]:
        """Shutdown: every running request ends now ("cancelled")."""
        jobs = self.jobs()
        for live in self._live.values():
            live.job.emit(Finished("cancelled", self._usage(live)))
        self._generator.remove(list(self._live))
        self._live.clear()
        return jobs

    def _usage(self, live: _Live) -> dict[str, Any]:
        # the same fields as a request served alone (generation._usage reads these two)
        last = SimpleNamespace(
            generation_tokens=live.generated,
            mean_accepted=(live.generated - 1) / live.steps if live.steps else 0.0,
        )
        spec = dict(self.served.speculation, drafter=self.served.drafter)
        return _usage(len(live.prompt), live.cached, last, spec)
