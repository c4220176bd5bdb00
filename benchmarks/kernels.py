"""Tree-attention kernel vs SDPA + dense mask: correctness, timings, end-to-end tokens/s.

One script for the GPU session (BENCHMARKS.md, "GPU script"), in four parts, each written
to `$OUT/kernels.json` as soon as it completes:

1. correctness: the kernel (and SDPA with the dense mask) against a float64 NumPy reference on
   random trees and shapes, float32 / float16 / bfloat16, GQA, windows, split-K on and off;
   max |out - ref| / max |ref| per case, against `TOLERANCE` per dtype;
2. timings: one attention call, kernel vs SDPA + dense mask, for prefix lengths 256, 2048, 8192
   and tree sizes 8, 32, 64, per model shape (keys/values are a slice of a larger cache buffer,
   as the engine hands them over); the host-side cost of building the dense mask is reported
   separately (the kernel path never builds it);
3. lossless: greedy decoding with `attention="kernel"` against mlx-lm's own greedy decoding on
   the tiny float32 test models of every architecture (near-ties checked as docs/DESIGN.md section 5
   says);
4. end to end: tokens/s of `generate_step` with each path, random-weight SmolLM2-135M shape and
   a random drafter, float16, at two context lengths.

On the GPU machine, from the repository root (the installed wheel has everything, part 3's tiny
models included: mlx_redrafter.benchmarks.tiny):
    source .device-kit/setup.sh && python3 -P -m mlx_redrafter.benchmarks.kernels
Here, as a CPU smoke test (SDPA path only; the kernel is reported unavailable):
    python -m mlx_redrafter.benchmarks.kernels --smoke
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_redrafter.benchmarks.kernel_reference import reference_attention
from mlx_redrafter.kernels import (
    dense_tree_mask,
    gpu_backend,
    kernel_tree_attention,
    resolve_attention,
    sdpa_tree_attention,
)

SHAPES = {
    # name: (query heads, KV heads, head dim)
    "llama3-8b": (32, 8, 128),
    "smollm2-135m": (9, 3, 64),
}
SMOKE_SHAPES = {"tiny": (4, 2, 64)}
PREFIXES = (256, 2048, 8192)
TREE_SIZES = (8, 32, 64)
DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
TOLERANCE = {"float32": 1e-5, "float16": 1e-3, "bfloat16": 8e-3}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- inputs
def random_parents(rng, n: int, max_depth: int = 6) -> np.ndarray:
    """A random tree of n packed tokens (parents precede children), depth at most max_depth."""
    parents = np.full(n, -1, dtype=np.int32)
    depth = np.zeros(n, dtype=np.int64)
    for i in range(1, n):
        candidates = np.flatnonzero(depth[:i] < max_depth)
        parents[i] = rng.choice(candidates)
        depth[i] = depth[parents[i]] + 1
    return parents


def make_inputs(rng, shape, prefix: int, n: int, dtype, slack: int = 256):
    """Queries (1, Hq, N, D); keys/values sliced from a (1, Hkv, prefix + n + slack, D) buffer."""
    q_heads, kv_heads, dim = shape
    q = mx.array(rng.standard_normal((1, q_heads, n, dim)).astype(np.float32)).astype(dtype)
    total = prefix + n
    kbuf = mx.array(rng.standard_normal((1, kv_heads, total + slack, dim)).astype(np.float32))
    vbuf = mx.array(rng.standard_normal((1, kv_heads, total + slack, dim)).astype(np.float32))
    k, v = kbuf.astype(dtype)[:, :, :total], vbuf.astype(dtype)[:, :, :total]
    mx.eval(q, k, v)
    return q, k, v


def rel_err(got, ref) -> float:
    got = np.array(got.astype(mx.float32)).astype(np.float64)
    return float(np.abs(got - ref).max() / np.abs(ref).max())


# ---------------------------------------------------------------------------- 1. correctness
def correctness(shapes, smoke: bool, kernel: bool) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    cases = [(37, 5, None, None), (1000, 17, None, None), (1000, 17, None, 1), (700, 64, 64, None)]
    if smoke:
        cases = [(37, 5, None, None), (100, 8, 16, None)]
    for name, shape in shapes.items():
        for dname, dtype in DTYPES.items():
            for prefix, n, window, splits in cases:
                parents = random_parents(rng, n)
                q, k, v = make_inputs(rng, shape, prefix, n, dtype, slack=3)
                scale = shape[2] ** -0.5
                mask = dense_tree_mask(parents, prefix, window)
                ref = reference_attention(q, k, v, mask, scale)
                row = dict(shape=name, dtype=dname, prefix=prefix, tree=n, window=window)
                row["sdpa_err"] = rel_err(
                    sdpa_tree_attention(q, k, v, parents, scale=scale, window=window), ref
                )
                if kernel:
                    out = kernel_tree_attention(
                        q, k, v, mx.array(parents), scale=scale, window=window, splits=splits
                    )
                    row["splits"] = splits
                    row["kernel_err"] = rel_err(out, ref)
                    row["ok"] = row["kernel_err"] < TOLERANCE[dname]
                rows.append(row)
                log(f"  correctness {row}")
    return rows


# ---------------------------------------------------------------------------- 2. timings
def time_calls(fn, layers: int, reps: int) -> float:
    """Median ms per call: `layers` independent calls per evaluation, as in one forward."""
    for _ in range(2):
        mx.eval([fn() for _ in range(layers)])
    samples = []
    for _ in range(reps):
        tic = time.perf_counter()
        mx.eval([fn() for _ in range(layers)])
        samples.append((time.perf_counter() - tic) * 1e3 / layers)
    return float(np.median(samples))


def timings(shapes, prefixes, sizes, dtype, kernel: bool, layers: int, reps: int) -> list[dict]:
    rng = np.random.default_rng(1)
    rows = []
    for name, shape in shapes.items():
        scale = shape[2] ** -0.5
        for prefix in prefixes:
            for n in sizes:
                parents = random_parents(rng, n)
                q, k, v = make_inputs(rng, shape, prefix, n, dtype)
                tic = time.perf_counter()
                mask = mx.array(dense_tree_mask(parents, prefix))
                mx.eval(mask)
                mask_ms = (time.perf_counter() - tic) * 1e3
                row = dict(shape=name, prefix=prefix, tree=n, mask_build_ms=mask_ms)
                row["sdpa_ms"] = time_calls(
                    lambda q=q, k=k, v=v, m=mask, scale=scale: sdpa_tree_attention(
                        q, k, v, None, scale=scale, mask=m
                    ),
                    layers,
                    reps,
                )
                if kernel:
                    p = mx.array(parents)
                    row["kernel_ms"] = time_calls(
                        lambda q=q, k=k, v=v, p=p, scale=scale: kernel_tree_attention(
                            q, k, v, p, scale=scale
                        ),
                        layers,
                        reps,
                    )
                    row["kernel_nosplit_ms"] = time_calls(
                        lambda q=q, k=k, v=v, p=p, scale=scale: kernel_tree_attention(
                            q, k, v, p, scale=scale, splits=1
                        ),
                        layers,
                        reps,
                    )
                    row["speedup"] = row["sdpa_ms"] / row["kernel_ms"]
                rows.append(row)
                log(f"  timing {row}")
    return rows


# ---------------------------------------------------------------------------- 3. lossless
def lossless(max_tokens: int, attention: str) -> list[dict]:
    from mlx_redrafter.benchmarks.tiny import (
        CONFIGS,
        VOCAB,
        OracleDrafter,
        engine_tokens,
        first_divergence_is_tie,
        make_model,
        reference_greedy,
    )

    rows = []
    for name in CONFIGS:
        model = make_model(name)
        for seed, (width, length) in enumerate([(4, 5), (8, 3)]):
            prompt = np.random.default_rng(seed).integers(3, VOCAB, size=13).tolist()
            expected = reference_greedy(model, prompt, max_tokens)
            oracle = OracleDrafter(prompt + expected, len(prompt), VOCAB, seed=seed)
            got, _ = engine_tokens(
                model, oracle, prompt, max_tokens, beam_width=width, beam_length=length,
                attention=attention,
            )  # fmt: skip
            ok, diff, gap = first_divergence_is_tie(model, prompt, expected, got)
            row = dict(arch=name, W=width, L=length, attention=attention, equal=got == expected)
            row.update(lossless=bool(ok), first_diff=diff, gap=None if diff is None else gap)
            rows.append(row)
            log(f"  lossless {row}")
        model._redrafter_context.attention = "sdpa"
    return rows


# ---------------------------------------------------------------------------- 4. end to end
def end_to_end(model_name: str, contexts, max_tokens: int, attentions, dtype) -> list[dict]:
    from mlx_redrafter.generate import generate_step

    from .gpu import SHAPES as MODEL_SHAPES
    from .gpu import build_drafter, build_model

    config = MODEL_SHAPES[model_name]
    model = build_model(model_name, dtype)
    drafter = build_drafter(config, dtype, None)
    rng = np.random.default_rng(2)
    rows = []
    for context in contexts:
        prompt = mx.array(rng.integers(3, config["vocab_size"], size=context).astype(np.int32))
        for attention in attentions:
            best = None
            for _ in range(2):  # the first run compiles kernels and warms up
                steps = 0
                tokens = 0
                tic = None
                for new, stats in generate_step(
                    prompt, model, drafter, max_tokens=max_tokens, attention=attention
                ):
                    if stats.prefill:
                        tic = time.perf_counter()
                        continue
                    steps += 1
                    tokens += len(new)
                seconds = time.perf_counter() - tic
                tps = tokens / seconds
                best = tps if best is None else max(best, tps)
            row = dict(model=model_name, context=context, attention=attention)
            row.update(tokens_per_s=best, tokens=tokens, steps=steps)
            rows.append(row)
            log(f"  end-to-end {row}")
    model._redrafter_context.attention = "sdpa"
    return rows


# ---------------------------------------------------------------------------- main
def table(results: dict) -> str:
    lines = ["shape            prefix  tree   sdpa ms  kernel ms  speedup  mask-build ms"]
    for r in results.get("timings", []):
        kernel = f"{r['kernel_ms']:9.4f}" if "kernel_ms" in r else "      n/a"
        speed = f"{r['speedup']:7.2f}x" if "speedup" in r else "     n/a"
        lines.append(
            f"{r['shape']:<15} {r['prefix']:7d} {r['tree']:5d} {r['sdpa_ms']:9.4f} {kernel}  "
            f"{speed} {r['mask_build_ms']:10.3f}"
        )
    bad = [r for r in results.get("correctness", []) if r.get("ok") is False]
    lines.append(f"correctness: {len(results.get('correctness', []))} cases, {len(bad)} failing")
    for key in results.get("errors", {}):
        lines.append(f"ERROR in {key}: {results['errors'][key].strip().splitlines()[-1]}")
    loss = results.get("lossless", [])
    lines.append(f"lossless ({len(loss)} runs): {sum(r['lossless'] for r in loss)} pass")
    for r in results.get("end_to_end", []):
        lines.append(
            f"e2e {r['model']} ctx={r['context']} {r['attention']}: {r['tokens_per_s']:.1f} tok/s"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mlx_redrafter.benchmarks.kernels", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run")
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for the JSON")
    parser.add_argument("--dtype", default="float16", choices=list(DTYPES))
    parser.add_argument("--layers", type=int, default=32, help="calls per evaluation in timings")
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--parts", default="correctness,timings,lossless,end_to_end")
    parser.add_argument("--e2e-model", default="smollm2-135m")
    parser.add_argument("--e2e-tokens", type=int, default=128)
    args = parser.parse_args(argv)

    backend = gpu_backend()
    kernel = backend is not None
    parts = set(args.parts.split(","))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "kernels.json"
    results = dict(
        device=str(mx.default_device()),
        backend=backend,
        mlx=mx.__version__,
        auto=resolve_attention("auto"),
        smoke=args.smoke,
    )
    try:
        results["device_info"] = mx.device_info()
    except Exception:  # informational only
        results["device_info"] = None
    if not kernel:
        log(f"kernel unavailable on {mx.default_device()}: SDPA path only")

    def save():
        path.write_text(json.dumps(results, indent=1, default=str))

    shapes = SMOKE_SHAPES if args.smoke else SHAPES

    def part(key: str, title: str, fn) -> None:
        """Run one part; a failure is recorded (and printed) and the next part still runs."""
        if key not in parts:
            return
        log(title)
        try:
            results[key] = fn()
        except Exception:  # a kernel that fails to build must not cost the other parts
            results.setdefault("errors", {})[key] = traceback.format_exc()
            log(results["errors"][key])
        save()

    t0 = time.perf_counter()
    part("correctness", "1. correctness", lambda: correctness(shapes, args.smoke, kernel))
    prefixes, sizes = ((16, 64), (4, 8)) if args.smoke else (PREFIXES, TREE_SIZES)
    layers, reps = (2, 2) if args.smoke else (args.layers, args.reps)
    part(
        "timings",
        "2. timings",
        lambda: timings(shapes, prefixes, sizes, DTYPES[args.dtype], kernel, layers, reps),
    )
    attention = "kernel" if kernel else "sdpa"
    part(
        "lossless",
        "3. lossless (float32 tiny models)",
        lambda: lossless(12 if args.smoke else 32, attention),
    )
    attentions = ["sdpa", "kernel"] if kernel else ["sdpa"]
    if args.smoke:
        e2e = lambda: end_to_end("tiny", (16,), 12, attentions, mx.float32)
    else:
        e2e = lambda: end_to_end(
            args.e2e_model, (256, 2048), args.e2e_tokens, attentions, DTYPES[args.dtype]
        )
    part("end_to_end", "4. end to end", e2e)
    results["seconds"] = time.perf_counter() - t0
    save()
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
