"""Batched decoding speed against the batch size B: total tokens/s of mlx-lm's batch_generate,
ours without a drafter and ours with ReDrafter (the shape chosen per batch size by the batched
tuner, `tuning.batch_choose`), with the tuner's prediction from t(B, N) next to each of ours.

`python -m mlx_redrafter.benchmarks.batch [--model M] [--batch-sizes 1 2 4 8] [--out DIR]`

For each B the first B prompts (MT-Bench first turns spread over categories, packaged data)
run as one batch, every decoder in turn within each repeat (interleaved: a slow phase of the
machine lands on all of them). Tokens/s is decode only, the prefill left out: ours is timed
over `BatchGenerator.next` after `insert` has prefilled the rows (the prefill's first token of
each row not counted), mlx-lm's is its own generation figure (generation tokens over its
generation tokens/s). Greedy: every row of ours is compared with mlx-lm's row (exact, or the
first divergence and whether it is a float near-tie). The prediction is the tuner's for the
option it chose at the smallest tabled batch size >= B (the rule the generator uses); it
leaves out what the measurement holds and the model does not (rows ending, padding between
rows of different lengths). Writes batch.json, batch.md and batch-tps.png.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_redrafter.batch import BatchGenerator, shape_for

from . import metrics
from .decoders import pristine_rope
from .report import environment, write_json, write_text

DECODERS = {
    "mlx_lm": "mlx-lm batch_generate",
    "plain": "ours, no drafter",
    "redrafter": "ours, ReDrafter (shape per B)",
    "guarded": "ours, ReDrafter (shape per B, guard on)",
}


def run_mlx_lm(model, tokenizer, prompts: list[list[int]], max_tokens: int) -> dict:
    """mlx-lm's batch_generate over the prompts as one batch: token ids and decode seconds."""
    from mlx_lm.generate import batch_generate

    b = len(prompts)
    with pristine_rope(model):
        response = batch_generate(
            model, tokenizer, prompts, max_tokens=max_tokens, return_token_ids=True,
            completion_batch_size=b, prefill_batch_size=b,
        )  # fmt: skip
    stats = response.stats
    tps = stats.generation_tps
    seconds = stats.generation_tokens / tps if tps and tps > 0 else 0.0
    return {"ids": response.token_ids, "tokens": stats.generation_tokens, "seconds": seconds}


def run_ours(
    model, tokenizer, prompts: list[list[int]], max_tokens: int, drafter, table, guard=False
) -> dict:
    """Our BatchGenerator over the prompts as one batch: ids, decode tokens and seconds, steps
    and the options the steps used (a guarded step that ran plain counts as W0L0N0)."""
    b = len(prompts)
    gen = BatchGenerator(
        model, drafter, stop_tokens=tokenizer.eos_token_ids, completion_batch_size=b,
        prefill_batch_size=b, shape_table=table, guard=guard,
    )  # fmt: skip
    uids = gen.insert(prompts, max_tokens)
    ids: dict[int, list[int]] = {u: [] for u in uids}
    options: dict[str, int] = {}
    tic = time.perf_counter()
    while gen.busy:
        active = gen.active
        responses = gen.next()
        if active:
            key = "W{}L{}N{}".format(*gen.shape)
            options[key] = options.get(key, 0) + 1
        for r in responses:
            ids[r.uid] += r.tokens
    seconds = time.perf_counter() - tic
    tokens = sum(max(len(t) - 1, 0) for t in ids.values())  # each row's prefill token left out
    return {
        "ids": [ids[u] for u in uids],
        "tokens": tokens,
        "seconds": seconds,
        "forwards": gen.forwards,
        "options": options,
    }


def compare_rows(model, prompts, reference, got, max_tokens: int, eos_ids) -> dict:
    """Rows equal to the reference's, and at each divergence whether it is a float near-tie
    (an output shorter than max_tokens ended at an end-of-sequence token)."""

    def at(tokens, i):
        if i < len(tokens):
            return tokens[i]
        return metrics.EOS if len(tokens) < max_tokens else None

    exact, ties, divergences = 0, 0, []
    for prompt, expected, ours in zip(prompts, reference, got, strict=True):
        diff = metrics.first_divergence(expected, ours)
        if diff is None:
            exact += 1
            continue
        logits = model(mx.array(list(prompt) + list(expected[:diff]))[None])[0, -1]
        tie, gap = metrics.near_tie(
            np.array(logits.astype(mx.float32)), at(expected, diff), at(ours, diff), eos_ids
        )
        ties += tie
        divergences.append({"at": diff, "near_tie": tie, "gap": gap})
    return {"rows": len(prompts), "exact": exact, "near_ties": ties, "divergences": divergences}


def predictions(record: dict, batch: int, forced: tuple | None = None) -> dict:
    """The tuner's predicted tokens/s at `batch` for plain steps and for its chosen option
    (or the `forced` one)."""
    from mlx_redrafter.tuning.batch_choose import PLAIN, table_from_record

    table = table_from_record(record)
    tabled = min([b for b in table if b >= batch] or [max(table)])
    option = tuple(forced) if forced is not None else shape_for(table, batch)
    at = {
        (e["beam_width"], e["beam_length"], e["prompt_lookup"]): e
        for e in record["estimates"]
        if e["batch"] == tabled
    }
    return {
        "tabled_batch": tabled,
        "option": list(option),
        "plain": at[PLAIN]["predicted_tps"],
        "redrafter": at[tuple(option)]["predicted_tps"],
    }


def drafting_pays_up_to(by_batch: dict, plain: str, drafting: str) -> int | None:
    """The largest B up to which drafting beat plain steps at every B (None: not even at 1)."""
    last = None
    for b in sorted(by_batch):
        p, d = by_batch[b].get(plain), by_batch[b].get(drafting)
        if p is None or d is None or d <= p:
            break
        last = b
    return last


def markdown(results: dict) -> str:
    cfg, summary = results["config"], results["summary"]
    lines = [
        "# Batched decoding: total tokens/s against the batch size",
        "",
        f"Model {cfg['model']}, drafter {cfg['drafter']}, {cfg['max_tokens']} tokens a row, "
        f"{cfg['repeats']} repeat(s), {results['environment']['device']}.",
        "Decode tokens/s (prefill left out); in brackets the prediction from t(B, N) (none for "
        "mlx-lm: its forward is not the seam t(B, N) measures).",
        "",
        "| B | mlx-lm | ours, no drafter | ours, ReDrafter | ReDrafter, guard on "
        "| shape (W, L, N) | guard-on steps plain | rows = mlx-lm |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for b, row in sorted(summary["by_batch"].items(), key=lambda kv: int(kv[0])):
        pred = row["predicted"]
        match = row["match"]
        lines.append(
            f"| {b} | {row['mlx_lm']:.1f} | {row['plain']:.1f} ({pred['plain']:.1f}) | "
            f"{row['redrafter']:.1f} ({pred['redrafter']:.1f}) | {row['guarded']:.1f} | "
            f"{tuple(pred['option'])} | {row['plain_steps']:.0%} | plain {match['plain']}, "
            f"ReDrafter {match['redrafter']}, guard on {match['guarded']} |"
        )
    pays = summary["drafting_pays_up_to"]
    lines += [
        "",
        f"Drafting pays up to B = {pays['measured']} measured, B = {pays['predicted']} "
        "predicted (None: not even at B = 1).",
        "",
    ]
    return "\n".join(lines)


def plot(results: dict, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = results["summary"]["by_batch"]
    bs = sorted(int(b) for b in rows)
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for name, label in DECODERS.items():
        line = ax.plot(bs, [rows[str(b)][name] for b in bs], "o-", label=label)
        if name in ("plain", "redrafter"):  # the table option's prediction
            predicted = [rows[str(b)]["predicted"][name] for b in bs]
            ax.plot(bs, predicted, "x--", color=line[0].get_color(), label=f"{label}, predicted")
    ax.set_xscale("log", base=2)
    ax.set_xticks(bs, [str(b) for b in bs])
    ax.set_xlabel("batch size B")
    ax.set_ylabel("total decode tokens/s")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m mlx_redrafter.benchmarks.batch`: total tokens/s against B for mlx-lm's
    batch_generate, ours without a drafter and ours with ReDrafter (shape per B)."""
    import argparse

    from mlx_redrafter.chat_template import chat_tokens
    from mlx_redrafter.models import load
    from mlx_redrafter.tuning.batch_choose import batch_autotune, table_from_record
    from mlx_redrafter.tuning.choose import DEFAULT_LOOKUPS, DEFAULT_SHAPES

    from .prompts import DEFAULT_PROMPTS, load_questions, quick_subset, turn_messages

    p = argparse.ArgumentParser(
        prog="python -m mlx_redrafter.benchmarks.batch", description=main.__doc__
    )
    p.add_argument("--model", default=None)
    p.add_argument("--drafter", default=None)
    p.add_argument("--prompts", default=str(DEFAULT_PROMPTS), help="MT-Bench layout JSONL")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 2, 4, 8])
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--shapes", nargs="+", default=None, help="WxL the tuner tries (default all)")
    p.add_argument("--lookups", nargs="+", type=int, default=list(DEFAULT_LOOKUPS))
    p.add_argument("--tune-prompts", type=int, default=4, help="calibration prompts")
    p.add_argument("--tune-max-tokens", type=int, default=64)
    p.add_argument("--tune-repeats", type=int, default=3)
    p.add_argument("--cache-len", type=int, default=256, help="cached tokens per row in t(B, N)")
    p.add_argument(
        "--shape",
        nargs=3,
        type=int,
        default=None,
        metavar=("W", "L", "N"),
        help="run this option at every B instead of the tuned table (W = 0: no RNN)",
    )
    p.add_argument("--out", default="benchmark-results/batch")
    args = p.parse_args(argv)
    if min(args.batch_sizes) < 1 or args.repeats < 1 or args.max_tokens < 2:
        p.error("batch sizes and repeats must be >= 1 and max-tokens >= 2")
    try:  # before the model loads: a bad file is reported at once
        questions = load_questions(args.prompts)
    except (ValueError, FileNotFoundError) as e:
        p.error(str(e))
    batches = sorted(set(args.batch_sizes))
    if len(questions) < max(batches):
        p.error(f"{len(questions)} prompts in {args.prompts}, fewer than B = {max(batches)}")
    shapes = (
        [tuple(int(x) for x in s.lower().split("x")) for s in args.shapes]
        if args.shapes
        else list(DEFAULT_SHAPES)
    )
    model, tokenizer, drafter = load(args.model, drafter_path=args.drafter)
    if drafter is None:
        p.error("no drafter found for this model: give --drafter")
    chosen = quick_subset(questions, max(batches))
    prompts = [chat_tokens(tokenizer, turn_messages(q, 0, [])) for q in chosen]
    record = batch_autotune(
        model, drafter, tokenizer, max(batches), shapes=shapes, lookups=args.lookups,
        max_tokens=args.tune_max_tokens, num_prompts=args.tune_prompts,
        cache_len=args.cache_len, repeats=args.tune_repeats, log=print,
    )  # fmt: skip
    table = table_from_record(record)
    if args.shape is not None:
        if args.shape[0] and args.shape[1] < 2:
            p.error(f"--shape {' '.join(map(str, args.shape))}: L must be >= 2 with W > 0")
        known = {
            (e["beam_width"], e["beam_length"], e["prompt_lookup"]) for e in record["estimates"]
        }
        if tuple(args.shape) not in known:
            p.error(
                f"--shape {tuple(args.shape)}: not among the tuner's options (--shapes, --lookups)"
            )
        table = {b: tuple(args.shape) for b in batches}
    print("shape per batch size: " + ", ".join(f"B={b}: {o}" for b, o in table.items()))
    runs = []
    for b in batches:
        rows = prompts[:b]
        for repeat in range(args.repeats):
            out = {"mlx_lm": run_mlx_lm(model, tokenizer, rows, args.max_tokens)}
            out["plain"] = run_ours(model, tokenizer, rows, args.max_tokens, None, None)
            out["redrafter"] = run_ours(model, tokenizer, rows, args.max_tokens, drafter, table)
            out["guarded"] = run_ours(
                model, tokenizer, rows, args.max_tokens, drafter, table, guard=True
            )
            for name, run in out.items():
                entry = {"batch": b, "repeat": repeat, "decoder": name, **run}
                if name != "mlx_lm":
                    entry["match"] = compare_rows(
                        model, rows, out["mlx_lm"]["ids"], run["ids"], args.max_tokens,
                        tokenizer.eos_token_ids,
                    )  # fmt: skip
                runs.append(entry)
            print(
                f"B={b} repeat {repeat}: "
                + ", ".join(
                    f"{n} {r['tokens'] / r['seconds']:.1f} tok/s" if r["seconds"] else n
                    for n, r in out.items()
                )
            )
    by_batch = {}
    for b in batches:
        row = {}
        for name in DECODERS:
            chosen_runs = [r for r in runs if r["batch"] == b and r["decoder"] == name]
            seconds = sum(r["seconds"] for r in chosen_runs)
            row[name] = sum(r["tokens"] for r in chosen_runs) / seconds if seconds else 0.0
        row["predicted"] = predictions(record, b, args.shape)
        steps: dict[str, int] = {}
        for r in runs:
            if r["batch"] == b and r["decoder"] == "guarded":
                for key, count in r["options"].items():
                    steps[key] = steps.get(key, 0) + count
        row["plain_steps"] = steps.get("W0L0N0", 0) / max(sum(steps.values()), 1)
        row["match"] = {
            name: "{}/{}".format(
                sum(r["match"]["exact"] + r["match"]["near_ties"] for r in matched),
                sum(r["match"]["rows"] for r in matched),
            )
            for name in ("plain", "redrafter", "guarded")
            for matched in [[r for r in runs if r["batch"] == b and r["decoder"] == name]]
        }
        by_batch[str(b)] = row
    predicted = {b: by_batch[str(b)]["predicted"] for b in batches}
    results = {
        "environment": environment(model, args.model, args.drafter),
        "config": {
            "model": args.model or "default",
            "drafter": args.drafter or "shipped",
            "batch_sizes": batches,
            "max_tokens": args.max_tokens,
            "repeats": args.repeats,
            "forced_shape": args.shape,
            "prompts": str(args.prompts),
            "question_ids": [q.question_id for q in chosen],
        },
        "tuner": {
            "table": record["table"],
            "predicted_table": record["predicted_table"],
            "confirmed_tps": record["confirmed_tps"],
            "forward_curve_s": record["forward_curve_s"],
            "overhead_s": record["overhead_s"],
            "estimates": record["estimates"],
            "cached": record.get("cached"),
        },
        "runs": [{k: v for k, v in r.items() if k != "ids"} for r in runs],
        "summary": {
            "by_batch": by_batch,
            "drafting_pays_up_to": {
                "measured": drafting_pays_up_to(
                    {b: by_batch[str(b)] for b in batches}, "plain", "redrafter"
                ),
                "predicted": drafting_pays_up_to(predicted, "plain", "redrafter"),
            },
        },
    }
    out = Path(args.out)
    write_json(out / "batch.json", results)
    write_text(out / "batch.md", markdown(results))
    png = plot(results, out / "batch-tps.png")
    print(f"wrote {out / 'batch.json'}, {out / 'batch.md'}" + (f", {png}" if png else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
