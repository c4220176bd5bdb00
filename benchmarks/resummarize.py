"""`python -m mlx_redrafter.benchmarks.resummarize RESULTS.json`: rebuild a benchmark run's
summary, Markdown page and plots from its JSON, without running anything again.

For a report that gained a figure after the run (the loop-free row did): the timings stay
those measured. The greedy-loop mark needs mlx-lm's output tokens, so the run must have kept
them (`--save-tokens`). The JSON's summary, the `.md` and the plots beside it are replaced.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from mlx_redrafter.lookup import has_repeat

from .report import write_report
from .run import summarize


def mark_greedy_loops(records: list[dict], source: Path) -> None:
    """Set each prompt's `greedy_loop` from mlx-lm's saved output tokens."""
    for p in records:
        tokens = p["runs"]["mlx_lm"][0].get("tokens")
        if tokens is None:
            raise ValueError(
                f"{source}: prompt {p['question_id']} has no saved output tokens "
                "(rerun the benchmark with --save-tokens)"
            )
        p["greedy_loop"] = has_repeat(tokens)


def resummarize(path: Path) -> list[Path]:
    """Rebuild the summary, Markdown and plots of the run stored at `path`; returns the files."""
    try:
        results = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable benchmark JSON ({e})") from None
    if not isinstance(results, dict) or "prompts" not in results or "decoders" not in results:
        raise ValueError(f"{path}: not a benchmark run's JSON (no prompts or decoders)")
    records = results["prompts"]
    mark_greedy_loops(records, path)
    kinds = {name: d["kind"] for name, d in results["decoders"].items()}
    results["summary"] = summarize(records, kinds, results["config"]["repeats"])
    return write_report(results, path.parent, path.stem)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mlx_redrafter.benchmarks.resummarize", description=__doc__.split("\n")[0]
    )
    parser.add_argument("results", type=Path, help="a benchmark run's JSON (with saved tokens)")
    args = parser.parse_args(argv)
    try:
        written = resummarize(args.results)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
