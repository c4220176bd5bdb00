"""What verification and drafting cost on this device (the CLI; the measuring itself is the
tuner's, `mlx_redrafter.tuning.costs`).

- `forward_cost_curve`: LLM forward time over N tokens after a cache of a given length, for
  N = 1, 2, 4, ..., 128, through the engine's own tree verification (a chain of N tokens: the
  tree mask and per-token RoPE are in the measured path). Relative to N = 1 it decides which tree
  sizes pay on a device: on a CPU, where arithmetic bounds a forward, its cost grows quickly
  with N; on a GPU it grows slowly over small trees (docs/DESIGN.md section 3 and BENCHMARKS.md
  have the curves).
- `draft_costs`: beam search of each shape (W, L) from real hidden states, with the host sync
  and tree packing the engine does, and the packed tree's mean size.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from mlx_redrafter.tuning.costs import (
    DEFAULT_SIZES,
    draft_costs,
    filled_cache,
    forward_cost_curve,
    interpolate,
    relative_curve,
    sample_states,
    time_forward,
)

__all__ = [
    "DEFAULT_SIZES",
    "draft_costs",
    "filled_cache",
    "forward_cost_curve",
    "interpolate",
    "main",
    "relative_curve",
    "sample_states",
    "time_forward",
]


# ---------------------------------------------------------------------------- CLI
def main(argv: Sequence[str] | None = None) -> int:
    """`python -m mlx_redrafter.benchmarks.cost_curve`: forward curve, beam-search costs, and
    their ratio.

    The ratio t_draft(W, L) / t_forward(1 token) is the drafter's overhead per step: every
    accepted token has to pay it back, so a drafter is judged by it as much as by acceptance
    (BENCHMARKS.md has the target and the figures).
    """
    import argparse
    import json

    from mlx_redrafter.chat_template import chat_tokens
    from mlx_redrafter.models import load

    from .prompts import DEFAULT_PROMPTS, load_questions, turn_messages

    p = argparse.ArgumentParser(
        prog="python -m mlx_redrafter.benchmarks.cost_curve", description=main.__doc__
    )
    p.add_argument("--model", default=None)
    p.add_argument("--drafter", default=None)
    p.add_argument("--prompts", default=str(DEFAULT_PROMPTS), help="states drafted from")
    p.add_argument("--shapes", nargs="+", default=["4x5"], help="WxL, e.g. 1x5 4x5 8x4")
    p.add_argument("--sizes", nargs="+", type=int, default=[1, 2, 4, 8, 16, 32])
    p.add_argument("--cache-len", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=None, help="write JSON here")
    args = p.parse_args(argv)
    try:  # before the model loads: a bad file is reported at once
        questions = load_questions(args.prompts, limit=4)
    except (ValueError, FileNotFoundError) as e:
        p.error(str(e))
    shapes = [tuple(int(x) for x in s.lower().split("x")) for s in args.shapes]
    model, tokenizer, drafter = load(args.model, drafter_path=args.drafter)
    curve = forward_cost_curve(model, args.sizes, cache_len=args.cache_len, repeats=args.repeats)
    result = {"cache_len": args.cache_len, "forward_s": curve}
    print(f"forward over {args.cache_len} cached tokens, t(1) = {curve[min(curve)] * 1e3:.1f} ms:")
    print("  " + " ".join(f"N={n}: {r:.2f}x" for n, r in relative_curve(curve).items()))
    if drafter is not None:
        sequences = [chat_tokens(tokenizer, turn_messages(q, 0, [])) for q in questions]
        states = sample_states(model, sequences, count=4)
        drafts = draft_costs(model, drafter, shapes, states, repeats=args.repeats)
        base = curve.get(1) or time_forward(model, filled_cache(model, args.cache_len), 1)
        result["draft"] = {}
        for (w, n), d in drafts.items():
            ratio = d["draft_s"] / base
            result["draft"][f"W{w}L{n}"] = {**d, "ratio_to_forward1": ratio}
            print(
                f"beam search W{w} L{n}: {d['draft_s'] * 1e3:.1f} ms "
                f"= {ratio:.2f} x t(1); packed tree {d['tree_size']:.1f} tokens"
            )
    if args.out:
        result["forward_s"] = {str(k): v for k, v in curve.items()}
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
