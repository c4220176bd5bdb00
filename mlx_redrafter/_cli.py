"""Small pieces the console scripts share, so that they report the same things the same way."""

from __future__ import annotations

import sys

EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a process stopped by Ctrl-C


def interrupted(prog: str) -> int:
    """Ctrl-C: one line on stderr instead of a KeyboardInterrupt traceback; the exit status."""
    print(f"{prog}: interrupted", file=sys.stderr, flush=True)
    return EXIT_INTERRUPTED


def note_no_drafter(model: str | None) -> None:
    """Say once that a model folder without `drafter/` decodes without a drafter.

    Printed by the CLIs only: `load()` returns `drafter=None` silently, as an API caller sees it
    in the result (mlx-lm's `load` does not print either).
    """
    where = model if model is not None else "the model folder"
    print(
        f"note: {where} has no drafter/; decoding without a drafter (--no-drafter to silence)",
        file=sys.stderr,
        flush=True,
    )
