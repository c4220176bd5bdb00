"""The `mlx_redrafter.train` CLI: one subcommand per stage of making a drafter.

    mlx_redrafter.train generate-data --prompts FILE --out DIR    distillation data (resumable)
    mlx_redrafter.train data-stats DIR                            what a data folder holds
    mlx_redrafter.train train --data DIR --out RUN                fit a drafter (resumable)
    mlx_redrafter.train evaluate --prompts FILE                   accepted tokens per step

Each subcommand is an `add_<name>(subparsers)` function that registers its arguments and a
`run` callable (`args -> exit code`); `SUBCOMMANDS` lists them in help order.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from .train_cmd import add_evaluate, add_train

PROG = "mlx_redrafter.train"
EVALUATION_ONLY = ("mt_bench",)  # prompt files that must never become training data


# ------------------------------------------------------------------------------ generate-data


def add_generate_data(subparsers) -> None:
    p = subparsers.add_parser(
        "generate-data",
        help="let the LLM answer prompts; store token ids (resumable)",
        description=(
            "Answer prompts with the LLM (batched) and append the token ids to shards in --out. "
            "Run the same command again to resume: stored prompts are skipped."
        ),
    )
    src = p.add_argument_group("prompts")
    src.add_argument(
        "--prompts",
        action="append",
        default=[],
        metavar="FILE",
        help="JSONL with `turns` (first turn used) or plain text, one prompt a line; repeatable",
    )
    src.add_argument(
        "--self-instruct",
        type=int,
        default=0,
        metavar="N",
        help="also let the LLM write N distinct requests from topics x request kinds",
    )
    src.add_argument(
        "--topics",
        default="builtin",
        metavar="FILE_OR_BUILTIN",
        help="topics for --self-instruct: 'builtin' or a file with one topic a line",
    )
    src.add_argument(
        "--instruct-temp",
        type=float,
        default=0.0,
        help="temperature while writing self-instruct requests (default: greedy)",
    )
    src.add_argument("--limit", type=int, default=None, help="at most N prompts from each file")
    src.add_argument("--system", default=None, help="system prompt for the chat template")
    src.add_argument(
        "--allow-evaluation-prompts",
        action="store_true",
        help=f"allow prompt files named like {', '.join(EVALUATION_ONLY)} (evaluation data)",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="data folder (created/resumed)")
    p.add_argument(
        "--model", default=None, help="model folder (default: SmolLM2-135M-Instruct, float32)"
    )
    gen = p.add_argument_group("generation")
    gen.add_argument("--max-tokens", type=int, default=256, help="response length limit")
    gen.add_argument("--batch-size", type=int, default=32, help="sequences decoded together")
    gen.add_argument(
        "--max-kv-tokens",
        type=int,
        default=65536,
        help="cap on batch rows x (prompt + max tokens); 0 for none",
    )
    gen.add_argument("--temp", type=float, default=0.0, help="sampling temperature (0: greedy)")
    gen.add_argument("--seed", type=int, default=None, help="random seed (sampling, prompt order)")
    gen.add_argument(
        "--top-k-logprobs",
        type=int,
        default=0,
        metavar="K",
        help="also store the LLM's K most likely tokens and log-probs per position (0: none)",
    )
    gen.add_argument(
        "--shard-size", type=int, default=None, help="answers per shard (default: batch size)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=run_generate_data)


def load_model(path: str | None):
    """(model, tokenizer, name): a model folder, or the float32 default model.

    The default is float32 on every device, so data made on a GPU matches data made on a CPU.
    """
    from ..default_model import default_model_path
    from ..models import load

    folder = Path(path) if path is not None else default_model_path(dtype="float32")
    model, tokenizer, _ = load(folder, use_drafter=False)
    return model, tokenizer, folder.resolve().name


def _check_args(args) -> None:
    if not args.prompts and args.self_instruct <= 0:
        raise ValueError("give --prompts FILE and/or --self-instruct N")
    for name, value in (("--max-tokens", args.max_tokens), ("--batch-size", args.batch_size)):
        if value <= 0:
            raise ValueError(f"{name} must be positive")
    if args.temp < 0 or args.top_k_logprobs < 0:
        raise ValueError("--temp and --top-k-logprobs must not be negative")
    for f in args.prompts:
        if not args.allow_evaluation_prompts and any(e in Path(f).name for e in EVALUATION_ONLY):
            raise ValueError(
                f"{f} is evaluation data: training on it would overstate results "
                "(--allow-evaluation-prompts overrides)"
            )


def run_generate_data(args) -> int:
    import mlx.core as mx

    from .._blas import blas_description
    from .data import DistillStore, answer_prompts, generation_settings
    from .prompts import read_prompts, unique_prompts
    from .self_instruct import read_topics, self_instruct

    _check_args(args)
    prompts = [p for f in args.prompts for p in read_prompts(f, args.limit)]
    topics = read_topics(args.topics) if args.self_instruct > 0 else None
    if args.seed is not None:
        mx.random.seed(args.seed)
    model, tokenizer, model_name = load_model(args.model)
    settings = generation_settings(
        model_name,
        max_tokens=args.max_tokens,
        temp=args.temp,
        seed=args.seed,
        top_k_logprobs=args.top_k_logprobs,
        system=args.system,
    )
    extra = {}
    if args.self_instruct > 0:
        extra["self_instruct"] = {
            "requests": args.self_instruct,
            "topics": args.topics,
            "instruct_temp": args.instruct_temp,
            "seed": args.seed,
        }
    max_kv = args.max_kv_tokens or None
    progress = not args.quiet
    print(
        f"[{PROG}] model {model_name} on {mx.default_device()} ({blas_description()}); "
        f"out {args.out}",
        file=sys.stderr,
    )
    with DistillStore(args.out).open(settings, extra) as store:
        if args.self_instruct > 0:
            prompts += self_instruct(
                model,
                tokenizer,
                store,
                args.self_instruct,
                topics,
                seed=args.seed,
                batch_size=args.batch_size,
                temp=args.instruct_temp,
                max_kv_tokens=max_kv,
                progress=progress,
            )
        prompts = unique_prompts(prompts)
        summary = answer_prompts(
            model,
            tokenizer,
            prompts,
            store,
            max_tokens=args.max_tokens,
            batch_size=args.batch_size,
            temp=args.temp,
            seed=args.seed,
            top_k_logprobs=args.top_k_logprobs,
            system=args.system,
            shard_size=args.shard_size,
            max_kv_tokens=max_kv,
            progress=progress,
        )
        totals = store.counts
    print(
        f"[{PROG}] answered {summary.answered} prompts ({summary.skipped} already stored): "
        f"{summary.response_tokens} tokens in {summary.seconds:.0f} s "
        f"({summary.tokens_per_second:.1f} tokens/s); folder now holds {totals.records} "
        f"answers, {totals.response_tokens} response tokens",
        file=sys.stderr,
    )
    return 0


# ------------------------------------------------------------------------------ data-stats


def add_data_stats(subparsers) -> None:
    p = subparsers.add_parser(
        "data-stats",
        help="count what a data folder holds (read from its shards)",
        description="Print a data folder's settings and counts, recounted from its shards.",
    )
    p.add_argument("folder", metavar="DIR")
    p.set_defaults(run=run_data_stats)


def run_data_stats(args) -> int:
    from .data import MANIFEST, Counts, read_records

    folder = Path(args.folder)
    if not (folder / MANIFEST).is_file():
        raise FileNotFoundError(f"{folder} is not a data folder (no {MANIFEST})")
    manifest = json.loads((folder / MANIFEST).read_text())
    counts = Counts()
    for record in read_records(folder):
        counts.add(record)
    print(json.dumps({"settings": manifest.get("settings"), **counts.as_dict()}, indent=1))
    return 0


# ------------------------------------------------------------------------------ entry point

SUBCOMMANDS = (add_generate_data, add_data_stats, add_train, add_evaluate)


def setup_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Make a ReDrafter drafter for an mlx-lm model by distillation."
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


def stop_on_signals() -> None:
    """SIGTERM, and SIGINT even where a shell started us in the background (which makes it
    ignored), raise KeyboardInterrupt, so long runs stop by saving their finished work."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            signal.signal(sig, interrupt)
        except ValueError:  # not the main thread (an embedding application): leave it alone
            return


def main(argv: Sequence[str] | None = None) -> int:
    args = setup_arg_parser().parse_args(argv)
    stop_on_signals()
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"{PROG} {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"\n{PROG} {args.command}: interrupted (finished work is saved; rerun to resume)",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
