"""What a step drafts: the speculation flags every front end shares, and their 'auto' values.

Three axes: the RNN's beam width W and length L, and the prompt lookup's longest copy N. Each
may be 'auto' (the default): tuned once for this device, model and drafter, confirmed online
against plain one-token steps, then cached (`mlx_redrafter.tuning`). The result may drop the
RNN (W = 0) or all speculation (W = N = 0) where they do not pay here. The guard (`guard.py`,
`--guard`) can watch real steps; it is off by default (measured to cost more than it saved
with the tuned settings).

`--no-drafter` keeps its old meaning, no RNN drafter (so `--no-drafter --prompt-lookup 8` is
lookup alone); `--no-speculation` is plain autoregressive decoding.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from .drafter import beam_arg, check_beam_shape
from .lookup import DEFAULT_NGRAM_MAX, DEFAULT_NGRAM_MIN, check_lookup, lookup_arg
from .tuning import resolve_speculation as tuned

AUTO = "auto"
# 'auto' on a sharded model (see `resolve_speculation`): the engine's fixed defaults, W x L and
# no lookup, since the tuner cannot time a sharded model (see there).
DISTRIBUTED_AUTO = (4, 5, 0)


def add_speculation_args(parser: argparse.ArgumentParser) -> None:
    """The speculation flags, the same in generate, chat and the benchmark's engine rows."""
    group = parser.add_argument_group("speculation")
    group.add_argument(
        "--no-drafter", action="store_true", help="no RNN drafter (prompt lookup may still draft)"
    )
    group.add_argument(
        "--no-speculation",
        action="store_true",
        help="plain autoregressive decoding: no RNN drafter and no prompt lookup",
    )
    group.add_argument(
        "--beam-width", type=beam_arg, default=AUTO, help="W, or 'auto' (default: tuned)"
    )
    group.add_argument(
        "--beam-length", type=beam_arg, default=AUTO, help="L, or 'auto' (default: tuned)"
    )
    group.add_argument(
        "--prompt-lookup",
        type=lookup_arg,
        default=AUTO,
        metavar="N",
        help="longest prompt-lookup draft copied from the context (0: off; default auto: tuned)",
    )
    group.add_argument(
        "--lookup-ngram-max",
        type=int,
        default=DEFAULT_NGRAM_MAX,
        help=f"longest n-gram the lookup matches (default {DEFAULT_NGRAM_MAX})",
    )
    group.add_argument(
        "--lookup-ngram-min",
        type=int,
        default=DEFAULT_NGRAM_MIN,
        help=f"shortest n-gram the lookup matches (default {DEFAULT_NGRAM_MIN})",
    )
    group.add_argument(
        "--retune", action="store_true", help="tune the 'auto' settings again (ignore the cache)"
    )
    group.add_argument(
        "--guard",
        action="store_true",
        help="time the steps and run plain (or copy-only) steps where drafting measures slower "
        "(off by default: see guard.py)",
    )
    group.add_argument(
        "--no-guard", action="store_true", help="no guard (the default; kept for old scripts)"
    )


def check_speculation_args(args: argparse.Namespace) -> None:
    """Names a bad flag before any model loads."""
    if args.no_speculation:
        args.no_drafter = True
        args.prompt_lookup = 0
    if not args.no_drafter:
        check_beam_shape(args.beam_width, args.beam_length)
    if args.prompt_lookup != AUTO:
        check_lookup(args.prompt_lookup, args.lookup_ngram_max, args.lookup_ngram_min)
    else:
        check_lookup(0, args.lookup_ngram_max, args.lookup_ngram_min)


def resolve_speculation(
    model,
    tokenizer,
    drafter,
    width: int | str = AUTO,
    length: int | str = AUTO,
    lookup: int | str = AUTO,
    *,
    retune: bool = False,
    log: Callable[[str], None] | None = None,
    lookup_ngrams: tuple[int, int] = (DEFAULT_NGRAM_MAX, DEFAULT_NGRAM_MIN),
):
    """(drafter or None, W, L, N) with every 'auto' tuned for this device (cached).

    The tuner may drop the RNN (W = 0: drafter None) where it does not pay; without a drafter
    only N is tuned. `log` receives the tuner's progress, and is called only when it tunes.

    On a sharded model (`distributed.model_group`) 'auto' is not tuned: each of the tuner's
    forwards would be a collective that every rank must join, and its choices come from
    wall-clock timings that differ per rank, so ranks would diverge and hang. 'auto' there
    means `DISTRIBUTED_AUTO` (W=4, L=5, no lookup: verifying a wider tree per step pays more
    when every forward pays network round trips), and rank 0's resolved values are broadcast,
    so a rank given other flags follows rank 0 (`generate_step` checks that they agree).
    """
    from .distributed import broadcast_ints, model_group

    group = model_group(model)
    if group is not None:
        w, n, k = DISTRIBUTED_AUTO
        width, length = (w if width == AUTO else width), (n if length == AUTO else length)
        lookup = k if lookup == AUTO else lookup
        has_rnn = int(drafter is not None)
        has_rnn, width, length, lookup = broadcast_ints(
            [has_rnn, int(width), int(length), int(lookup)], group
        )
        if not has_rnn:
            return None, 1, 2, lookup
        return drafter, width, length, lookup
    if drafter is None and lookup == AUTO:
        width = length = 1  # not used without a drafter
    if AUTO not in (width, length, lookup) or (drafter is None and lookup != AUTO):
        lookup = 0 if lookup == AUTO else int(lookup)
        if drafter is None:
            return None, 1, 2, lookup
        return drafter, int(width), int(length), lookup
    check_lookup(0, *lookup_ngrams)  # a bad n-gram size is named before the tuner runs
    w, n, k = tuned(
        model,
        drafter,
        tokenizer,
        width,
        length,
        lookup,
        refresh=retune,
        log=log,
        lookup_ngrams=tuple(lookup_ngrams),
    )
    if w == 0:
        return None, 1, 2, k
    return drafter, w, n, k


def resolve_from_args(model, tokenizer, drafter, args: argparse.Namespace, log=None):
    """`resolve_speculation` for parsed flags: the drafter to use (or None), with
    args.beam_width, args.beam_length and args.prompt_lookup set to the resolved values."""
    drafter, args.beam_width, args.beam_length, args.prompt_lookup = resolve_speculation(
        model,
        tokenizer,
        drafter,
        args.beam_width,
        args.beam_length,
        args.prompt_lookup,
        retune=args.retune,
        log=log,
        lookup_ngrams=(args.lookup_ngram_max, args.lookup_ngram_min),
    )
    return drafter


def speculation_options(args: argparse.Namespace) -> dict:
    """`generate_step`'s speculation keyword arguments from resolved flags (after
    `resolve_from_args`): beam shape, prompt lookup and the guard."""
    return dict(
        beam_width=args.beam_width,
        beam_length=args.beam_length,
        prompt_lookup=args.prompt_lookup,
        lookup_ngram_max=args.lookup_ngram_max,
        lookup_ngram_min=args.lookup_ngram_min,
        guard=args.guard and not args.no_guard,
    )


def describe(drafter, width: int, length: int, lookup: int) -> str:
    """One line for --verbose and the chat banner."""
    parts = ([f"ReDrafter W={width} L={length}"] if drafter is not None else []) + (
        [f"prompt lookup <= {lookup}"] if lookup else []
    )
    return " + ".join(parts) if parts else "no speculation (plain one-token steps)"
