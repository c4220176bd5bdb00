"""The FastAPI app: OpenAI's endpoints over the generation worker.

Handlers are async and never touch MLX: they validate the body, turn it into a
`GenerationRequest`, queue a `Job` and relay its events, as one JSON body or as server-sent
events. The status is decided before the first byte: a job refused by the worker (prompt over
the context, ...) is a 4xx even when streaming was asked. A client that goes away cancels its
job: a streaming one when Starlette cancels the stream, a waiting one by polling.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .errors import APIError, error_body, from_validation
from .generation import GenerationRequest, ServedModel
from .guards import BearerAuth, BodyLimit
from .jobs import Delta, Failed, Finished, Job, Started, Worker
from .prompts import message_dicts
from .responses import Reply
from .schemas import ChatCompletionRequest, CompletionRequest
from .tool_calls import ToolCallSplitter

DISCONNECT_POLL_SECONDS = 0.25
SHUTDOWN = "the server is shutting down: the reply was cut short"


def create_app(
    worker: Worker,
    *,
    api_key: str | None = None,
    max_request_bytes: int = 10_000_000,
    cors_origins: list[str] | None = None,
) -> FastAPI:
    app = FastAPI(title="mlx_redrafter", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, error: APIError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        body = error_body(error.status_code, f"{request.method} {request.url.path}: {error.detail}")
        return JSONResponse(body, status_code=error.status_code)

    @app.get("/health")
    async def health() -> JSONResponse:
        stats = worker.stats
        body: dict[str, Any] = {"status": "ok" if stats.state == "ready" else stats.state}
        if stats.error:
            body["error"] = stats.error
        served: ServedModel | None = worker.served
        if served is not None:
            lru = served.prompt_cache
            body |= {
                "model": served.ids[0],
                # running: the requests generating now (several with batching)
                "queue": {"waiting": worker.queued, "running": len(worker.running_jobs())},
                "requests": {
                    "completed": stats.completed,
                    "cancelled": stats.cancelled,
                    "failed": stats.failed,
                },
                "prompt_cache": {
                    "entries": lru.entries,
                    "bytes": lru.nbytes,
                    "max_entries": lru.max_entries,
                    "max_bytes": lru.max_bytes,
                    "hits": lru.hits,
                },
                "memory": stats.memory,
            }
            if worker.batch is not None:
                batch = worker.batch.stats
                body["batch"] = {
                    "max_rows": worker.batch.limits.decode_concurrency,
                    "forwards": batch.forwards,
                    "row_steps": batch.row_steps,
                    "joined": batch.joined,
                    "alone": batch.alone,
                }
        return JSONResponse(body, status_code=200 if stats.state == "ready" else 503)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        served = _ready(worker)
        return {
            "object": "list",
            "data": [{"id": served.ids[0], "object": "model", "created": 0, "owned_by": "local"}],
        }

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await _parse(request, ChatCompletionRequest)
        served = _ready(worker)
        _check_model(body.model, served)
        use_tools = bool(body.tools) and body.tool_choice != "none"
        generation = _generation(body, served)
        generation.messages = message_dicts(body.messages)
        generation.tools = body.tools if use_tools else None
        generation.template_kwargs = dict(body.chat_template_kwargs or {})
        splitter = None
        if use_tools and served.tool_markers is not None:
            start, end = served.tool_markers
            splitter = ToolCallSplitter(start, end, served.tokenizer.tool_parser, body.tools)
        reply = Reply(True, served.ids[0], splitter, body.top)
        return await _respond(request, worker, generation, reply, body.stream, body.include_usage)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await _parse(request, CompletionRequest)
        served = _ready(worker)
        _check_model(body.model, served)
        generation = _generation(body, served)
        generation.prompt = body.prompt
        reply = Reply(False, served.ids[0], None, body.top)
        return await _respond(request, worker, generation, reply, body.stream, body.include_usage)

    app.add_middleware(BodyLimit, limit=max_request_bytes)
    app.add_middleware(BearerAuth, api_key=api_key)
    if cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=cors_origins,
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["*"],
        )
    return app


# ---------------------------------------------------------------------------- requests
async def _parse(request: Request, schema):
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        raise from_validation(e) from e


def _ready(worker: Worker) -> ServedModel:
    if worker.stats.state != "ready" or worker.served is None:
        raise APIError(503, f"the model is not ready (state: {worker.stats.state})")
    return worker.served


def _check_model(name: str | None, served: ServedModel) -> None:
    """Only the served model's own names; never opened as a path."""
    if name is not None and name not in served.ids:
        raise APIError(
            404,
            f"model {name!r} is not served here (this server serves {served.ids[0]!r})",
            param="model",
            code="model_not_found",
        )


def _generation(body, served: ServedModel) -> GenerationRequest:
    """The request's settings over the server's defaults, checked against what is known
    before tokenizing (the prompt-dependent checks run on the worker)."""
    defaults = served.defaults
    limit = body.token_limit
    if limit is not None and served.context is not None and limit >= served.context:
        raise APIError(
            400,
            f"max_tokens is {limit}, but the model's context is {served.context} tokens "
            "(prompt included)",
            param="max_tokens",
            code="context_length_exceeded",
        )
    bias = {int(k): v for k, v in (body.logit_bias or {}).items()}
    outside = [k for k in bias if k >= served.vocab_size]
    if outside:
        raise APIError(
            400,
            f"logit_bias: token id {outside[0]} is outside the vocabulary [0, {served.vocab_size})",
            param="logit_bias",
        )
    penalties = {
        "logit_bias": bias or None,
        "repetition_penalty": body.repetition_penalty,
        "presence_penalty": body.presence_penalty or None,
        "frequency_penalty": body.frequency_penalty or None,
    }
    penalties = {k: v for k, v in penalties.items() if v is not None}
    sampling = {
        "temp": defaults.temp if body.temperature is None else body.temperature,
        "top_p": defaults.top_p if body.top_p is None else body.top_p,
        "top_k": defaults.top_k if body.top_k is None else body.top_k,
        "min_p": defaults.min_p if body.min_p is None else body.min_p,
        "seed": body.seed,
    }
    speculation = {
        "beam_width": body.beam_width,
        "beam_length": body.beam_length,
        "prompt_lookup": body.prompt_lookup,
        "use_drafter": True if body.use_drafter is None else body.use_drafter,
    }
    return GenerationRequest(
        max_tokens=limit,
        sampling=sampling,
        penalties=penalties,
        stop=body.stops,
        top_logprobs=body.top,
        speculation=speculation,
    )


# ---------------------------------------------------------------------------- responses
async def _respond(
    request: Request,
    worker: Worker,
    generation: GenerationRequest,
    reply: Reply,
    stream: bool,
    include_usage: bool,
):
    job = Job(generation, asyncio.get_running_loop())
    worker.submit(job)
    first = await _next_event(request, job)
    if first is None:  # the client left while the job waited
        return JSONResponse(error_body(499, "client closed the request"), status_code=499)
    if isinstance(first, Failed):
        raise first.error
    if stream:
        return StreamingResponse(
            _sse(job, reply, include_usage),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    while True:
        event = await _next_event(request, job)
        if event is None:
            return JSONResponse(error_body(499, "client closed the request"), status_code=499)
        if isinstance(event, Failed):
            raise event.error
        if isinstance(event, Delta):
            reply.on_delta(event)
        elif isinstance(event, Finished):
            if event.finish_reason == "cancelled":  # the server is shutting down
                raise APIError(503, SHUTDOWN)
            return JSONResponse(reply.completion(event))


async def _next_event(request: Request, job: Job):
    """The job's next event; None (and the job cancelled) when the client has gone."""
    getter = asyncio.ensure_future(job.events.get())
    while True:
        done, _ = await asyncio.wait({getter}, timeout=DISCONNECT_POLL_SECONDS)
        if done:
            return getter.result()
        if await request.is_disconnected():
            getter.cancel()
            job.cancel()
            return None


async def _sse(job: Job, reply: Reply, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events; a client that disconnects cancels the stream task here."""
    done = False
    try:
        first = reply.first_chunk()
        if first is not None:
            yield _data(first)
        while True:
            event = await job.events.get()
            if isinstance(event, Delta):
                chunk = reply.on_delta(event)
                if chunk is not None:
                    yield _data(chunk)
            elif isinstance(event, Finished) and event.finish_reason == "cancelled":
                yield _data(error_body(503, SHUTDOWN))
                done = True
                return
            elif isinstance(event, Finished):
                for chunk in reply.last_chunks(event, include_usage):
                    yield _data(chunk)
                yield "data: [DONE]\n\n"
                done = True
                return
            elif isinstance(event, Failed):
                yield _data(event.error.body())
                done = True
                return
            elif isinstance(event, Started):  # only ever first, consumed by _respond
                continue
    finally:
        if not done:
            job.cancel()


def _data(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
