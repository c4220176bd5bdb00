"""Verify cost and end-to-end speedup at controlled acceptance, on MLX's CUDA back-end.

Random-weight models of real shapes (SmolLM2-135M, Vicuna-7B) built from mlx-lm's own llama
classes, a random drafter of the reference layout (exit_dim = 2 x hidden, two ResBlocks), and
an oracle of controlled acceptance: every step runs the real drafter's beam search, packs,
verifies the tree, runs acceptance and commits: the engine's own decode loop
(`mlx_redrafter.benchmarks.profiling.profiled_decode`, engine syncs only), but the number of
drafted tokens kept is drawn from a given distribution. The output of a random model means
nothing, so this measures what a drafter with that acceptance would give on the device. An
oracle that proposes the LLM's true continuation inside the real engine would lose its place at
the first fp16 near-tie between tree verification and one-token decoding, which random weights
make common.

For each model it prints and writes to `$OUT/gpu_benchmark.json`:
- the verify-cost curve: forward time over N = 1..128 tokens after a 512-token cache, / N=1;
- beam-search cost per shape;
- tokens/s of mlx-lm's `generate_step`, of our engine with drafter=None, and of our engine
  with the random drafter (natural acceptance, about 1 token per step: a check that the
  controlled loop costs what the engine costs);
- tokens/s and speedup over mlx-lm at each acceptance distribution and beam shape.

On the GPU machine (BENCHMARKS.md, "GPU script": the package travels as a wheel in the kit):
    source .device-kit/setup.sh && python3 -P -m mlx_redrafter.benchmarks.gpu
Here, as a CPU smoke test:  python -m mlx_redrafter.benchmarks.gpu --tiny
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_redrafter.drafter import Drafter, DrafterConfig
from mlx_redrafter.generate import generate_step as engine_generate_step

from .cost_curve import DEFAULT_SIZES, draft_costs, filled_cache, forward_cost_curve
from .decoders import pristine_rope
from .profiling import phase_summary, profiled_decode

SHAPES = {
    # SmolLM2-135M-Instruct (docs/DESIGN.md section 3)
    "smollm2-135m": dict(
        model_type="llama",
        hidden_size=576,
        num_hidden_layers=30,
        intermediate_size=1536,
        num_attention_heads=9,
        num_key_value_heads=3,
        rms_norm_eps=1e-5,
        vocab_size=49152,
        max_position_embeddings=8192,
        rope_theta=100000.0,
        tie_word_embeddings=True,
    ),
    # Vicuna-7B v1.3 (LLaMA-7B architecture)
    "vicuna-7b": dict(
        model_type="llama",
        hidden_size=4096,
        num_hidden_layers=32,
        intermediate_size=11008,
        num_attention_heads=32,
        num_key_value_heads=32,
        rms_norm_eps=1e-6,
        vocab_size=32000,
        max_position_embeddings=2048,
        rope_theta=10000.0,
        tie_word_embeddings=False,
    ),
    # CPU smoke test
    "tiny": dict(
        model_type="llama",
        hidden_size=64,
        num_hidden_layers=2,
        intermediate_size=96,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        vocab_size=128,
        max_position_embeddings=1024,
        rope_theta=10000.0,
        tie_word_embeddings=True,
    ),
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- models
def build_model(name: str, dtype: mx.Dtype, seed: int = 0):
    from mlx_lm.utils import _get_classes

    config = SHAPES[name]
    model_class, args_class = _get_classes(config)
    mx.random.seed(seed)
    model = model_class(args_class.from_dict(config))
    model.set_dtype(dtype)
    mx.eval(model.parameters())
    return model


def build_drafter(config: dict, dtype: mx.Dtype, draft_vocab: int | None, seed: int = 1):
    mx.random.seed(seed)
    cfg = DrafterConfig(
        vocab_size=config["vocab_size"],
        hidden_size=config["hidden_size"],
        draft_vocab_size=draft_vocab,
    )
    drafter = Drafter(cfg)
    drafter.set_dtype(dtype)
    mx.eval(drafter.parameters())
    return drafter


# ---------------------------------------------------------------------------- distributions
def geometric_hist(alpha: float, length: int) -> list[float]:
    """P(k drafted tokens kept), k = 0..L-1, when each is kept with probability alpha."""
    probs = [alpha**k * (1 - alpha) for k in range(length - 1)] + [alpha ** (length - 1)]
    return [p / sum(probs) for p in probs]


def parse_hist(text: str) -> list[float]:
    """'p1,p2,...' = P(1 token per step), P(2), ...; returned as P(k kept), k = 0.."""
    vals = [float(v) for v in text.split(",") if v.strip()]
    total = sum(vals)
    if not vals or total <= 0:
        raise argparse.ArgumentTypeError(f"bad histogram {text!r}")
    return [v / total for v in vals]


def hist_from_results(path: str) -> tuple[list[float], int, int]:
    """The ReDrafter tokens-per-step histogram (and W, L) of a `mlx_redrafter.benchmark` JSON."""
    results = json.loads(Path(path).read_text())
    hist = results["summary"]["overall"]["redrafter"]["accepted_hist"]
    cfg = results["config"]
    counts = hist[1:]  # index = tokens per step, 1..L
    total = sum(counts)
    return [c / total for c in counts], cfg["beam_width"], cfg["beam_length"]


def mean_tokens(probs: list[float]) -> float:
    return sum((k + 1) * p for k, p in enumerate(probs))


# ---------------------------------------------------------------------------- timed loops
def time_mlx_lm(model, prompt: list[int], max_tokens: int) -> float:
    """mlx-lm's greedy generate_step: tokens/s after the first token."""
    from mlx_lm.generate import generate_step

    with pristine_rope(model):
        n, tic = 0, None
        for _ in generate_step(mx.array(prompt), model, max_tokens=max_tokens):
            if n == 0:
                tic = time.perf_counter()
            n += 1
        elapsed = time.perf_counter() - tic
    return (n - 1) / elapsed


def time_engine(model, drafter, prompt, max_tokens, width=1, length=2) -> dict:
    """Our engine's generate_step: tokens/s after the first token, steps, per-step time."""
    n, steps, tic = 0, 0, None
    for tokens, stats in engine_generate_step(
        mx.array(prompt),
        model,
        drafter,
        max_tokens=max_tokens,
        beam_width=width,
        beam_length=length,
    ):
        if stats.prefill:
            tic = time.perf_counter()
        else:
            steps += 1
        n += len(tokens)
    elapsed = time.perf_counter() - tic
    return {
        "tps": (n - 1) / elapsed,
        "steps": steps,
        "tokens_per_step": (n - 1) / max(1, steps),
        "step_ms": elapsed / max(1, steps) * 1e3,
    }


def time_controlled(model, drafter, prompt, max_tokens, width, length, probs, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    probs = (list(probs) + [0.0] * length)[:length]
    probs = [p / sum(probs) for p in probs]
    res = profiled_decode(
        model,
        drafter,
        prompt,
        max_tokens=max_tokens,
        beam_width=width,
        beam_length=length,
        sync=False,
        forced_accept=lambda: int(rng.choice(length, p=probs)),
    )
    return {
        "tps": (res.generated - 1) / res.decode_s,
        "steps": res.steps,
        "tokens_per_step": res.mean_accepted,
        "step_ms": res.decode_s / max(1, res.steps) * 1e3,
        "mean_tree_size": float(np.mean(res.tree_sizes)) if res.tree_sizes else None,
    }


# ---------------------------------------------------------------------------- one model
def bench_model(name: str, args, distributions: dict[str, list[float]]) -> dict:
    dtype = getattr(mx, args.dtype)
    tic = time.perf_counter()
    model = build_model(name, dtype)
    config = SHAPES[name]
    drafter = build_drafter(config, dtype, args.draft_vocab)
    out: dict = {"model": name, "config": config, "dtype": args.dtype}
    log(f"{name}: built in {time.perf_counter() - tic:.1f} s")

    sizes = [n for n in DEFAULT_SIZES if n <= args.max_verify]
    cache = filled_cache(model, args.cache_len)
    curve = forward_cost_curve(model, sizes, cache=cache, repeats=args.repeats)
    out["verify_cost_curve"] = {
        "cache_len": args.cache_len,
        "ms": {str(n): t * 1e3 for n, t in curve.items()},
        "relative": {str(n): t / curve[1] for n, t in curve.items()},
    }
    log(f"{name}: verify curve " + ", ".join(f"{n}:{t / curve[1]:.2f}" for n, t in curve.items()))

    rng = np.random.default_rng(0)
    prompt = rng.integers(0, config["vocab_size"], size=args.cache_len).tolist()
    states = [
        (mx.random.normal((config["hidden_size"],)).astype(dtype), int(t))
        for t in rng.integers(0, config["vocab_size"], size=2)
    ]
    drafts = draft_costs(model, drafter, args.shapes, states, repeats=args.repeats)
    out["draft_ms"] = {f"{w}x{n}": d["draft_s"] * 1e3 for (w, n), d in drafts.items()}

    base = time_mlx_lm(model, prompt, args.max_tokens)
    out["mlx_lm_tps"] = base
    ours = time_engine(model, None, prompt, args.max_tokens)
    out["ours_ar"] = ours | {"speedup": ours["tps"] / base}
    log(f"{name}: mlx-lm {base:.1f} tok/s, ours drafter=None {ours['tps']:.1f} tok/s")

    rows = []
    for width, length in args.shapes:
        natural = time_engine(model, drafter, prompt, args.max_tokens, width, length)
        rows.append(
            {"shape": f"{width}x{length}", "distribution": "engine, random drafter"}
            | natural
            | {"speedup": natural["tps"] / base}
        )
        for dist_name, probs in distributions.items():
            res = time_controlled(model, drafter, prompt, args.max_tokens, width, length, probs)
            rows.append(
                {"shape": f"{width}x{length}", "distribution": dist_name}
                | res
                | {"speedup": res["tps"] / base, "target_tokens_per_step": mean_tokens(probs)}
            )
            log(
                f"{name}: W={width} L={length} {dist_name}: {res['tokens_per_step']:.2f} "
                f"tokens/step, {res['step_ms']:.1f} ms/step, {rows[-1]['speedup']:.2f}x"
            )
    out["controlled"] = rows

    # where time goes at the first shape and distribution (synced phases)
    width, length = args.shapes[0]
    probs = next(iter(distributions.values()))
    rng2 = np.random.default_rng(1)
    probs_l = (list(probs) + [0.0] * length)[:length]
    probs_l = [p / sum(probs_l) for p in probs_l]
    synced = profiled_decode(
        model,
        drafter,
        prompt,
        max_tokens=args.max_tokens,
        beam_width=width,
        beam_length=length,
        forced_accept=lambda: int(rng2.choice(length, p=probs_l)),
    )
    ar = profiled_decode(model, None, prompt, max_tokens=args.max_tokens)
    out["phases"] = phase_summary(ar, synced)
    out["seconds"] = time.perf_counter() - tic
    del model, drafter, cache
    mx.clear_cache()
    return out


def print_table(results: dict) -> None:
    for m in results["models"]:
        curve = m["verify_cost_curve"]
        print(f"\n== {m['model']} ({m['dtype']}), device {results['device']}")
        print(
            f"verify cost after {curve['cache_len']} tokens (x t(1) = {curve['ms']['1']:.2f} ms): "
            + "  ".join(f"{n}:{r:.2f}" for n, r in curve["relative"].items())
        )
        print("beam search ms: " + "  ".join(f"{s}:{t:.2f}" for s, t in m["draft_ms"].items()))
        print(
            f"mlx-lm {m['mlx_lm_tps']:.1f} tok/s; ours drafter=None {m['ours_ar']['tps']:.1f} "
            f"tok/s ({m['ours_ar']['speedup']:.2f}x)"
        )
        print(f"{'shape':>6} {'distribution':>24} {'tok/step':>8} {'ms/step':>8} {'speedup':>8}")
        for r in m["controlled"]:
            print(
                f"{r['shape']:>6} {r['distribution']:>24} {r['tokens_per_step']:8.2f} "
                f"{r['step_ms']:8.2f} {r['speedup']:8.2f}"
            )


# ---------------------------------------------------------------------------- CLI
def _shape(text: str) -> tuple[int, int]:
    w, l = text.lower().split("x")  # noqa: E741
    return int(w), int(l)


def setup_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mlx_redrafter.benchmarks.gpu", description=__doc__.split("\n")[0]
    )
    p.add_argument("--tiny", action="store_true", help="tiny model on any device (smoke test)")
    p.add_argument("--models", default="smollm2-135m,vicuna-7b", help=f"of {list(SHAPES)}")
    p.add_argument("--dtype", default=None, help="default float16 (tiny: float32)")
    p.add_argument("--cache-len", type=int, default=None, help="default 512 (tiny: 64)")
    p.add_argument("--max-tokens", type=int, default=None, help="default 128 (tiny: 24)")
    p.add_argument("--max-verify", type=int, default=128, help="largest N in the curve")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--shapes", default="1x5,4x5,8x5", help="WxL list")
    p.add_argument("--alphas", default="0.6,0.75,0.85", help="per-token acceptance rates")
    p.add_argument("--hist", action="append", default=[], help="P(1..L tokens/step), commas")
    p.add_argument("--hist-from", default=None, help="a benchmark JSON: its ReDrafter hist")
    p.add_argument("--draft-vocab", type=int, default=None, help="drafter's reduced vocabulary")
    p.add_argument("--out", default=os.environ.get("OUT", "."), help="folder (default $OUT)")
    return p


def main(argv=None) -> int:
    args = setup_arg_parser().parse_args(argv)
    if args.tiny:
        args.models = "tiny"
    args.dtype = args.dtype or ("float32" if args.tiny else "float16")
    args.cache_len = args.cache_len or (64 if args.tiny else 512)
    args.max_tokens = args.max_tokens or (24 if args.tiny else 128)
    if args.tiny:
        args.max_verify = min(args.max_verify, 32)
        args.repeats = min(args.repeats, 2)
    args.shapes = [_shape(s) for s in args.shapes.split(",") if s]
    longest = max(length for _, length in args.shapes)
    distributions = {"accept none": [1.0]}
    for a in (float(x) for x in args.alphas.split(",") if x):
        distributions[f"geometric {a:g}"] = geometric_hist(a, longest)
    for i, h in enumerate(args.hist):
        distributions[f"hist {i + 1}"] = parse_hist(h)
    if args.hist_from:
        probs, w, l = hist_from_results(args.hist_from)  # noqa: E741
        distributions[f"measured (W{w} L{l})"] = probs
        if (w, l) not in args.shapes:
            args.shapes.append((w, l))
    from .report import environment

    results = {
        "environment": environment(),
        "device": str(mx.default_device()),
        "args": {k: v for k, v in vars(args).items()},
        "distributions": distributions,
        "models": [],
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "gpu_benchmark.json"
    for name in [m for m in args.models.split(",") if m]:
        if name not in SHAPES:
            raise SystemExit(f"unknown model shape {name!r} (choose from {list(SHAPES)})")
        results["models"].append(bench_model(name, args, distributions))
        path.write_text(json.dumps(results, indent=1, default=str) + "\n")  # after each model
    print_table(results)
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
