"""`mlx_redrafter.benchmark` (or `python -m mlx_redrafter.benchmarks.run`): ReDrafter against
mlx-lm, one process.

Per prompt, after a warm-up, the decoders run interleaved (A B C A B C ... for `--repeats`):
mlx-lm's autoregressive `stream_generate`, our engine with `drafter=None`, ReDrafter at W x L,
and mlx-lm's draft-model speculative decoding with `--draft-model`. Then, outside the timed
runs: the exact-match check against mlx-lm's greedy output, a profiling pass for phase times,
the verify-cost curve, and with `--sweep` the predicted shape sweep confirmed online.
Writes `<out>/<stamp>-<name>.json`, `.md` and `-*.png`.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_redrafter.chat_template import chat_tokens
from mlx_redrafter.cli_args import add_model_source_args, add_sampling_args, sampling_options
from mlx_redrafter.drafter import beam_arg
from mlx_redrafter.lookup import LOOP_REPEAT_TOKENS, has_repeat, lookup_arg

from . import metrics
from .decoders import Decoder, RunRecord, run_decoder
from .prompts import DEFAULT_PROMPTS, load_questions, quick_subset, turn_messages

# In a checkout: benchmarks/results/; installed (no results/ folder): ./benchmark_results/.
RESULTS_DIR = Path(__file__).resolve().parent / "results"
if not RESULTS_DIR.is_dir():
    RESULTS_DIR = Path("benchmark_results")
SWEEP_WIDTHS = (1, 2, 3, 4, 8)
SWEEP_LENGTHS = (2, 3, 4, 5, 6)
QUICK_PROMPTS, QUICK_TOKENS = 16, 128
FULL_TOKENS = 256


@dataclass
class Context:
    model: object
    tokenizer: object
    drafter: object
    draft_model: object
    temp: float
    accept: str = "exact"  # sampling acceptance rule for ReDrafter (temp > 0)
    top_p: float = 1.0  # mlx-lm's filters, applied by every decoder alike
    top_k: int = 0
    min_p: float = 0.0


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- CLI
def setup_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mlx_redrafter.benchmark",
        description="Tokens/s of ReDrafter vs mlx-lm's decoders, interleaved in one process.",
    )
    add_model_source_args(p)
    p.add_argument("--no-drafter", action="store_true", help="compare the AR paths only")
    p.add_argument("--prompts", default=str(DEFAULT_PROMPTS), help="JSONL (MT-Bench layout)")
    p.add_argument("--turns", type=int, choices=(1, 2), default=1)
    p.add_argument("--limit", type=int, default=None, help="first N questions")
    add_sampling_args(
        p,
        max_tokens=None,
        max_tokens_help=f"tokens per run (default {FULL_TOKENS}; quick: {QUICK_TOKENS})",
        seed=0,
    )
    p.add_argument("--repeats", type=int, default=None, help="default 3 (quick: 1)")
    p.add_argument(
        "--beam-width", type=beam_arg, default="auto", help="W, or 'auto' (default: tuned)"
    )
    p.add_argument(
        "--beam-length", type=beam_arg, default="auto", help="L, or 'auto' (default: tuned)"
    )
    p.add_argument(
        "--prompt-lookup",
        type=lookup_arg,
        default="auto",
        metavar="N",
        help="longest prompt-lookup copy in ReDrafter's trees (0: none; default auto: tuned); "
        "a row of lookup alone (our engine, no RNN) is added when N > 0",
    )
    p.add_argument(
        "--guard",
        action="store_true",
        help="measure ReDrafter with the guard (default: without it, as users get it)",
    )
    p.add_argument("--no-guard", action="store_true", help="no guard (the default)")
    p.add_argument(
        "--guard-ab",
        action="store_true",
        help="run the ReDrafter setting both with and without the guard, interleaved",
    )
    p.add_argument("--draft-model", default=None, help="mlx-lm draft model for its spec. decoding")
    p.add_argument("--num-draft-tokens", type=int, default=2)
    p.add_argument("--quick", action="store_true", help=f"{QUICK_PROMPTS} prompts, {QUICK_TOKENS}")
    p.add_argument("--sweep", action="store_true", help="predicted W x L sweep, best confirmed")
    p.add_argument("--sweep-prompts", type=int, default=16, help="answers for offline acceptance")
    p.add_argument("--confirm", type=int, default=3, help="best predicted shapes run online")
    p.add_argument("--confirm-prompts", type=int, default=8)
    p.add_argument("--profile-prompts", type=int, default=None, help="default 4; 0 skips")
    p.add_argument("--no-curve", action="store_true", help="skip the verify-cost curve")
    p.add_argument("--curve-cache-len", type=int, default=256)
    p.add_argument("--calibration", default=None, help="JSONL prompts for --beam-* auto")
    p.add_argument("--retune", action="store_true", help="ignore a cached auto shape")
    p.add_argument(
        "--no-confirm",
        action="store_true",
        help="keep the tuner's predicted best without confirming it online (tests, sweeps)",
    )
    p.add_argument("--warmup-tokens", type=int, default=16)
    p.add_argument("--out", default=str(RESULTS_DIR), help="output folder")
    p.add_argument("--name", default=None, help="file name tag (default: quick or full)")
    p.add_argument("--save-tokens", action="store_true", help="keep output token ids in JSON")
    return p


def _resolve_defaults(args) -> None:
    if args.max_tokens is None:
        args.max_tokens = QUICK_TOKENS if args.quick else FULL_TOKENS
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    if args.profile_prompts is None:
        args.profile_prompts = 4
    if args.name is None:
        args.name = "quick" if args.quick else ("sweep" if args.sweep else "full")
    if args.repeats < 1 or args.max_tokens < 1:
        raise ValueError("--repeats and --max-tokens must be positive")
    sampling_options(args)  # names a bad sampling flag before the model loads


# ---------------------------------------------------------------------------- timed runs
def build_decoders(args, drafter, width, length) -> dict[str, Decoder]:
    decoders = {
        "mlx_lm": Decoder("mlx_lm", "mlx_lm", "mlx-lm autoregressive"),
        "ours_ar": Decoder("ours_ar", "engine", "ours, drafter=None"),
    }
    lookup = args.prompt_lookup
    guard = args.guard and not args.no_guard
    if lookup:
        decoders["lookup"] = Decoder(
            "lookup", "engine", f"ours, prompt lookup <= {lookup}, no RNN", prompt_lookup=lookup
        )
    if drafter is not None and width > 0:
        label = f"ReDrafter W={width} L={length}" + (f" + lookup <= {lookup}" if lookup else "")
        decoders["redrafter"] = Decoder(
            "redrafter", "engine", label + (" (guarded)" if guard else ""), width, length,
            prompt_lookup=lookup, guard=guard,
        )  # fmt: skip
        if args.guard_ab:  # the other setting of the guard, as an extra row
            name = "redrafter_unguarded" if guard else "redrafter_guarded"
            decoders[name] = Decoder(
                name, "engine", label + (" (no guard)" if guard else " (guarded)"), width,
                length, prompt_lookup=lookup, guard=not guard,
            )  # fmt: skip
    if args.draft_model:
        k = args.num_draft_tokens
        decoders["draft_model"] = Decoder(
            "draft_model", "draft_model", f"mlx-lm draft model (k={k})", num_draft_tokens=k
        )
    return decoders


def warm_up(ctx: Context, decoders: dict[str, Decoder], prompt: list[int], tokens: int) -> None:
    for d in decoders.values():
        run_decoder(d, ctx, prompt, max_tokens=max(2, tokens), seed=0)


def run_prompt(ctx, decoders, prompt, *, max_tokens, repeats, seed) -> dict[str, list[RunRecord]]:
    """All repeats of all decoders on one prompt, interleaved: A B C A B C ..."""
    runs: dict[str, list[RunRecord]] = {name: [] for name in decoders}
    for r in range(repeats):
        for name, d in decoders.items():
            runs[name].append(run_decoder(d, ctx, prompt, max_tokens=max_tokens, seed=seed + r))
    return runs


def check_match(model, prompt, reference: RunRecord, other: RunRecord, eos_ids) -> dict:
    """Exact match against the reference greedy output; at a divergence, the near-tie test."""
    expected = metrics.with_eos(reference.tokens, eos_ids, reference.ended_by_eos)
    got = metrics.with_eos(other.tokens, eos_ids, other.ended_by_eos)
    diff = metrics.first_divergence(expected, got)
    out = {"exact": diff is None, "first_divergence": diff, "gap": None, "near_tie": None}
    if diff is not None:
        context = list(prompt) + list(reference.tokens[:diff])
        logits = model(mx.array(context)[None])[0, -1].astype(mx.float32)
        tie, gap = metrics.near_tie(
            np.array(logits), metrics.token_at(expected, diff), metrics.token_at(got, diff), eos_ids
        )
        out.update(gap=gap, near_tie=tie)
        out["tokens"] = [metrics.token_at(expected, diff), metrics.token_at(got, diff)]
    return out


def run_all(ctx, decoders, questions, args) -> list[dict]:
    eos = list(ctx.tokenizer.eos_token_ids)
    records = []
    total = len(questions) * args.turns
    for qi, q in enumerate(questions):
        answers: list[str] = []
        for turn in range(min(args.turns, len(q.turns))):
            prompt = chat_tokens(ctx.tokenizer, turn_messages(q, turn, answers))
            runs = run_prompt(
                ctx,
                decoders,
                prompt,
                max_tokens=args.max_tokens,
                repeats=args.repeats,
                seed=args.seed + 1000 * qi,
            )
            reference = runs["mlx_lm"][0]
            answers.append(ctx.tokenizer.decode(reference.tokens))
            rec = {
                "question_id": q.question_id,
                "category": q.category,
                "turn": turn + 1,
                "prompt_tokens": len(prompt),
                "runs": {
                    n: [r.to_json(keep_tokens=args.save_tokens) for r in rs]
                    for n, rs in runs.items()
                },
                "median_tps": {n: metrics.median(r.tps for r in rs) for n, rs in runs.items()},
            }
            rec["speedup"] = {
                n: metrics.median_ratio([r.tps for r in rs], [r.tps for r in runs["mlx_lm"]])
                for n, rs in runs.items()
            }
            if ctx.temp == 0:
                rec["match"] = {
                    n: check_match(ctx.model, prompt, reference, rs[0], eos)
                    | {"stable_over_repeats": all(r.tokens == rs[0].tokens for r in rs)}
                    for n, rs in runs.items()
                    if n != "mlx_lm"
                }
            rec["greedy_loop"] = has_repeat(reference.tokens)
            rec["_prompt"] = prompt
            rec["_reference"] = reference.tokens
            records.append(rec)
            log(
                f"[{len(records)}/{total}] {q.category} #{q.question_id} turn {turn + 1}: "
                + ", ".join(
                    f"{n} {metrics.median(r.tps for r in rs) or 0:.1f} tok/s"
                    for n, rs in runs.items()
                )
                + (
                    f"; ReDrafter {runs['redrafter'][0].mean_accepted or 0:.2f} tokens/step"
                    if "redrafter" in runs
                    else ""
                )
            )
    return records


# ---------------------------------------------------------------------------- summaries
def summarize_group(records: list[dict], kinds: Mapping[str, str], repeats: int) -> dict:
    """Tokens/s, speedups, acceptance and exact matches of each decoder (`kinds`: name -> the
    decoder's kind) over these prompts."""
    out = {}
    base = [metrics.group_tps([_run(p, "mlx_lm", r) for p in records], r) for r in range(repeats)]
    for name in kinds:
        runs = [_run(p, name, r) for p in records for r in range(repeats)]
        per_repeat = [metrics.group_tps(runs, r) for r in range(repeats)]
        first = [r for r in runs if r["repeat"] == 0]
        s = {
            "tps": metrics.median(per_repeat),
            "tps_per_repeat": per_repeat,
            "speedup": metrics.median_ratio(per_repeat, base),
            "speedup_geomean": metrics.geometric_mean(p["speedup"].get(name) for p in records),
            "peak_memory_gb": max((r["peak_memory_gb"] for r in runs), default=None),
            "generation_tokens": sum(r["generation_tokens"] for r in first),
        }
        steps = sum(r["steps"] or 0 for r in first)
        if steps:
            s["mean_accepted"] = sum(r["generation_tokens"] - 1 for r in first) / steps
            s["accepted_hist"] = metrics.add_histograms(r["accepted_hist"] for r in first)
        if kinds[name] == "draft_model":
            drafted = sum(r["draft_tokens"] or 0 for r in first)
            s["draft_token_share"] = drafted / max(1, s["generation_tokens"])
        matches = [p["match"][name] for p in records if name in p.get("match", {})]
        if matches:
            s["match"] = {
                "compared": len(matches),
                "exact": sum(m["exact"] for m in matches),
                "exact_rate": sum(m["exact"] for m in matches) / len(matches),
                "near_ties": sum(bool(m["near_tie"]) for m in matches),
                "other_divergences": sum(
                    m["first_divergence"] is not None and not m["near_tie"] for m in matches
                ),
            }
        out[name] = s
    return out


def _run(prompt_record: dict, name: str, repeat: int) -> dict:
    run = dict(prompt_record["runs"][name][repeat])
    run["repeat"] = repeat
    return run


def summarize(records: list[dict], kinds: Mapping[str, str], repeats: int) -> dict:
    """All prompts, each category, and the prompts whose mlx-lm answer holds no greedy loop
    (`greedy_loop`: a verbatim repeat of `LOOP_REPEAT_TOKENS`), where copying is not trivial."""
    categories: dict[str, list[dict]] = {}
    for p in records:
        categories.setdefault(p["category"], []).append(p)
    loop_free = [p for p in records if p.get("greedy_loop") is False]
    return {
        "overall": summarize_group(records, kinds, repeats),
        "categories": {
            c: summarize_group(ps, kinds, repeats) for c, ps in sorted(categories.items())
        },
        "loop_free": {
            "repeat_tokens": LOOP_REPEAT_TOKENS,
            "prompts": len(loop_free),
            "of": len(records),
            "summary": summarize_group(loop_free, kinds, repeats) if loop_free else None,
        },
    }


# ---------------------------------------------------------------------------- extra passes
def profile_pass(ctx, records, width, length, max_tokens, count, lookup=0) -> dict:
    """Phase times (synced) for the engine's AR path and ReDrafter on the first prompts.

    Both run the engine's decode loop with a phase-timing probe (`profiling.profiled_decode`);
    the ReDrafter pass includes the prompt-lookup branch when there is one. Without the RNN
    (W = 0) only the AR path is profiled, and no ideal speedup is derived."""
    from .profiling import combine, phase_summary, profiled_decode

    eos = ctx.tokenizer.eos_token_ids
    ar, rd, parity = [], [], []
    for p in records[:count]:
        prompt = p["_prompt"]
        ar.append(profiled_decode(ctx.model, None, prompt, max_tokens=max_tokens, eos_ids=eos))
        if ctx.drafter is not None and width > 0:
            res = profiled_decode(
                ctx.model,
                ctx.drafter,
                prompt,
                max_tokens=max_tokens,
                beam_width=width,
                beam_length=length,
                eos_ids=eos,
                prompt_lookup=lookup,
            )
            rd.append(res)
            if ctx.temp == 0:  # the pass is greedy: comparable with greedy references only
                parity.append([t for t in res.tokens if t not in set(eos)] == p["_reference"])
    phases = phase_summary(combine(ar), combine(rd))
    return {"prompts": len(ar), "phases": phases, "profiled_output_matches_mlx_lm": parity}


def ideal_figures(profile: dict, summary: dict) -> dict | None:
    ph = profile.get("phases", {})
    if "ours_ar" not in ph or "redrafter" not in ph:
        return None
    overall = summary["overall"].get("redrafter", {})
    acc = overall.get("mean_accepted") or ph["redrafter"]["mean_accepted"]
    t_one = ph["ours_ar"]["per_step_s"]["verify"]
    t_verify = ph["redrafter"]["per_step_s"]["verify"]
    t_draft = ph["redrafter"]["per_step_s"]["draft"]
    ideal = metrics.ideal_speedup(acc, t_one, t_verify, t_draft)
    measured = overall.get("speedup")
    # The same pass's own speedup (AR and ReDrafter profiled back to back on the same prompts):
    # immune to load drift between the timed runs and this pass, but it pays the extra syncs.
    ar_tps, rd_tps = (
        ph[n]["mean_accepted"] * ph[n]["steps"] / ph[n]["decode_s"]
        for n in ("ours_ar", "redrafter")
    )
    return {
        "mean_accepted": acc,
        "t_one_ms": t_one * 1e3,
        "t_verify_ms": t_verify * 1e3,
        "t_draft_ms": t_draft * 1e3,
        "t_accept_commit_ms": ph["redrafter"]["per_step_s"]["accept_commit"] * 1e3,
        "ideal_speedup": ideal,
        "measured_speedup": measured,
        "efficiency": metrics.efficiency(measured, ideal),
        "profiled_speedup": rd_tps / ar_tps,
        "efficiency_same_pass": metrics.efficiency(rd_tps / ar_tps, ideal),
    }


def verify_curve(model, cache_len) -> dict:
    from .cost_curve import DEFAULT_SIZES, forward_cost_curve, relative_curve

    curve = forward_cost_curve(model, DEFAULT_SIZES, cache_len=cache_len)
    return {
        "cache_len": cache_len,
        "seconds": {str(n): t for n, t in curve.items()},
        "relative": {str(n): r for n, r in relative_curve(curve).items()},
    }


def sweep(ctx, records, args, curve, profile) -> dict:
    """Predict every W x L from offline acceptance and measured costs; confirm the best online."""
    from mlx_redrafter.tuning import best_shape, estimate_shapes

    shapes = [(w, l) for w in SWEEP_WIDTHS for l in SWEEP_LENGTHS]  # noqa: E741
    sequences = [(p["_prompt"], p["_reference"]) for p in records[: args.sweep_prompts]]
    lengths = [len(s[0]) + len(s[1]) // 2 for s in sequences]
    cache_len = int(np.median(lengths)) if lengths else args.curve_cache_len
    ar = (profile or {}).get("phases", {}).get("ours_ar")
    overhead = ar["per_step_s"]["total"] - ar["per_step_s"]["verify"] if ar else 0.0
    known = None
    if curve and curve["cache_len"] == cache_len:
        known = {int(n): t for n, t in curve["seconds"].items()}
    tic = time.perf_counter()
    estimates, used_curve = estimate_shapes(
        ctx.model,
        ctx.drafter,
        sequences,
        shapes,
        cache_len=cache_len,
        overhead_s=overhead,
        curve=known,
        log=log,
    )
    predicted_s = time.perf_counter() - tic
    ranked = sorted(estimates, key=lambda e: -e.predicted_speedup)
    chosen = [(e.beam_width, e.beam_length) for e in ranked[: args.confirm]]
    default = (args.beam_width, args.beam_length)
    if default not in chosen:
        chosen.append(default)
    log(f"sweep: confirming {chosen} online on {args.confirm_prompts} prompts")
    decoders = {"mlx_lm": Decoder("mlx_lm", "mlx_lm", "mlx-lm autoregressive")}
    for w, l in chosen:  # noqa: E741
        decoders[f"redrafter_W{w}L{l}"] = Decoder(
            f"redrafter_W{w}L{l}", "engine", f"ReDrafter W={w} L={l}", w, l
        )
    tps: dict[str, list[RunRecord]] = {n: [] for n in decoders}
    for p in records[: args.confirm_prompts]:
        runs = run_prompt(
            ctx, decoders, p["_prompt"], max_tokens=args.max_tokens, repeats=1, seed=args.seed
        )
        for n, rs in runs.items():
            tps[n] += rs

    def group(rs):
        seconds = sum(r.decode_s for r in rs)
        return sum(r.generation_tokens for r in rs) / seconds if seconds else None

    base = group(tps["mlx_lm"])
    confirmed = []
    for w, l in chosen:  # noqa: E741
        e = _estimate(estimates, (w, l))
        rs = tps[f"redrafter_W{w}L{l}"]
        steps = sum(r.steps or 0 for r in rs)
        confirmed.append(
            {
                "beam_width": w,
                "beam_length": l,
                "predicted_speedup": e.predicted_speedup if e else None,
                "speedup": (group(rs) / base) if base and group(rs) else None,
                "mean_accepted": metrics.mean_accepted(
                    sum(r.generation_tokens for r in rs) - len(rs) + 1, steps
                ),
            }
        )
    best_pred = best_shape(estimates)
    return {
        "shapes": shapes,
        "sequences": len(sequences),
        "cache_len": cache_len,
        "overhead_s": overhead,
        "forward_curve_s": {str(n): t for n, t in sorted(used_curve.items())},
        "estimates": [e.__dict__ for e in estimates],
        "best_predicted": [best_pred.beam_width, best_pred.beam_length],
        "predict_seconds": predicted_s,
        "confirmed": confirmed,
        "confirm_prompts": min(args.confirm_prompts, len(records)),
    }


def _estimate(estimates, shape):
    return next((e for e in estimates if (e.beam_width, e.beam_length) == tuple(shape)), None)


# ---------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> int:
    args = setup_arg_parser().parse_args(argv)
    try:
        return _main(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"mlx_redrafter.benchmark: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: results are written only once every run is done
        from mlx_redrafter._cli import interrupted

        return interrupted("mlx_redrafter.benchmark")


def _main(args) -> int:
    from mlx_redrafter._blas import blas_description
    from mlx_redrafter.models import load

    from .report import environment, markdown, write_report

    _resolve_defaults(args)
    wall = time.perf_counter()
    questions = load_questions(args.prompts)
    if args.quick:
        questions = quick_subset(questions, args.limit or QUICK_PROMPTS)
    elif args.limit is not None:
        questions = questions[: args.limit]
    log(f"BLAS: {blas_description()}; device: {mx.default_device()}")
    model, tokenizer, drafter = load(args.model, drafter_path=args.drafter)
    if args.no_drafter:
        drafter = None
    if drafter is None and not args.no_drafter:
        log("note: no drafter found for this model: comparing the autoregressive paths only")
    draft_model = None
    if args.draft_model:
        import mlx_lm

        draft_model, _ = mlx_lm.load(args.draft_model)
    ctx = Context(model, tokenizer, drafter, draft_model, **sampling_options(args))

    autotuned = None
    width, length, lookup = args.beam_width, args.beam_length, args.prompt_lookup
    if "auto" in (width, length, lookup) and (drafter is not None or lookup == "auto"):
        from mlx_redrafter.tuning import DEFAULT_LOOKUPS, auto_grid, autotune

        autotuned = autotune(
            model,
            drafter,
            tokenizer,
            prompts=args.calibration,
            shapes=auto_grid(width, length) if drafter is not None else [],
            lookups=DEFAULT_LOOKUPS if lookup == "auto" else (int(lookup),),
            refresh=args.retune,
            confirm=not args.no_confirm,
            log=log,
        )
        width, length, lookup = autotuned["choice"]
        log(f"auto: W={width} L={length} prompt lookup <= {lookup}")
    if "auto" in (width, length):
        width, length = (4, 5) if drafter is not None else (0, 0)
    args.beam_width, args.beam_length, args.prompt_lookup = int(width), int(length), int(lookup)

    decoders = build_decoders(args, drafter, args.beam_width, args.beam_length)
    first = chat_tokens(tokenizer, turn_messages(questions[0], 0, []))
    log(f"warm-up: {', '.join(decoders)}")
    warm_up(ctx, decoders, first, args.warmup_tokens)
    records = run_all(ctx, decoders, questions, args)
    summary = summarize(records, {n: d.kind for n, d in decoders.items()}, args.repeats)

    profile = None
    if args.profile_prompts > 0:
        log(f"profiling pass on {min(args.profile_prompts, len(records))} prompts")
        profile = profile_pass(
            ctx,
            records,
            args.beam_width,
            args.beam_length,
            args.max_tokens,
            args.profile_prompts,
            args.prompt_lookup,
        )
        profile["ideal"] = ideal_figures(profile, summary)
    curve = None
    if not args.no_curve:
        log(f"verify-cost curve after {args.curve_cache_len} cached tokens")
        curve = verify_curve(model, args.curve_cache_len)
    sweep_result = None
    if args.sweep:
        if drafter is None or args.temp != 0:
            log("note: --sweep needs a drafter and greedy decoding; skipped")
        else:
            sweep_result = sweep(ctx, records, args, curve, profile)
            if autotuned is not None:
                sweep_result["auto"] = _auto_vs_sweep(autotuned, sweep_result)

    for p in records:
        p.pop("_prompt")
        p.pop("_reference")
    model_name = args.model or "default (SmolLM2-135M-Instruct)"
    drafter_name = (
        None if drafter is None else (args.drafter or f"{args.model or 'default model'}/drafter")
    )
    results = {
        "environment": environment(model, model_name, drafter_name),
        "config": {
            "prompts": str(args.prompts),
            "num_prompts": len(records),
            "turns": args.turns,
            "max_tokens": args.max_tokens,
            "repeats": args.repeats,
            "temp": args.temp,
            "top_p": args.top_p,
            "top_k": args.top_k,
            "min_p": args.min_p,
            "accept": args.accept,
            "seed": args.seed,
            "beam_width": args.beam_width,
            "beam_length": args.beam_length,
            "prompt_lookup": args.prompt_lookup,
            "quick": args.quick,
            "draft_model": args.draft_model,
            "num_draft_tokens": args.num_draft_tokens if args.draft_model else None,
            "argv": sys.argv[1:],
        },
        "decoders": {n: d.__dict__ for n, d in decoders.items()},
        "summary": summary,
        "profile": profile,
        "verify_cost_curve": curve,
        "sweep": sweep_result,
        "autotune": _auto_brief(autotuned),
        "prompts": records,
    }
    results["wall_s"] = time.perf_counter() - wall
    out = Path(args.out)
    stem = f"{time.strftime('%Y%m%d-%H%M%S')}-{args.name}"
    written = write_report(results, out, stem)
    print(markdown(results))
    log("wrote " + ", ".join(str(p) for p in written))
    return 0


def _auto_brief(record: dict | None) -> dict | None:
    if record is None:
        return None
    keys = ("choice", "predicted_best", "predicted_speedup", "confirmed_tps", "seconds", "cached")
    return {k: record.get(k) for k in (*keys, "key")}


def _auto_vs_sweep(autotuned: dict, sweep_result: dict) -> dict:
    measured = {
        (c["beam_width"], c["beam_length"]): c["speedup"] for c in sweep_result["confirmed"]
    }
    choice = tuple(autotuned["choice"][:2])
    best = max((v for v in measured.values() if v), default=None)
    mine = measured.get(choice)
    return {
        "choice": list(choice),
        "measured_speedup": mine,
        "best_confirmed_speedup": best,
        "within_5_percent": (mine >= 0.95 * best) if mine and best else None,
    }


if __name__ == "__main__":
    sys.exit(main())
