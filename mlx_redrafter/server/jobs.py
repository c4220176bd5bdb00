"""One generation worker thread and its fair queue: MLX is driven from this thread only.

Requests are taken first come, first served. With batching (`Worker(..., batch=BatchLimits)`,
the server's default) they join one running batch as they arrive, up to its limit, and every
step advances them all (`batching.BatchSession`); a request the batch cannot serve as asked
waits for the batch to drain and then runs alone, as does every request without batching
(each to its end, `run`). HTTP handlers never call MLX: they put a `Job` on the queue and read
its events from an asyncio queue the worker fills through the event loop. A job whose client
went away is marked cancelled; the worker skips it if it has not started, and otherwise stops
it between two decode steps (its batch row is removed). Cancellations are counted for /health.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx

from .errors import APIError

log = logging.getLogger("mlx_redrafter.server")


# ---------------------------------------------------------------------------- events
@dataclass
class Started:
    prompt_tokens: int
    cached_tokens: int


@dataclass
class Delta:
    text: str
    tokens: list[int]
    logprobs: Any = None  # logprobs.TokenLogprobs of `tokens`, when asked
    token_texts: dict[int, str] | None = None  # text of every id in `logprobs`


@dataclass
class Finished:
    finish_reason: str  # "stop", "length", or "cancelled"
    usage: dict[str, Any]


@dataclass
class Failed:
    error: APIError


Event = Started | Delta | Finished | Failed


# ---------------------------------------------------------------------------- jobs
_ids = itertools.count(1)


@dataclass
class Job:
    request: Any  # generation.GenerationRequest
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    number: int = field(default_factory=lambda: next(_ids))

    def emit(self, event: Event) -> None:
        """From the worker thread: hand an event to the handler's event loop."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop has closed (server shutting down): nobody listens
            self.cancelled.set()

    def cancel(self) -> None:
        self.cancelled.set()


@dataclass
class WorkerStats:
    state: str = "loading"  # "loading", "ready", "failed", "stopped"
    error: str | None = None
    completed: int = 0
    cancelled: int = 0
    failed: int = 0  # requests refused (4xx) or broken (5xx) on the worker
    memory: dict[str, int] = field(default_factory=dict)


class Worker:
    """Runs `load()` first (on this thread: the model is MLX's), then jobs in FIFO order:
    batched (`batch`: a `batching.BatchLimits`) or each alone with `run(served, job)`."""

    def __init__(self, load: Callable[[], Any], run: Callable[[Any, Job], str], batch: Any = None):
        self._load, self._run, self._limits = load, run, batch
        self.batch: Any = None  # the batching.BatchSession, once loaded (with batching)
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._main, name="mlx-generation", daemon=True)
        self.stats = WorkerStats()
        self.served: Any = None
        self.current: Job | None = None
        self.on_ready: Callable[[Any], None] | None = None
        self.on_failure: Callable[[BaseException], None] | None = None

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    def running_jobs(self) -> list[Job]:
        """The jobs generating now (a snapshot; read from any thread)."""
        current = self.current
        jobs = self.batch.jobs() if self.batch is not None else []
        return jobs + ([current] if current is not None else [])

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        if self.stats.state != "ready":
            raise APIError(503, f"the model is not ready (state: {self.stats.state})")
        self._queue.put(job)

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel the running and queued jobs, then end the thread."""
        self.cancel_all()
        self._queue.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout)

    def cancel_all(self) -> None:
        for job in self.running_jobs():
            job.cancel()
        with self._queue.mutex:
            for job in self._queue.queue:
                if job is not None:
                    job.cancel()

    def _main(self) -> None:
        try:
            self.served = self._load()
        except BaseException as e:  # reported on /health and by the CLI; the server stops
            self.stats.state, self.stats.error = "failed", f"{type(e).__name__}: {e}"
            if self.on_failure is not None:
                self.on_failure(e)
            return
        self.stats.state = "ready"
        self._record_memory()
        if self._limits is not None:
            from .batching import BatchSession

            self.batch = BatchSession(self.served, self._limits)
        if self.on_ready is not None:
            self.on_ready(self.served)
        if self.batch is not None:
            self._serve_batched(self.batch)
        else:
            while True:
                job = self._queue.get()
                if job is None:
                    break
                if job.cancelled.is_set():
                    self.stats.cancelled += 1
                    continue
                self._run_alone(job)
        self.stats.state = "stopped"

    def _run_alone(self, job: Job) -> None:
        self.current = job
        try:
            outcome = self._run(self.served, job)
        except APIError as e:
            outcome = "failed"
            job.emit(Failed(e))
        except Exception as e:  # a bug or an MLX error: the request fails, the server lives
            log.exception("generation failed")
            outcome = "failed"
            job.emit(Failed(APIError(500, f"generation failed: {type(e).__name__}: {e}")))
        finally:
            self.current = None
        self._count(outcome)
        self._record_memory()

    def _count(self, outcome: str) -> None:
        if outcome == "cancelled":
            self.stats.cancelled += 1
        elif outcome == "failed":
            self.stats.failed += 1
        else:
            self.stats.completed += 1

    def _serve_batched(self, batch: Any) -> None:
        """Continuous batching: between two steps, queued jobs join the batch while it has
        room; a job that must run alone (`batching.runs_alone`) stops the joining until the
        batch has drained, then runs, so the queue stays first come, first served."""
        from .batching import runs_alone

        alone: Job | None = None  # waits for the batch to drain
        while True:
            joining: list[Job] = []
            stop = False
            while alone is None and batch.room > len(joining):
                try:  # wait only when there is nothing else to do
                    job = self._queue.get(block=not (batch.busy or joining))
                except queue.Empty:
                    break
                if job is None:
                    stop = True
                    break
                if job.cancelled.is_set():
                    self.stats.cancelled += 1
                elif runs_alone(self.served, job.request) is not None:
                    alone = job
                else:
                    joining.append(job)
            if joining:
                self._settle(batch, functools.partial(batch.admit, joining), joining)
            if stop:
                for _ in batch.abort():
                    self.stats.cancelled += 1
                if alone is not None:
                    alone.cancel()
                    self.stats.cancelled += 1
                return
            if batch.busy:
                self._settle(batch, batch.step, batch.jobs())
            elif alone is not None:
                job, alone = alone, None
                batch.stats.alone += 1
                if job.cancelled.is_set():
                    self.stats.cancelled += 1
                else:
                    self._run_alone(job)

    def _settle(self, batch: Any, action: Callable[[], list], jobs: list[Job]) -> None:
        """Run a batch action and count the requests it ended; an exception fails `jobs`
        (the action has told their clients) and the server goes on."""
        try:
            ended = action()
        except Exception as e:  # a bug or an MLX error
            log.exception("batched generation failed")
            for job in jobs:
                job.emit(Failed(APIError(500, f"generation failed: {type(e).__name__}: {e}")))
                self.stats.failed += 1
            return
        for _, outcome in ended:
            self._count(outcome)
        if ended:
            self._record_memory()

    def _record_memory(self) -> None:
        self.stats.memory = {
            "active_bytes": int(mx.get_active_memory()),
            "cache_bytes": int(mx.get_cache_memory()),
            "peak_bytes": int(mx.get_peak_memory()),
        }
