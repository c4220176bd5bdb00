"""`python -m mlx_redrafter <command> [args]`: one entry point, as `python -m mlx_lm generate`.

Each command is the module behind the matching `mlx_redrafter.<command>` console script; the
remaining arguments go to that command's own parser (`<command> --help` lists them).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

# command -> module whose `main(argv)` runs it (the console scripts in pyproject.toml)
COMMANDS = {
    "generate": "mlx_redrafter.generate",
    "chat": "mlx_redrafter.chat",
    "server": "mlx_redrafter.server.cli",
    "convert": "mlx_redrafter.convert.cli",
    "train": "mlx_redrafter.train.cli",
    "benchmark": "mlx_redrafter.benchmarks.run",
}

USAGE = f"""\
usage: python -m mlx_redrafter <command> [args]

commands:
  {", ".join(COMMANDS)}

For a command's options: python -m mlx_redrafter <command> --help"""


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch to a command's `main`; usage on -h/--help or no command, exit 2 if unknown."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE, file=sys.stdout if args else sys.stderr)
        return 0 if args else 2
    if args[0] == "--version":
        from . import __version__

        print(__version__)
        return 0
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        print(
            f"mlx_redrafter: error: unknown command {command!r} "
            f"(choose from {', '.join(COMMANDS)})\n\n{USAGE}",
            file=sys.stderr,
        )
        return 2
    module = importlib.import_module(COMMANDS[command])
    # the command's argparse names itself after sys.argv[0] when it has no prog of its own
    sys.argv = [f"mlx_redrafter.{command}", *rest]
    return module.main(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
