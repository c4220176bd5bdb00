"""ReDrafter on a sharded model: one run of mlx-lm's AR decoding, ours without a drafter, and
ReDrafter, plus a model of a real link that turns the measured forwards per token into
predicted tokens/s.

Run it on every rank (`mlx.launch -n 2 --backend ring -- python -m
mlx_redrafter.benchmarks.distributed --model ...`); rank 0 prints and writes the JSON. Run
without `mlx.launch` it measures the unsharded model on one process, and the link model then
assumes the compute splits evenly over `--ranks`.

The link model (`link_seconds_per_forward`, `predicted_tokens_per_second`): mlx-lm's tensor-
parallel llama/qwen layer runs two all-reduces of the forward's (tokens, hidden) activations
(after attention's `o_proj` and after the MLP's `down_proj`); a ring all-reduce over N ranks
takes 2(N-1) steps, each a message of 1/N of the bytes, costing latency + bytes / bandwidth.
The drafter is replicated: it sends nothing. A step's time is then the measured compute plus that
link time, and tokens/s is 1 / (forwards per token x step time).

What it cannot tell: on a loopback between processes that share an oversubscribed VM, the
measured times are CPU contention, not a network; they predict nothing about Thunderbolt or
Ethernet between Macs. The prediction's inputs that transfer are the forwards per token and the
all-reduce count; the link's latency and bandwidth are parameters to set from a measurement of
the real link (e.g. MLX's own all-reduce benchmark between the two machines).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

ALLREDUCES_PER_LAYER = 2  # mlx-lm's shard(): o_proj and down_proj are "sharded-to-all"


@dataclass(frozen=True)
class Link:
    latency_s: float  # one message, one way
    bandwidth_bytes_s: float  # one direction


def ring_allreduce_seconds(nbytes: float, ranks: int, link: Link) -> float:
    """A ring all-reduce of `nbytes`: reduce-scatter then all-gather, 2(N-1) steps of
    nbytes / N each."""
    if ranks < 1:
        raise ValueError(f"ranks must be at least 1, got {ranks}")
    if ranks == 1:
        return 0.0
    steps = 2 * (ranks - 1)
    return steps * (link.latency_s + nbytes / ranks / link.bandwidth_bytes_s)


def link_seconds_per_forward(
    tokens: float, hidden: int, dtype_bytes: int, layers: int, ranks: int, link: Link
) -> float:
    """Network time of one forward over `tokens` tokens on a tensor-parallel model."""
    per_allreduce = ring_allreduce_seconds(tokens * hidden * dtype_bytes, ranks, link)
    return ALLREDUCES_PER_LAYER * layers * per_allreduce


def predicted_tokens_per_second(
    compute_s_per_forward: float, forwards_per_token: float, link_s_per_forward: float
) -> float:
    """1 / (forwards per token x (compute + link) per forward).

    The guard's one-integer all-reduce per step is left out: the benchmark runs ReDrafter with
    the guard off, to measure the shape it was given."""
    if forwards_per_token <= 0:
        raise ValueError(f"forwards per token must be positive, got {forwards_per_token}")
    return 1.0 / (forwards_per_token * (compute_s_per_forward + link_s_per_forward))


def tree_tokens_bound(width: int, length: int) -> int:
    """The most tokens a W x L tree verifies (no shared prefixes): g0 and W beams of L - 1."""
    return 1 + width * (length - 1)


# ---------------------------------------------------------------------------- the run
def setup_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mlx_redrafter.benchmarks.distributed", description=__doc__)
    p.add_argument("--model", default=None, help="model folder (default: the default model)")
    p.add_argument("--prompts", type=int, default=4, help="MT-Bench questions (first turns)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--beam-width", type=int, default=4)
    p.add_argument("--beam-length", type=int, default=5)
    p.add_argument("--ranks", type=int, default=None, help="N for the link model (default: group)")
    p.add_argument("--latency-us", type=float, nargs="+", default=[10.0, 50.0, 200.0])
    p.add_argument("--bandwidth-gbs", type=float, nargs="+", default=[5.0])
    p.add_argument("--out", default=None, help="JSON file for the results (rank 0)")
    return p


def main(argv=None) -> int:
    import mlx.core as mx

    from mlx_redrafter import load
    from mlx_redrafter.chat_template import chat_tokens
    from mlx_redrafter.distributed import init_group

    from .decoders import run_engine, run_mlx_lm
    from .prompts import DEFAULT_PROMPTS, load_questions, quick_subset

    args = setup_arg_parser().parse_args(argv)
    group = init_group()
    rank0 = group.rank() == 0
    model, tokenizer, drafter = load(args.model, distributed=group.size() > 1)
    questions = quick_subset(load_questions(DEFAULT_PROMPTS), args.prompts)
    prompts = [chat_tokens(tokenizer, [{"role": "user", "content": q.turns[0]}]) for q in questions]
    shape = dict(beam_width=args.beam_width, beam_length=args.beam_length)
    runs = {
        "mlx_lm AR": lambda p: run_mlx_lm(model, tokenizer, p, max_tokens=args.max_tokens),
        "ours, no drafter": lambda p: run_engine(
            model, tokenizer, p, drafter=None, max_tokens=args.max_tokens
        ),
        "ReDrafter": lambda p: run_engine(
            model, tokenizer, p, drafter=drafter, max_tokens=args.max_tokens, **shape
        ),
    }
    measured, reference = {}, None
    for name, run in runs.items():
        records = [run(p) for p in prompts]  # every rank runs every decoder, in this order
        reference = reference or [r.tokens for r in records]  # mlx-lm's, the first
        # the prefill's token is not a decode step's: forwards per token is 1 / tokens per
        # step (the README's "tokens per verification step"), exactly 1 for AR decoding
        tokens = sum(r.generation_tokens for r in records)
        decoded = sum(r.generation_tokens - 1 for r in records)
        seconds = sum(r.decode_s for r in records)
        steps = sum(r.steps if r.steps is not None else r.generation_tokens - 1 for r in records)
        measured[name] = dict(
            tokens=tokens,
            seconds=seconds,
            tokens_per_s=tokens / seconds if seconds else None,
            forwards_per_token=steps / decoded if decoded else None,
            s_per_forward=seconds / steps if steps else None,
            same_as_mlx_lm=sum(r.tokens == t for r, t in zip(records, reference, strict=True)),
        )
    if not rank0:
        return 0
    ranks = args.ranks or max(group.size(), 2)
    hidden = int(model.args.hidden_size)
    layers = len(model.layers)
    dtype_bytes = model.model.norm.weight.dtype.size
    split = ranks if group.size() == 1 else 1  # one process: assume an even compute split
    predictions = []
    for latency in args.latency_us:
        for bandwidth in args.bandwidth_gbs:
            link = Link(latency * 1e-6, bandwidth * 1e9)
            row = dict(latency_us=latency, bandwidth_gbs=bandwidth)
            for name, tree in (
                ("mlx_lm AR", 1),
                ("ReDrafter", tree_tokens_bound(args.beam_width, args.beam_length)),
            ):
                m = measured[name]
                net = link_seconds_per_forward(tree, hidden, dtype_bytes, layers, ranks, link)
                row[name] = predicted_tokens_per_second(
                    m["s_per_forward"] / split, m["forwards_per_token"], net
                )
            predictions.append(row)
    result = dict(
        group_size=group.size(),
        device=str(mx.default_device()),
        prompts=len(prompts),
        max_tokens=args.max_tokens,
        shape=shape,
        measured=measured,
        link_model=dict(ranks=ranks, allreduces_per_forward=ALLREDUCES_PER_LAYER * layers),
        predictions=predictions,
        caveat="a loopback on one (possibly oversubscribed) machine predicts nothing about a "
        "real link; only forwards per token and the all-reduce count carry over",
    )
    for name, m in measured.items():
        print(
            f"{name:18s} {m['tokens_per_s'] or 0:8.2f} tok/s  "
            f"{m['forwards_per_token'] or 0:.3f} forwards/token"
        )
    for row in predictions:
        print(
            f"link {row['latency_us']:g} us, {row['bandwidth_gbs']:g} GB/s: predicted "
            f"AR {row['mlx_lm AR']:.2f} tok/s, ReDrafter {row['ReDrafter']:.2f} tok/s"
        )
    print(result["caveat"])
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
        Path(args.out).with_suffix(".md").write_text(markdown_report(result))
    return 0


def markdown_report(result: dict) -> str:
    """The run as a Markdown page: measured rows with ratios to mlx-lm, then the link model."""
    base = result["measured"]["mlx_lm AR"]["tokens_per_s"] or 0.0
    shape = result["shape"]
    lines = [
        "# ReDrafter on a sharded model",
        "",
        f"- ranks: {result['group_size']} ({result['device']}); {result['prompts']} MT-Bench "
        f"first turns, {result['max_tokens']} tokens, greedy; ReDrafter W={shape['beam_width']} "
        f"L={shape['beam_length']}",
        f"- caveat: {result['caveat']}",
        "",
        "| decoder | tokens/s | vs mlx-lm | forwards per token | s per forward | same as mlx-lm |",
        "|---|---|---|---|---|---|",
    ]
    for name, m in result["measured"].items():
        tps = m["tokens_per_s"] or 0.0
        lines.append(
            f"| {name} | {tps:.2f} | {tps / base if base else 0:.2f} | "
            f"{m['forwards_per_token'] or 0:.3f} | {m['s_per_forward'] or 0:.3f} | "
            f"{m['same_as_mlx_lm']}/{result['prompts']} |"
        )
    lines += [
        "",
        f"Link model ({result['link_model']['ranks']} ranks, "
        f"{result['link_model']['allreduces_per_forward']} all-reduces per forward), predicted "
        "tokens/s:",
        "",
        "| latency us | bandwidth GB/s | mlx-lm AR | ReDrafter |",
        "|---|---|---|---|",
    ]
    for row in result["predictions"]:
        lines.append(
            f"| {row['latency_us']:g} | {row['bandwidth_gbs']:g} | {row['mlx_lm AR']:.2f} | "
            f"{row['ReDrafter']:.2f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
