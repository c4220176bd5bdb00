"""`mlx_redrafter.server`: the OpenAI-compatible server, ReDrafter on every request.

Start-up: the port opens at once (`/health` answers 503 while loading), the model loads and any
'auto' speculation setting is tuned on the generation thread, and only then the URL is printed.
SIGTERM or Ctrl-C: uvicorn's graceful shutdown (running generations are cancelled between two
steps, their clients told why), exit status 0, the port released.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

PROG = "mlx_redrafter.server"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
DEFAULT_PROMPT_CACHE_SIZE = 10  # mlx-lm server's default
DEFAULT_PROMPT_CACHE_BYTES = "1GB"  # mlx-lm's is unbounded
DEFAULT_MAX_REQUEST_BYTES = "10MB"
API_KEY_ENV = "MLX_REDRAFTER_API_KEY"
_SIZES = {"": 1, "K": 10**3, "KB": 10**3, "M": 10**6, "MB": 10**6, "G": 10**9, "GB": 10**9}


def size_arg(value: str) -> int:
    """A byte count: 1000000, 500MB, 2G (decimal units, as mlx-lm's server reads them)."""
    text = value.strip().upper()
    digits = text.rstrip("KMGB")
    unit = text[len(digits) :]
    try:
        number = float(digits)
    except ValueError:
        number = -1.0
    if number < 0 or unit not in _SIZES:
        raise argparse.ArgumentTypeError(
            f"expected a size such as 1000000, 500MB or 2GB, got {value!r}"
        )
    return int(number * _SIZES[unit])


def setup_arg_parser() -> argparse.ArgumentParser:
    from ..cli_args import add_kv_cache_arguments, add_model_arguments, add_model_source_args
    from ..speculation import add_speculation_args

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="An OpenAI-compatible HTTP server (chat and text completions) with ReDrafter "
        "speculative decoding on every request.",
    )
    add_model_source_args(parser)
    # The request defaults below are the server's own group, not cli_args.add_sampling_args:
    # they apply to requests that omit a field, and a request's seed/acceptance rule come with it.
    parser.add_argument(
        "--host", default=DEFAULT_HOST, help=f"address to listen on (default {DEFAULT_HOST})"
    )
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"default {DEFAULT_PORT}")
    defaults = parser.add_argument_group("request defaults (for requests that omit them)")
    defaults.add_argument("--temp", type=float, default=0.0, help="temperature (default 0.0)")
    defaults.add_argument("--top-p", type=float, default=1.0, help="top-p (default 1.0: off)")
    defaults.add_argument("--top-k", type=int, default=0, help="top-k (default 0: off)")
    defaults.add_argument("--min-p", type=float, default=0.0, help="min-p (default 0.0: off)")
    defaults.add_argument("--max-tokens", type=int, default=512, help="reply tokens (default 512)")
    serving = parser.add_argument_group("serving")
    serving.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV),
        help=f"require 'Authorization: Bearer KEY' on /v1 (default: ${API_KEY_ENV}, else none)",
    )
    serving.add_argument(
        "--prompt-cache-size",
        type=int,
        default=DEFAULT_PROMPT_CACHE_SIZE,
        help=f"KV caches kept across requests (default {DEFAULT_PROMPT_CACHE_SIZE}; 0: none)",
    )
    serving.add_argument(
        "--prompt-cache-bytes",
        type=size_arg,
        default=size_arg(DEFAULT_PROMPT_CACHE_BYTES),
        help=f"most bytes those caches may hold (default {DEFAULT_PROMPT_CACHE_BYTES})",
    )
    add_batching_args(serving)
    serving.add_argument(
        "--max-request-bytes",
        type=size_arg,
        default=size_arg(DEFAULT_MAX_REQUEST_BYTES),
        help=f"largest request body (default {DEFAULT_MAX_REQUEST_BYTES}); larger ones get 413",
    )
    serving.add_argument(
        "--allowed-origins",
        type=lambda text: [o.strip() for o in text.split(",") if o.strip()],
        default=[],
        help="CORS origins allowed to call the API, comma-separated, or '*' (default: none)",
    )
    serving.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
        help="default INFO",
    )
    add_speculation_args(parser)
    add_model_arguments(parser)
    add_kv_cache_arguments(parser, prompt_cache=False)
    return parser


def add_batching_args(group) -> None:
    """Continuous batching's limits, under mlx_lm.server's names and defaults (the batch API's
    names, completion/prefill batch size, are accepted too)."""
    from .batching import DEFAULT_DECODE_CONCURRENCY, DEFAULT_PROMPT_CONCURRENCY

    group.add_argument(
        "--decode-concurrency",
        "--completion-batch-size",
        type=int,
        default=DEFAULT_DECODE_CONCURRENCY,
        help="requests decoded together, one LLM forward a step for all "
        f"(default {DEFAULT_DECODE_CONCURRENCY}; 1: one request at a time, no batching)",
    )
    group.add_argument(
        "--prompt-concurrency",
        "--prefill-batch-size",
        type=int,
        default=DEFAULT_PROMPT_CONCURRENCY,
        help=f"prompts prefilled together (default {DEFAULT_PROMPT_CONCURRENCY})",
    )
    group.add_argument(
        "--no-batching",
        action="store_true",
        help="serve one request at a time, each to its end (the sequential path)",
    )


def batch_limits(args: argparse.Namespace):
    """The worker's batching limits, or None: one request at a time (asked for, or a KV
    quantization, which the batched cache does not take)."""
    from .batching import BatchLimits

    if args.no_batching or args.decode_concurrency == 1 or args.kv_bits is not None:
        return None
    return BatchLimits(args.decode_concurrency, args.prompt_concurrency)


def check_args(args: argparse.Namespace) -> None:
    """Names a bad option before anything loads."""
    from ..cache import check_kv_quantization, refuse_max_kv_size
    from ..sampling import SamplingParams
    from ..speculation import check_speculation_args

    check_speculation_args(args)
    refuse_max_kv_size(args.max_kv_size, " (mlx_redrafter.server --max-kv-size)")
    check_kv_quantization(args.kv_bits, args.kv_group_size, args.quantized_kv_start)
    SamplingParams(temp=args.temp, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p)
    if args.max_tokens < 1:
        raise ValueError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    if args.prompt_cache_size < 0:
        raise ValueError(f"--prompt-cache-size must be >= 0, got {args.prompt_cache_size}")
    batch_limits(args)  # names a bad --decode-concurrency / --prompt-concurrency
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    if args.api_key is not None and not args.api_key.strip():
        raise ValueError("--api-key is empty")


def model_ids(model_arg: str | None) -> list[str]:
    """The names a request's `model` field may use: the model's name, its path (as given and
    resolved), and mlx-lm server's `default_model`."""
    if model_arg is None:
        from ..default_model import DEFAULT_MODEL_ID, default_model_path

        path = default_model_path()  # converted by now: load() ran first
        names = [DEFAULT_MODEL_ID, path.name, str(path)]
    else:
        local = Path(model_arg).expanduser()
        if local.exists():
            names = [local.resolve().name, model_arg, str(local.resolve())]
        else:  # a Hub repo id
            names = [model_arg, model_arg.split("/")[-1]]
    names.append("default_model")
    return list(dict.fromkeys(names))


def load_served(args: argparse.Namespace):
    """On the generation thread: load, tune 'auto' speculation, and describe the model."""
    from .._cli import note_no_drafter
    from ..cli_args import load_from_args
    from ..distributed import init_group
    from ..speculation import resolve_from_args
    from .generation import Defaults, ServedModel

    group = init_group()
    model, tokenizer, drafter = load_from_args(
        args, use_drafter=not args.no_drafter, distributed=group.size() > 1
    )
    if drafter is None and not args.no_drafter and group.rank() == 0:
        note_no_drafter(args.model)
    requested = (args.beam_width, args.beam_length, args.prompt_lookup)  # 'auto' or values
    drafter = resolve_from_args(model, tokenizer, drafter, args, log=_stderr)
    speculation = dict(
        beam_width=args.beam_width,
        beam_length=args.beam_length,
        prompt_lookup=args.prompt_lookup,
        lookup_ngram_max=args.lookup_ngram_max,
        lookup_ngram_min=args.lookup_ngram_min,
        guard=args.guard and not args.no_guard,
    )
    engine = {}
    if args.kv_bits is not None:
        engine = dict(
            kv_bits=args.kv_bits,
            kv_group_size=args.kv_group_size,
            quantized_kv_start=args.quantized_kv_start,
        )
    limits = batch_limits(args)
    if limits is not None and group.size() == 1 and "auto" in requested:
        speculation["shape_table"] = batch_shape_table(
            model, tokenizer, drafter, requested, limits.decode_concurrency, speculation
        )
    return ServedModel.create(
        model,
        tokenizer,
        drafter,
        model_ids(args.model),
        speculation,
        engine,
        Defaults(args.temp, args.top_p, args.top_k, args.min_p, args.max_tokens),
        args.prompt_cache_size,
        args.prompt_cache_bytes,
    )


def batch_shape_table(model, tokenizer, drafter, requested, limit: int, speculation: dict):
    """The batch's {B: (W, L, N)} for an 'auto' shape: the batched tuner's choice per batch
    size (t(B, N), predicted; measured once, then cached), and at B = 1 the single-sequence
    choice, which the tuner confirmed online."""
    from ..batch import tuned_shape_table

    _stderr(f"{PROG}: tuning the speculation shape per batch size (up to {limit} rows)")
    ngrams = (speculation["lookup_ngram_max"], speculation["lookup_ngram_min"])
    tune = {"log": _stderr, "lookup_ngrams": ngrams}
    table = tuned_shape_table(model, drafter, tokenizer, requested, limit, tune)
    width = speculation["beam_width"] if drafter is not None else 0
    table[1] = (width, speculation["beam_length"], speculation["prompt_lookup"])
    return table


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class _Stop(Exception):
    """SIGTERM or SIGINT before uvicorn handles signals itself."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = setup_arg_parser()
    args = parser.parse_args(argv)
    try:
        check_args(args)
    except ValueError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as e:
        print(
            f"{PROG}: error: {e.name} is missing: pip install 'mlx-redrafter[server]'",
            file=sys.stderr,
        )
        return 2

    from ..distributed import init_group
    from ..speculation import describe
    from .app import create_app
    from .generation import run_job
    from .jobs import Worker
    from .ranks import follow, stop_followers

    group = init_group()
    if group.rank() > 0:  # started by mlx.launch: rank 0 serves, this rank follows it
        try:
            follow(load_served(args), run_job)
        except (ValueError, FileNotFoundError) as e:
            print(f"{PROG} (rank {group.rank()}): error: {e}", file=sys.stderr, flush=True)
            os._exit(2)
        os._exit(0)

    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(message)s")
    # Sharded (ranks follow rank 0 request by request, ranks.py): one request at a time.
    batch = batch_limits(args) if group.size() == 1 else None
    worker = Worker(lambda: load_served(args), run_job, batch=batch)
    app = create_app(
        worker,
        api_key=args.api_key,
        max_request_bytes=args.max_request_bytes,
        cors_origins=args.allowed_origins,
    )
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level.lower(),
        access_log=False,
        lifespan="off",  # the app has no start-up or shutdown handlers of its own
    )
    server = make_server(config, worker)
    # uvicorn announces its URL on binding; ours is printed once the model is ready
    logging.getLogger("uvicorn.error").addFilter(
        lambda record: not record.getMessage().startswith("Uvicorn running on")
    )
    failure: list[BaseException] = []

    def ready(served) -> None:
        while not server.started and not server.should_exit:
            time.sleep(0.05)
        host = f"[{args.host}]" if ":" in args.host else args.host
        shape = describe(
            served.drafter,
            served.speculation["beam_width"],
            served.speculation["beam_length"],
            served.speculation["prompt_lookup"],
        )
        print(
            f"{PROG}: serving {served.ids[0]} ({shape}) at http://{host}:{args.port}/v1 "
            "(Ctrl-C to stop)",
            flush=True,
        )

    def failed(error: BaseException) -> None:
        failure.append(error)
        print(f"{PROG}: error: {error}", file=sys.stderr, flush=True)
        server.should_exit = True

    worker.on_ready, worker.on_failure = ready, failed

    def stop(signum, frame) -> None:
        # uvicorn handles SIGINT/SIGTERM while it serves and re-raises the signal once it has
        # shut down, for the handler it found installed: this one. By then there is nothing
        # left to do (with Python's own SIGINT handler the re-raise would interrupt asyncio's
        # teardown and print a traceback); before uvicorn runs it stops the start-up.
        if not server.should_exit:
            raise _Stop

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        worker.start()
        server.run()
    except (_Stop, KeyboardInterrupt):
        pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    worker.stop(timeout=10.0)
    if worker.stats.state == "stopped":  # the worker thread is done: MLX is free for this one
        stop_followers(worker.served)
    # The port is closed and the worker has stopped (or is stuck in a long MLX call, such as a
    # tuning run). Leave without the interpreter's teardown: with MLX's native threads it
    # sometimes aborted the process after a Ctrl-C (std::terminate), turning a clean
    # shutdown into a crash report.
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(2 if failure else 0)


def make_server(config, worker):
    """uvicorn's server for `config`, bound to the generation worker."""
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server; a shutdown signal also cancels the generations, so that open
        streams end now rather than when their replies would have."""

        def __init__(self, config, worker):
            super().__init__(config)
            self._worker = worker

        def handle_exit(self, sig, frame) -> None:
            self._worker.cancel_all()
            super().handle_exit(sig, frame)

    return Server(config, worker)


if __name__ == "__main__":
    sys.exit(main())
