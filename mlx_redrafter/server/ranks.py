"""The server on a sharded model (`mlx.launch -n N ... mlx_redrafter.server`): rank 0 serves
HTTP, the other ranks follow.

Every rank must run every request's forwards, or the collectives inside them never complete.
Rank 0's generation worker announces each request before running it (`announce`: the request
as JSON, broadcast as bytes; a few collectives per request, no transport of our own); a
follower runs the same `run_job` on the same request with a job that shows nothing. Everything
a request decides is then computed identically on every rank: the tokenized prompt, the prompt
cache taken and kept (the same LRU on every rank, fed the same requests), the engine's
decisions (distributed.py), the finish (EOS, stop strings, max_tokens). The one decision only
rank 0 can take, a client's cancellation, is broadcast after each step (`stop_here`: one
one-integer all-sum per step). At shutdown rank 0 sends a stop message; the followers end.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import asdict
from typing import Any

import mlx.core as mx

from ..distributed import broadcast_ints, broadcast_tokens, model_group
from .errors import APIError

log = logging.getLogger(__name__)


def send(group: mx.distributed.Group, message: dict) -> None:
    broadcast_tokens(list(json.dumps(message).encode()), group)


def receive(group: mx.distributed.Group) -> dict:
    return json.loads(bytes(broadcast_tokens(None, group)).decode())


def announce(served, request) -> None:
    """On rank 0 of a sharded model: the followers are told to run `request` too."""
    group = model_group(served.model)
    if group is not None and group.rank() == 0:
        send(group, {"job": asdict(request)})


def stop_here(served, job) -> bool:
    """Whether the request stops after this step: the job's cancellation, rank 0's on every
    rank of a sharded model."""
    group = model_group(served.model)
    cancelled = job.cancelled.is_set()
    if group is None:
        return cancelled
    return bool(broadcast_ints([int(cancelled)], group)[0])


def stop_followers(served) -> None:
    group = model_group(served.model) if served is not None else None
    if group is not None and group.rank() == 0:
        send(group, {"stop": True})


class _FollowerJob:
    """A job whose events go nowhere (rank 0 answers the client) and that only rank 0 can
    cancel (`stop_here`)."""

    def __init__(self, request):
        self.request = request
        self.cancelled = threading.Event()

    def emit(self, event) -> None:
        pass


def _request_from(data: dict[str, Any]):
    from .generation import GenerationRequest

    penalties = dict(data.get("penalties") or {})
    if penalties.get("logit_bias"):  # JSON made the token ids strings
        penalties["logit_bias"] = {int(k): v for k, v in penalties["logit_bias"].items()}
    return GenerationRequest(**dict(data, penalties=penalties))


def follow(served, run) -> int:
    """A follower rank's loop: run each request rank 0 announces, until it says stop; the
    number of requests run. A request rank 0 refuses (a 4xx) is refused here the same way."""
    group = model_group(served.model)
    count = 0
    while True:
        message = receive(group)
        if "stop" in message:
            return count
        try:
            run(served, _FollowerJob(_request_from(message["job"])))
        except APIError:
            pass
        except Exception:  # rank 0's worker logs the same failure and serves on
            log.exception("generation failed")
        count += 1
