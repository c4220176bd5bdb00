"""`mlx_redrafter.chat`: chat with a local model in the terminal, with ReDrafter on by default.

Usage::

    mlx_redrafter.chat                                  # the default model and its drafter
    mlx_redrafter.chat --model DIR [--drafter DIR | --no-drafter] [--system-prompt TEXT]
    python -m mlx_redrafter chat --temp 0.7 --top-p 0.9 --seed 0 --max-context 4096

In the chat: `/help`, `/reset`, `/stats`, `/system TEXT`, `/quit` (or Ctrl-D). Ctrl-C stops a
reply; at the prompt it only clears the line.

Design:

- The KV cache carries over between turns. Before a turn the whole conversation is rendered
  with the chat template, the cache is trimmed to its common prefix with the tokens it holds,
  and only the rest is prefilled (see `conversation.py`: the same rule absorbs the engine's
  uncached last token, tokens committed past EOS, and templates that re-render old turns).
- Ctrl-C during a reply: the first press asks the reply to stop after the current decode step
  (a signal handler sets a flag, so the engine is never cut inside a step); a second press
  stops at once, even during a long prefill. Either way every cache layer is trimmed to the
  tokens known to be intact. The partial reply is KEPT in the history as it was shown (the
  next turn's template closes it like any other reply); a reply stopped before it showed any
  text drops the turn, user message included.
- Context budget: `--max-context` and the model's context length, whichever is smaller. Before
  a turn the oldest turns are dropped (with a notice) until the conversation leaves room for
  min(max tokens, budget / 2) reply tokens, and the reply is capped at the room left. A message
  that does not fit even alone is refused with a message; nothing crashes. While a tree is
  verified the cache briefly holds up to beam width x beam length more entries. (`--max-kv-size`
  keeps mlx-lm's meaning, a rotating KV cache, which tree verification cannot use: refused.)
- Replies stream from `generate.stream_generate` with the session's cache, so EOS, the
  detokenizer and the counts are handled by one loop for every front end; its responses'
  `step_tokens` say what the cache holds when a reply ends (tokens past EOS included).
- Figures: a reply's tokens are counted through EOS (as mlx-lm counts them); tokens/s is over
  the decode phase (after the prefill's token); tokens/step is (tokens - 1) / verification
  forwards, the mean number of tokens each ReDrafter step kept.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from .cache import check_kv_quantization, refuse_max_kv_size
from .chat_template import Turn, chat_tokens, messages_for
from .cli_args import (
    add_kv_cache_arguments,
    add_model_arguments,
    add_model_source_args,
    add_sampling_args,
    kv_options,
    load_from_args,
    sampling_options,
)
from .conversation import cached_after_reply, fit_to_budget, reusable_prefix, trim_cache
from .generate import DEFAULT_BEAM_LENGTH, DEFAULT_BEAM_WIDTH, stream_generate
from .lookup import DEFAULT_NGRAM_MAX, DEFAULT_NGRAM_MIN
from .models import make_prompt_cache
from .speculation import (
    add_speculation_args,
    check_speculation_args,
    describe,
    resolve_from_args,
    speculation_options,
)
from .verify import context_length

PROG = "mlx_redrafter.chat"
DEFAULT_MAX_TOKENS = 512
PROMPT = ">> "
HELP = """\
Commands:
  /help          this help
  /reset         clear the conversation and the KV cache (the system prompt stays)
  /stats         speed of the last reply and of the session, tokens per step, peak memory
  /system TEXT   set the system prompt (/system alone clears it); applies from the next turn
  /quit          leave (Ctrl-D too)
Ctrl-C stops a reply (press twice to stop at once); a line starting with // sends one /."""


class ContextFullError(ValueError):
    """The new message does not fit the context budget even without earlier turns."""


@dataclass
class ReplyStats:
    prefill_tokens: int = 0  # tokens fed to the model this turn (the cache held the rest)
    prefill_seconds: float = 0.0
    tokens: int = 0  # reply tokens through EOS
    seconds: float = 0.0  # decode time, after the prefill's token
    steps: int = 0  # verification forwards
    dropped_turns: int = 0  # oldest turns dropped to fit the budget before this reply

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def tokens_per_step(self) -> float:
        return (self.tokens - 1) / self.steps if self.steps else 0.0

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prefill_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0


@dataclass
class SessionStats:
    replies: int = 0
    tokens: int = 0
    seconds: float = 0.0
    step_tokens: int = 0  # tokens produced by verification steps (each reply's first excluded)
    steps: int = 0

    def add(self, stats: ReplyStats) -> None:
        self.replies += 1
        self.tokens += stats.tokens
        self.seconds += stats.seconds
        if stats.steps:
            self.step_tokens += stats.tokens - 1
            self.steps += stats.steps

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def tokens_per_step(self) -> float:
        return self.step_tokens / self.steps if self.steps else 0.0


@dataclass
class Reply:
    text: str
    tokens: list[int]  # the reply's token ids, EOS excluded
    finish: str  # "stop" (EOS), "length" (max tokens), "context" (budget), "interrupted"
    stats: ReplyStats = field(default_factory=ReplyStats)


class _StopOnInterrupt:
    """SIGINT during a reply: the first sets `requested`, a second raises KeyboardInterrupt."""

    def __init__(self):
        self.requested = False
        self._armed = True
        self._previous = None
        self._installed = False

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        return self

    def _handle(self, signum, frame):
        if self.requested and self._armed:
            self._armed = False
            raise KeyboardInterrupt
        self.requested = True

    def disarm(self) -> None:
        self._armed = False

    def __exit__(self, *exc):
        if self._installed:
            previous = self._previous
            signal.signal(signal.SIGINT, previous if previous is not None else signal.SIG_DFL)
        return False


class ChatSession:
    """A conversation with a KV cache that carries over between turns."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        drafter=None,
        *,
        system: str | None = None,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        temp: float = 0.0,
        top_p: float = 0.0,
        top_k: int = 0,
        min_p: float = 0.0,
        beam_width: int = DEFAULT_BEAM_WIDTH,
        beam_length: int = DEFAULT_BEAM_LENGTH,
        max_context: int | None = None,
        accept: str = "exact",
        prompt_lookup: int = 0,
        lookup_ngram_max: int = DEFAULT_NGRAM_MAX,
        lookup_ngram_min: int = DEFAULT_NGRAM_MIN,
        guard: bool = False,
        max_kv_size: int | None = None,
        kv_bits: int | None = None,
        kv_group_size: int = 64,
        quantized_kv_start: int = 5000,
    ):
        from mlx_lm.tokenizer_utils import TokenizerWrapper

        if not isinstance(tokenizer, TokenizerWrapper):
            tokenizer = TokenizerWrapper(tokenizer)
        refuse_max_kv_size(max_kv_size, " (the chat's context budget is max_context)")
        check_kv_quantization(kv_bits, kv_group_size, quantized_kv_start)
        if max_context is not None and max_context < 2:
            raise ValueError(f"max_context must be at least 2 tokens, got {max_context}")
        self.model, self.tokenizer, self.drafter = model, tokenizer, drafter
        self.system = system
        self.max_tokens = max_tokens
        self.sampling = dict(
            temp=temp,
            top_p=top_p,
            top_k=top_k,
            min_p=min_p,
            beam_width=beam_width,
            beam_length=beam_length,
            accept=accept,
            prompt_lookup=prompt_lookup,
            lookup_ngram_max=lookup_ngram_max,
            lookup_ngram_min=lookup_ngram_min,
            guard=guard,
        )
        if kv_bits is not None:
            self.sampling.update(
                kv_bits=kv_bits, kv_group_size=kv_group_size, quantized_kv_start=quantized_kv_start
            )
        limits = [n for n in (max_context, context_length(model)) if n is not None]
        self.budget: int | None = min(limits) if limits else None
        self.session = SessionStats()
        self.last: ReplyStats | None = None
        self.reset()

    def reset(self) -> None:
        """Forget the conversation and empty the cache (the system prompt stays)."""
        self.turns: list[Turn] = []
        self.cache = make_prompt_cache(self.model)
        self.cache_tokens: list[int] = []  # what the cache holds, token for token

    def render(self, turns: Sequence[Turn], user: str | None = None) -> list[int]:
        """Token ids of the conversation with `user`'s message (see chat_template.py)."""
        return chat_tokens(self.tokenizer, messages_for(self.system, turns, user))

    def reply(self, user: str, on_text: Callable[[str], None] | None = None) -> Reply:
        """Answer one user message, streaming text to `on_text`; the turn joins the history.

        Raises ContextFullError (nothing changed) when the message cannot fit the budget.
        """
        budget = self.budget
        limit = self.max_tokens if self.max_tokens > 0 else None
        reserve = 0 if budget is None else min(limit or budget, budget // 2)
        dropped, full = fit_to_budget(lambda t: self.render(t, user), self.turns, budget, reserve)
        if budget is not None and len(full) >= budget:
            raise ContextFullError(
                f"the message needs {len(full)} tokens with the template"
                f"{' and system prompt' if self.system else ''}; the context budget is "
                f"{budget} tokens"
            )
        self.turns = self.turns[dropped:]
        room = None if budget is None else budget - len(full)
        caps = [n for n in (limit, room) if n is not None]
        cap = min(caps) if caps else -1

        keep = reusable_prefix(self.cache_tokens, full)
        trim_cache(self.cache, keep)
        self.cache_tokens = self.cache_tokens[:keep]
        stats = ReplyStats(prefill_tokens=len(full) - keep, dropped_turns=dropped)
        pieces: list[str] = []
        emitted: list[int] = []  # every token the engine yielded (past EOS too)
        kept: list[int] = []
        finish = None

        def show(segment: str) -> None:
            if segment:
                pieces.append(segment)
                if on_text is not None:
                    on_text(segment)

        tic = time.perf_counter()
        # the project's one EOS / detokenizer loop; the cache carries over between turns
        responses = stream_generate(
            self.model,
            self.tokenizer,
            full[keep:],
            drafter=self.drafter,
            max_tokens=cap,
            prompt_cache=self.cache,
            **self.sampling,
        )
        with _StopOnInterrupt() as stop:
            try:
                try:
                    for response in responses:
                        now = time.perf_counter()
                        if not emitted:  # the prefill's token
                            stats.prefill_seconds, tic = now - tic, now
                        elif response.step_tokens:  # (not the context-full closing response)
                            stats.steps += 1
                        emitted.extend(response.step_tokens)
                        kept.extend(response.tokens)
                        stats.tokens = response.generation_tokens
                        show(response.text)
                        if response.finish_reason is not None:
                            finish = response.finish_reason
                        elif stop.requested:
                            finish = "interrupted"
                            break
                except KeyboardInterrupt:
                    finish = "interrupted"
            finally:
                stop.disarm()
                responses.close()
                if emitted:
                    stats.seconds = time.perf_counter() - tic
                self.cache_tokens = cached_after_reply(full, emitted, keep, bool(emitted))
                trim_cache(self.cache, len(self.cache_tokens))
        if finish == "length" and (limit is None or stats.tokens < limit):
            finish = "context"  # the budget's cap, or the model's context, ended the reply
        if finish in (None, "interrupted"):  # stream_generate finalizes the text it finishes
            detokenizer = self.tokenizer.detokenizer
            detokenizer.finalize()
            show(detokenizer.last_segment)
            finish = finish or "context"
        text = "".join(pieces)
        if text or finish != "interrupted":
            self.turns.append((user, text))
        self.last = stats
        self.session.add(stats)
        return Reply(text=text, tokens=kept, finish=finish, stats=stats)


# ---------------------------------------------------------------------------- terminal
class _Screen:
    def __init__(self, out, quiet: bool):
        self.out = out
        self.quiet = quiet
        color = hasattr(out, "isatty") and out.isatty() and not os.environ.get("NO_COLOR")
        self._dim, self._reset = ("\x1b[2m", "\x1b[0m") if color else ("", "")

    def write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def say(self, text: str) -> None:
        self.write(text + "\n")

    def dim(self, text: str) -> None:
        self.say(f"{self._dim}{text}{self._reset}")


def _summary(reply: Reply) -> str:
    s = reply.stats
    notes = {
        "interrupted": "interrupted",
        "length": "max tokens reached",
        "context": "context budget reached",
    }
    parts = [notes[reply.finish]] if reply.finish in notes else []
    parts.append(
        f"{s.tokens} tokens, {s.tokens_per_second:.1f} tok/s, {s.tokens_per_step:.2f} tokens/step"
    )
    return "[" + "; ".join(parts) + "]"


def _count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def _stats_text(session: ChatSession) -> str:
    last, total = session.last, session.session
    lines = []
    if last is None:
        lines.append("no replies yet")
    else:
        lines.append(
            f"last reply:   {last.tokens} tokens, {last.tokens_per_second:.1f} tok/s, "
            f"{last.tokens_per_step:.2f} tokens/step"
        )
        lines.append(
            f"last prefill: {last.prefill_tokens} tokens, "
            f"{last.prefill_tokens_per_second:.1f} tok/s"
        )
        lines.append(
            f"session:      {_count(total.replies, 'reply', 'replies')}, {total.tokens} tokens, "
            f"{total.tokens_per_second:.1f} tok/s, {total.tokens_per_step:.2f} tokens/step"
        )
    budget = f" (budget {session.budget})" if session.budget is not None else ""
    lines.append(
        f"context:      {len(session.cache_tokens)} tokens cached{budget}, "
        f"{_count(len(session.turns), 'turn', 'turns')}"
    )
    lines.append(f"peak memory:  {mx.get_peak_memory() / 1e9:.3f} GB")
    return "\n".join(lines)


def _enable_readline() -> None:
    """Line editing and in-session history for input(), where the platform has readline."""
    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401
        except ImportError:
            pass


def run_chat(session: ChatSession, screen: _Screen, read: Callable[[str], str] = input) -> None:
    """The read-reply loop; returns on /quit or end of input."""
    while True:
        try:
            line = read(PROMPT)
        except EOFError:
            screen.say("")
            return
        except KeyboardInterrupt:
            screen.say("")
            continue
        text = line.strip()
        if not text:
            continue
        if text.startswith("/") and not text.startswith("//"):
            command, _, arg = text.partition(" ")
            if command in ("/quit", "/exit"):
                return
            if command == "/help":
                screen.say(HELP)
            elif command == "/reset":
                session.reset()
                screen.dim("[conversation cleared]")
            elif command == "/stats":
                screen.say(_stats_text(session))
            elif command == "/system":
                session.system = arg.strip() or None
                screen.dim("[system prompt set]" if session.system else "[system prompt cleared]")
            else:
                screen.say(f"unknown command {command} (try /help)")
            continue
        if text.startswith("//"):
            text = text[1:]
        try:
            reply = session.reply(text, on_text=screen.write)
        except ContextFullError as e:
            screen.dim(f"[not sent: {e}]")
            continue
        except ValueError as e:  # a refusal from the engine; the session stays usable
            screen.say(f"\n{PROG}: error: {e}")
            continue
        screen.say("")
        if reply.stats.dropped_turns:
            screen.dim(
                f"[context budget of {session.budget} tokens: dropped the "
                f"{reply.stats.dropped_turns} oldest turn(s)]"
            )
        if not screen.quiet or reply.finish in ("interrupted", "context"):
            screen.dim(_summary(reply))


# ---------------------------------------------------------------------------- CLI
def setup_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Chat with a local model, with ReDrafter speculative decoding.",
    )
    add_model_source_args(parser)
    parser.add_argument(
        "--system-prompt", "--system", dest="system", default=None, help="system prompt"
    )
    add_sampling_args(
        parser,
        max_tokens=DEFAULT_MAX_TOKENS,
        max_tokens_help="most tokens per reply; -1: until EOS or the context budget "
        f"(default {DEFAULT_MAX_TOKENS})",
    )
    parser.add_argument(
        "--max-context",
        type=int,
        default=None,
        help="context budget in tokens: the oldest turns are dropped to stay under it "
        "(default: the model's context length)",
    )
    parser.add_argument("--quiet", "-q", action="store_true", help="no summary after each reply")
    add_speculation_args(parser)
    add_model_arguments(parser)
    add_kv_cache_arguments(parser, prompt_cache=False)
    return parser


def refuse_on_ranks() -> None:
    """The chat reads a console on one process; on ranks started by `mlx.launch` every rank
    would load a whole model and chat alone. Sharded chat is not built: say so."""
    from .distributed import init_group

    size = init_group().size()
    if size > 1:
        raise ValueError(
            f"the chat does not run on several ranks yet (this group has {size}): use "
            "mlx_redrafter.generate or mlx_redrafter.server under mlx.launch"
        )


def main(argv: Sequence[str] | None = None) -> int:
    from ._cli import interrupted, note_no_drafter

    args = setup_arg_parser().parse_args(argv)
    screen = _Screen(sys.stdout, args.quiet)
    try:
        sampling = sampling_options(args)
        check_speculation_args(args)
        refuse_on_ranks()
        refuse_max_kv_size(args.max_kv_size, " (for the chat's context budget, use --max-context)")
        check_kv_quantization(args.kv_bits, args.kv_group_size, args.quantized_kv_start)
        if args.seed is not None:
            mx.random.seed(args.seed)
        if not args.quiet:
            screen.dim(f"[loading {args.model or 'the default model'}]")
        model, tokenizer, drafter = load_from_args(args, use_drafter=not args.no_drafter)
        if drafter is None and not args.no_drafter:
            note_no_drafter(args.model)
        told = []

        def tuning(_message: str) -> None:  # the tuner logs only when it really tunes
            if not told and not args.quiet:
                screen.dim("[tuning speculation for this device: once, then cached]")
            told.append(_message)

        drafter = resolve_from_args(model, tokenizer, drafter, args, log=tuning)
        session = ChatSession(
            model,
            tokenizer,
            drafter,
            system=args.system,
            max_tokens=args.max_tokens,
            max_context=args.max_context,
            **speculation_options(args),
            **sampling,
            **kv_options(args),
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # while loading or tuning; replies handle Ctrl-C themselves
        return interrupted(PROG)
    name = Path(args.model).name if args.model else "default model"
    how = describe(drafter, args.beam_width, args.beam_length, args.prompt_lookup)
    budget = f", context {session.budget} tokens" if session.budget is not None else ""
    screen.say(f"Chatting with {name}: {how}{budget}.")
    screen.say("Type a message; /help for commands, /quit or Ctrl-D to leave.")
    _enable_readline()
    run_chat(session, screen)
    return 0


if __name__ == "__main__":
    sys.exit(main())
