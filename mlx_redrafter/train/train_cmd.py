"""`mlx_redrafter.train train`: fit a drafter to stored distillation data (and plain text).

Sources: distillation folders written by `generate-data` (prompt + the LLM's own response, the
whole sequence teacher-forced as the reference does) and, optionally, plain text files (JSONL
with `turns`, or one text per line) tokenized without a chat template, a cheap source of volume.
A deterministic hash of each sequence's id holds out `--val-fraction` for validation.

`--loss-positions response` (the default, as the reference recipe masks the prompt out of its
loss) trains on the positions the engine drafts from, t >= len(prompt) - 1, only; `all` keeps
every position of prompt + response. Plain text and corpus documents have no prompt: all their
positions count either way. See `positions.py` for the boundary.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ..lookup import DEFAULT_NGRAM_MAX, DEFAULT_NGRAM_MIN, has_repeat
from .config import LOSS_POSITIONS

DEFAULTS = dict(depths=5, exit_dim=576, layers=2, draft_vocab=8192, teacher_top_k=0, kl_weight=0.0)


def add_train(subparsers) -> None:
    p = subparsers.add_parser("train", help="train a drafter on generated data")
    p.add_argument("--data", nargs="+", default=[], help="generate-data folders")
    p.add_argument("--text", nargs="+", default=[], help="plain text sources (JSONL or lines)")
    p.add_argument(
        "--corpus",
        nargs="+",
        default=[],
        help="documents read whole and cut into --max-seq-len chunks: files, folders "
        "(.py/.md/.txt/.rst), or 'stdlib' (Python's own library sources)",
    )
    p.add_argument(
        "--corpus-tokens",
        type=int,
        default=None,
        help="at most this many tokens from each --corpus source",
    )
    p.add_argument("--out", required=True, help="output folder (drafter/, checkpoint/)")
    p.add_argument("--model", default=None, help="model folder (default: SmolLM2-135M)")
    p.add_argument(
        "--init",
        default=None,
        metavar="DRAFTER",
        help="continue from a trained drafter folder ('default': the shipped one); its shape "
        "and draft vocabulary are kept",
    )
    p.add_argument("--depths", type=int, default=DEFAULTS["depths"])
    p.add_argument("--exit-dim", type=int, default=None, help=f"default {DEFAULTS['exit_dim']}")
    p.add_argument("--layers", type=int, default=None, help=f"default {DEFAULTS['layers']}")
    p.add_argument(
        "--draft-vocab",
        type=int,
        default=None,
        help=f"reduced draft vocabulary size (0: the full vocabulary; default "
        f"{DEFAULTS['draft_vocab']})",
    )
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--batch-size", type=int, default=256, help="positions per micro-batch")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--max-seq-len", type=int, default=1024)
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--checkpoint-every", type=int, default=500)
    p.add_argument(
        "--teacher-top-k",
        type=int,
        default=DEFAULTS["teacher_top_k"],
        help="keep the LLM's K most likely next tokens per position as the teacher (0: none)",
    )
    p.add_argument(
        "--kl-weight",
        type=float,
        default=DEFAULTS["kl_weight"],
        help="weight of the soft-label (KL to the teacher's top-k) term, in [0, 1]",
    )
    p.add_argument(
        "--data-labels",
        action="store_true",
        help="learn the data's tokens as hard labels instead of the LLM's own argmax",
    )
    p.add_argument(
        "--states-cache",
        default=None,
        metavar="DIR",
        help="keep the frozen LLM's states per sequence here (about 1.2 kB per token for "
        "SmolLM2), so later runs compute only new sequences",
    )
    p.add_argument(
        "--loss-positions",
        choices=LOSS_POSITIONS,
        default="response",
        help="positions of --data answers in the loss: 'response' (default; as the reference "
        "recipe) only those the engine drafts from (t >= prompt length - 1), 'all' also the "
        "prompt's; held-out accuracy is reported on both",
    )
    p.add_argument(
        "--limit",
        type=int,
        default=None,
        metavar="N",
        help="at most N answers from each --data folder, in shard order (small A/B runs)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    p.add_argument(
        "--force",
        action="store_true",
        help="start over in an --out that holds an earlier run: its checkpoint/ is deleted when "
        "training starts, its drafter/ replaced at the end",
    )
    p.set_defaults(run=run_train)


def load_sequences(
    data_dirs,
    text_files,
    tokenizer,
    max_len: int,
    corpora=(),
    corpus_tokens=None,
    limit: int | None = None,
) -> tuple[list[str], list[list[int]], list[int]]:
    """(ids, token sequences, prompt lengths) from distillation folders, plain text sources and
    corpora; the prompt length (0 for plain text and corpora) marks where the loss may start.

    `limit`: at most that many answers from each distillation folder, in shard order.
    """
    from .corpus import corpus_chunks
    from .data import read_records
    from .prompts import read_prompts

    ids, sequences, prompt_lengths = [], [], []
    for folder in data_dirs:
        taken = 0
        for r in read_records(folder):
            if limit is not None and taken >= limit:
                break
            seq = list(r["prompt"]) + list(r["response"])
            if len(r["response"]) > 0:
                ids.append(r["id"])
                sequences.append(seq[:max_len])
                prompt_lengths.append(len(r["prompt"]))
                taken += 1
    for path in text_files:
        for p in read_prompts(path):
            tokens = tokenizer.encode(p.text, add_special_tokens=False)[:max_len]
            if len(tokens) > 2:
                ids.append("text:" + p.id)
                sequences.append(tokens)
                prompt_lengths.append(0)
    for spec in corpora:
        for chunk_id, tokens in corpus_chunks(spec, tokenizer, max_len, corpus_tokens):
            ids.append(chunk_id)
            sequences.append(tokens)
            prompt_lengths.append(0)
    if not sequences:
        raise ValueError("no training sequences found in --data / --text / --corpus")
    return ids, sequences, prompt_lengths


def init_path(spec: str) -> Path:
    """--init's folder: a path, or 'default' for the drafter shipped with the package."""
    if spec != "default":
        return Path(spec)
    from ..default_model import bundled_drafter_path

    path = bundled_drafter_path()
    if path is None:
        raise FileNotFoundError("--init default: this build ships no drafter")
    return path


def drafter_shape(args: argparse.Namespace, initial=None) -> dict:
    """exit_dim / layers / draft_vocab: the flags (or defaults), or the --init drafter's own.

    A flag that contradicts the drafter being continued is an error rather than silently
    ignored: its weights cannot take another shape.
    """
    given = {"exit_dim": args.exit_dim, "layers": args.layers, "draft_vocab": args.draft_vocab}
    if initial is None:
        return {k: DEFAULTS[k] if v is None else v for k, v in given.items()}
    c = initial.config
    own = {
        "exit_dim": c.exit_dim,
        "layers": c.num_draft_layers,
        "draft_vocab": c.draft_vocab_size or 0,
    }
    flags = {"exit_dim": "--exit-dim", "layers": "--layers", "draft_vocab": "--draft-vocab"}
    for key, value in given.items():
        if value is not None and value != own[key]:
            raise ValueError(
                f"{flags[key]} {value} contradicts the --init drafter ({flags[key]} {own[key]}); "
                "drop the flag to keep the drafter's shape"
            )
    return own


def check_out(args: argparse.Namespace) -> None:
    """An earlier run's drafter/ or checkpoint/ in --out is kept unless --resume continues that
    run or --force starts over (as convert refuses an existing output without --force)."""
    if args.resume and args.force:
        raise ValueError("--resume continues the run in --out and --force starts it over: pick one")
    if args.resume or args.force:
        return
    out = Path(args.out)
    found = [f"{name}/" for name in ("drafter", "checkpoint") if (out / name).exists()]
    if found:
        raise ValueError(
            f"{out} already holds an earlier run's {' and '.join(found)} (pass --resume to "
            "continue that run, or --force to start over and replace it)"
        )


def check_resume_positions(args: argparse.Namespace) -> None:
    """--resume continues the loss the checkpoint was trained with: runs from before
    --loss-positions (no such setting saved) used every position, unlike today's default."""
    meta = Path(args.out) / "checkpoint" / "trainer.json"
    if not (args.resume and meta.is_file()):
        return
    saved = json.loads(meta.read_text()).get("config", {}).get("loss_positions", "all")
    if saved != args.loss_positions:
        raise ValueError(
            f"--resume: the checkpoint in {args.out} was trained with --loss-positions {saved}; "
            f"pass --loss-positions {saved} to continue it"
        )


def run_train(args: argparse.Namespace) -> int:
    from ..models import load
    from ..verify import embed_tokens
    from .config import TrainConfig
    from .drafter_init import frequent_tokens, new_drafter, warm_start_drafter
    from .llm_states import llm_states
    from .loop import Trainer
    from .positions import build_positions, split_by_id
    from .states_cache import cached_llm_states

    check_out(args)  # before the long LLM pass
    check_resume_positions(args)
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be at least 1, got {args.limit}")
    started = time.time()
    model, tokenizer, _ = load(args.model, use_drafter=False)
    ids, sequences, prompt_lengths = load_sequences(
        args.data,
        args.text,
        tokenizer,
        args.max_seq_len,
        args.corpus,
        args.corpus_tokens,
        args.limit,
    )
    held_out = split_by_id(ids, args.val_fraction)
    train_seqs = [s for s, v in zip(sequences, held_out, strict=True) if not v]
    val_seqs = [s for s, v in zip(sequences, held_out, strict=True) if v]
    train_prompts = [n for n, v in zip(prompt_lengths, held_out, strict=True) if not v]
    val_prompts = [n for n, v in zip(prompt_lengths, held_out, strict=True) if v]
    vocab = int(embed_tokens(model).weight.shape[0])
    initial = warm_start_drafter(model, init_path(args.init)) if args.init else None
    shape = drafter_shape(args, initial)
    vocab_ids = None
    # the draft vocabulary counts whole sequences under either --loss-positions, so that the
    # loss mask is the only difference between two such runs
    if initial is None and shape["draft_vocab"] and shape["draft_vocab"] < vocab:
        vocab_ids = frequent_tokens(train_seqs, shape["draft_vocab"], tokenizer.eos_token_ids)
    cfg = TrainConfig(
        depths=args.depths,
        exit_dim=shape["exit_dim"],
        num_draft_layers=shape["layers"],
        draft_vocab=shape["draft_vocab"] or None,
        learning_rate=args.lr,
        weight_decay=args.weight_decay,
        epochs=args.epochs,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        val_fraction=args.val_fraction,
        seed=args.seed,
        eval_every=args.eval_every,
        checkpoint_every=args.checkpoint_every,
        max_seq_len=args.max_seq_len,
        teacher_top_k=args.teacher_top_k,
        kl_weight=args.kl_weight,
        llm_labels=not args.data_labels,
        loss_positions=args.loss_positions,
    )
    if not 0.0 <= cfg.kl_weight <= 1.0:
        raise ValueError(f"--kl-weight must lie in [0, 1], got {cfg.kl_weight}")
    if cfg.kl_weight > 0 and cfg.teacher_top_k < 1:
        raise ValueError("--kl-weight > 0 needs a teacher: --teacher-top-k >= 1")
    n_train_tokens = sum(len(s) for s in train_seqs)
    print(
        f"{len(train_seqs)} training sequences ({n_train_tokens} tokens), "
        f"{len(val_seqs)} held out; draft vocabulary "
        f"{shape['draft_vocab'] or 'full'}"
        + (f"; continuing from {args.init}" if initial is not None else "")
    )

    def positions(seqs, prompts, drop_prompt):
        # the LLM pass (and its cache key) covers the whole sequence; the mask applies after
        if args.states_cache:
            states = cached_llm_states(model, seqs, args.states_cache, cfg.teacher_top_k)
        else:
            states = llm_states(model, seqs, cfg.teacher_top_k)
        return build_positions(states, seqs, cfg.depths, cfg.llm_labels, prompts, drop_prompt)

    # held-out positions keep the prompt's, marked: accuracy is reported on both sets
    train = positions(train_seqs, train_prompts, cfg.loss_positions == "response")
    val = positions(val_seqs, val_prompts, False) if val_seqs else None
    print(f"{len(train)} training positions ({cfg.loss_positions} positions in the loss)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    drafter = initial if initial is not None else new_drafter(model, cfg, vocab_ids)
    trainer = Trainer(model, drafter, train, val, cfg, out)
    if args.resume:
        if not (out / "checkpoint" / "trainer.json").is_file():
            raise FileNotFoundError(f"--resume: no checkpoint in {out / 'checkpoint'}")
        trainer.load_checkpoint()
        print(f"resumed at step {trainer.step} of {trainer.total_steps}")
    elif args.force and (out / "checkpoint").exists():  # never resume the replaced run by mistake
        shutil.rmtree(out / "checkpoint")
    history = trainer.fit()
    final = out / "drafter"
    drafter.save_pretrained(final)
    last_eval = next((h for h in reversed(history) if "val_top1" in h), {})
    card = {
        "init": args.init,
        "data": {
            "folders": args.data,
            "text": args.text,
            "corpus": args.corpus,
            "corpus_tokens": args.corpus_tokens,
            "train_sequences": len(train_seqs),
            "train_tokens": n_train_tokens,
            "val_sequences": len(val_seqs),
            "limit": args.limit,
            "train_positions": len(train),
        },
        "config": asdict(cfg),
        "steps": trainer.step,
        "minutes": round((time.time() - started) / 60, 1),
        "loss_positions": cfg.loss_positions,
        # val_top1/5: on the positions the loss uses; _response and _all: both, whatever it is
        **{
            k: last_eval.get(k)
            for k in (
                "val_top1",
                "val_top5",
                "val_top1_response",
                "val_top5_response",
                "val_top1_all",
                "val_top5_all",
            )
        },
        "final_loss": history[-1]["loss"] if history else None,
    }
    (final / "training.json").write_text(json.dumps(card, indent=2) + "\n")
    print(f"drafter written to {final}")
    return 0


# ------------------------------------------------------------------------------ evaluate
def add_evaluate(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate", help="mean accepted tokens per step over a prompt file, per category"
    )
    from ..prompt_files import packaged_mt_bench

    p.add_argument(
        "--prompts",
        default=str(packaged_mt_bench()),
        help="JSONL prompts (first turn) or text lines (default: the packaged MT-Bench questions)",
    )
    p.add_argument("--model", default=None)
    p.add_argument("--drafter", default=None, help="drafter folder (default: the model's)")
    p.add_argument(
        "--beam-width", type=int, nargs="+", default=[4], help="W values (0: no RNN drafter)"
    )
    p.add_argument("--beam-length", type=int, nargs="+", default=[5])
    p.add_argument(
        "--prompt-lookup",
        type=int,
        nargs="+",
        default=[0],
        metavar="N",
        help="longest prompt-lookup copy added to each tree (0: none); several values sweep",
    )
    p.add_argument("--lookup-ngram-max", type=int, default=DEFAULT_NGRAM_MAX)
    p.add_argument("--lookup-ngram-min", type=int, default=DEFAULT_NGRAM_MIN)
    p.add_argument("--limit", type=int, default=None, help="first N prompts of the file")
    p.add_argument(
        "--per-category",
        type=int,
        default=None,
        help="first N prompts of each category (a balanced subset for slow online runs)",
    )
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument(
        "--offline",
        action="store_true",
        help="simulate along stored greedy responses (--responses) instead of decoding",
    )
    p.add_argument(
        "--responses",
        default=None,
        help="generate-data folder with the model's greedy answers to --prompts",
    )
    p.add_argument(
        "--temp",
        type=float,
        nargs="+",
        default=[0.0],
        help="sampling temperatures (online only; 0: greedy)",
    )
    p.add_argument(
        "--accept",
        nargs="+",
        default=["exact"],
        help="acceptance rules compared when sampling: exact, reference, match",
    )
    p.add_argument("--seed", type=int, default=0, help="sampling seed (per prompt: seed + index)")
    p.add_argument(
        "--loop-free",
        type=int,
        default=None,
        metavar="N",
        help="offline: keep only answers with no verbatim repeat of N tokens (a small model's "
        "greedy loops, where copying is easy)",
    )
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.set_defaults(run=run_evaluate)


def run_evaluate(args: argparse.Namespace) -> int:
    import mlx.core as mx

    from ..accept import ACCEPT_RULES
    from ..lookup import check_lookup
    from ..models import load
    from .evaluate import AcceptanceResult, offline_acceptance_by_length, online_acceptance
    from .prompts import read_prompts, tokenize_prompts

    bad = [a for a in args.accept if a not in ACCEPT_RULES]
    if bad:
        raise ValueError(f"unknown --accept rule(s) {bad} (choose from {list(ACCEPT_RULES)})")
    sampling = [t for t in args.temp if t > 0]
    if args.offline and sampling:
        raise ValueError("--offline simulates greedy decoding only: drop --temp or --offline")
    model, tokenizer, drafter = load(args.model, drafter_path=args.drafter)
    if drafter is None and any(w > 0 for w in args.beam_width):
        raise ValueError("no drafter: give --drafter or a model folder with drafter/")
    prompts = read_prompts(args.prompts, limit=args.limit)
    if args.per_category is not None:
        seen: dict[str | None, int] = {}
        kept = []
        for p in prompts:
            seen[p.category] = seen.get(p.category, 0) + 1
            if seen[p.category] <= args.per_category:
                kept.append(p)
        prompts = kept
    if args.offline:
        if not args.responses:
            raise ValueError(
                "--offline needs --responses: greedy answers to the same prompts, made with "
                "`mlx_redrafter.train generate-data --prompts FILE --out DIR`"
            )
        from .data import read_records

        by_id = {r["id"]: r for r in read_records(args.responses)}
        missing = [p.id for p in prompts if p.id not in by_id]
        if missing:
            raise ValueError(f"{len(missing)} prompts have no stored response in {args.responses}")
        if args.loop_free is not None:
            before = len(prompts)
            prompts = [
                p
                for p in prompts
                if not has_repeat(by_id[p.id]["response"][: args.max_tokens], args.loop_free)
            ]
            print(
                f"loop-free: {len(prompts)} of {before} answers have no repeat of "
                f"{args.loop_free} tokens",
                file=sys.stderr,
            )
    elif args.loop_free is not None:
        raise ValueError("--loop-free filters stored answers: it needs --offline")
    else:
        tokenize_prompts(tokenizer, prompts)

    for n in args.prompt_lookup:
        check_lookup(n, args.lookup_ngram_max, args.lookup_ngram_min)
    if any(w < 0 for w in args.beam_width):
        raise ValueError(f"--beam-width values must be >= 0, got {args.beam_width}")
    ngrams = dict(lookup_ngram_max=args.lookup_ngram_max, lookup_ngram_min=args.lookup_ngram_min)
    # a run is (W, L, lookup, temp, rule); greedy runs have no rule; W=0 is lookup alone
    runs = [
        (w, n if w else 0, k, t, a if t > 0 else None)
        for w in args.beam_width
        for n in args.beam_length
        for k in args.prompt_lookup
        for t in args.temp
        for a in (args.accept if t > 0 else [None])
        if w or k
    ]
    runs = list(dict.fromkeys(runs))
    if not runs:
        raise ValueError("--beam-width 0 (no RNN) needs --prompt-lookup N > 0: nothing drafts")
    tallies: dict[tuple, dict[str, AcceptanceResult]] = {r: {} for r in runs}

    def add(per_category: dict[str, AcceptanceResult], category, res) -> None:
        key = category or "all"
        per_category[key] = per_category[key] + res if key in per_category else res

    from tqdm import tqdm

    for index, p in enumerate(tqdm(prompts, unit="prompt", desc="evaluate", file=sys.stderr)):
        if args.offline:
            # one teacher-forced pass per answer, one beam search per width for all lengths
            r = by_id[p.id]
            prompt_ids, response = r["prompt"], r["response"][: args.max_tokens]
            hidden = None
            if any(w > 0 for w in args.beam_width):
                hidden = model.model(mx.array(list(prompt_ids) + list(response))[None])[0]
            for width in args.beam_width:
                for lookup in args.prompt_lookup:
                    if not (width or lookup):
                        continue
                    lengths = args.beam_length if width else [0]
                    by_length = offline_acceptance_by_length(
                        model,
                        drafter if width else None,
                        prompt_ids,
                        response,
                        width,
                        lengths,
                        hidden=hidden,
                        prompt_lookup=lookup,
                        **ngrams,
                    )
                    for length, res in by_length.items():
                        add(tallies[(width, length, lookup, 0.0, None)], p.category, res)
            continue
        for run in runs:
            width, length, lookup, temp, rule = run
            res, _ = online_acceptance(
                model,
                drafter if width else None,
                p.tokens,
                args.max_tokens,
                max(width, 1),
                max(length, 2),
                eos_ids=tokenizer.eos_token_ids,
                temp=temp,
                accept=rule or "exact",
                seed=args.seed + index,
                prompt_lookup=lookup,
                **ngrams,
            )
            add(tallies[run], p.category, res)

    results = {}
    for (width, length, lookup, temp, rule), per_category in tallies.items():
        total = sum(per_category.values(), AcceptanceResult(0, 0, np.zeros(1, np.int64)))
        name = " + ".join(
            ([f"lookup{lookup}"] if lookup else []) + ([f"W{width}L{length}"] if width else [])
        ) + (f" temp={temp:g} {rule}" if rule else "")
        results[name] = {
            "mean_accepted": round(total.mean, 3),
            "steps": total.steps,
            "tokens": total.tokens,
            "histogram": total.histogram.tolist(),
            "per_category": {k: round(v.mean, 3) for k, v in sorted(per_category.items())},
        }
        cats = " ".join(f"{k}={v.mean:.2f}" for k, v in sorted(per_category.items()))
        print(f"{name}: {total.mean:.3f} tokens/step ({cats})")
    if args.out:
        Path(args.out).write_text(
            json.dumps(
                {
                    "mode": "offline" if args.offline else "online",
                    "loop_free": args.loop_free,
                    "prompts": len(prompts),
                    "max_tokens": args.max_tokens,
                    "results": results,
                },
                indent=2,
            )
            + "\n"
        )
    return 0
