"""The chat as a new user meets it: the real console in a pseudo-terminal, a few ordinary
questions in one conversation, then `/stats`.

The check: `mlx_redrafter.chat` with no arguments answers sensibly, and `/stats` shows at least
2.0 tokens per step over a few ordinary questions. This drives exactly that
(no flags unless given after `--`), reads the numbers off the screen, and records them:

    python -m mlx_redrafter.benchmarks.chat_check        # the default model and drafter
    python -m mlx_redrafter.benchmarks.chat_check --limit 3 -- --beam-width 8 --beam-length 4

Unlike `train evaluate --offline` (each question a first turn, answers stored beforehand), the
questions here share one conversation, so later answers see earlier ones, as in a real chat.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
import time
from pathlib import Path

from mlx_redrafter.prompt_files import read_lines

HERE = Path(__file__).resolve().parent
QUESTIONS = HERE / "data" / "everyday_questions.txt"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
SUMMARY = re.compile(r"\[([^\]\n]*?)(\d+) tokens, ([0-9.]+) tok/s, ([0-9.]+) tokens/step\]")
SESSION = re.compile(
    r"session: +(\d+) repl(?:y|ies), (\d+) tokens, ([0-9.]+) tok/s, ([0-9.]+) tokens/step"
)


def read_questions(path: Path, limit: int | None) -> list[str]:
    lines = [text for _, text in read_lines(path, "questions file")]
    return lines[:limit] if limit else lines


def converse(questions: list[str], chat_args: list[str], timeout: float) -> dict:
    """Ask every question in one session; the replies, their summary lines and `/stats`."""
    import pexpect

    child = pexpect.spawn(
        sys.executable,
        ["-m", "mlx_redrafter.chat", *chat_args],
        encoding="utf-8",
        timeout=timeout,
        dimensions=(50, 400),
    )
    try:
        child.expect(r"Chatting with ([^\r\n]*)")
        header = ANSI.sub("", child.match.group(1)).strip()
        child.expect_exact(">> ")
        replies = []
        for question in questions:
            child.sendline(question)
            child.expect(re.escape(question) + r"\r?\n")
            child.expect(SUMMARY)
            text = ANSI.sub("", child.before).strip()
            g = child.match.groups()
            replies.append(
                {
                    "question": question,
                    "reply": text,
                    "tokens": int(g[1]),
                    "tokens_per_second": float(g[2]),
                    "tokens_per_step": float(g[3]),
                }
            )
            child.expect_exact(">> ")
            print(f"{g[3]} tokens/step, {g[2]} tok/s: {question}", flush=True)
        child.sendline("/stats")
        child.expect(SESSION)
        n, tokens, tps, per_step = child.match.groups()
        child.expect_exact(">> ")
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    return {
        "chat": header,
        "replies": replies,
        "session": {
            "replies": int(n),
            "tokens": int(tokens),
            "tokens_per_second": float(tps),
            "tokens_per_step": float(per_step),
        },
    }


def setup_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mlx_redrafter.benchmarks.chat_check",
        description="Drive mlx_redrafter.chat in a pseudo-terminal with everyday questions and "
        "report /stats. Arguments after '--' go to the chat unchanged.",
    )
    p.add_argument("--questions", type=Path, default=QUESTIONS, help="one question per line")
    p.add_argument("--limit", type=int, default=None, help="first N questions")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds allowed per reply")
    p.add_argument("--out", type=Path, default=None, help="write the record as JSON here")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    chat_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    args = setup_arg_parser().parse_args(own)
    try:
        questions = read_questions(args.questions, args.limit)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"{setup_arg_parser().prog}: error: {e}") from None
    if not questions:
        raise SystemExit(f"no questions in {args.questions}")
    started = time.time()
    record = converse(questions, chat_args, args.timeout)
    record.update(
        date=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        machine=f"{platform.system()} {platform.machine()}, {platform.processor() or '?'}",
        chat_args=chat_args,
        questions_file=str(args.questions),
        wall_seconds=round(time.time() - started, 1),
    )
    s = record["session"]
    print(
        f"/stats session: {s['replies']} replies, {s['tokens']} tokens, "
        f"{s['tokens_per_second']:.1f} tok/s, {s['tokens_per_step']:.2f} tokens/step "
        f"({record['chat']})"
    )
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
