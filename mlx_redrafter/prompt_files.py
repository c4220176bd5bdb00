"""Reading prompt files (JSONL or plain text): the one reader behind every `--prompts` option.

A user's file can be wrong in many ways (a folder, a binary file, a bad line among thousands);
every error here names the file and, where there is one, the line, as `path:line: problem`, so
the line can be found and fixed without a traceback.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

JSONL_SUFFIXES = (".jsonl", ".json")


def is_jsonl(path: str | Path) -> bool:
    """JSONL by suffix; anything else is read as plain text, one item a line."""
    return Path(path).suffix.lower() in JSONL_SUFFIXES


def read_lines(path: str | Path, what: str = "prompt file") -> list[tuple[int, str]]:
    """(1-based line number, stripped text) of every non-blank line of a UTF-8 text file.

    FileNotFoundError for a missing file; ValueError, naming the path, for a folder and for
    bytes that are not UTF-8 text (with the line they sit on).
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what} {path} is a folder, not a file")
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ValueError(
            f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x}): "
            f"a {what} is JSONL or plain text"
        ) from None
    if "\x00" in text:
        line = text.count("\n", 0, text.index("\x00")) + 1
        raise ValueError(f"{path}:{line}: a NUL byte: a binary file, not a {what}")
    text = text.removeprefix("\ufeff")  # a byte-order mark some editors write
    return [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]


def read_jsonl(path: str | Path, what: str = "prompt file") -> list[tuple[int, dict]]:
    """(line number, object) of every non-blank line; a line that is not a JSON object is a
    ValueError naming the file and the line."""
    rows = []
    for n, line in read_lines(path, what):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid JSON: {e.msg} (column {e.colno})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
        rows.append((n, row))
    return rows


@dataclass
class Question:
    """One line of a JSONL prompt file in MT-Bench's layout."""

    question_id: str
    category: str
    turns: list[str]


def load_questions(path: str | Path, limit: int | None = None) -> list[Question]:
    """The questions of a JSONL prompt file (`turns`, or one `prompt`); errors name the file and
    the line. The tuner's calibration files and the benchmarks' prompt files share it."""
    questions = []
    for n, row in read_jsonl(path):
        turns = row.get("turns") or ([row["prompt"]] if "prompt" in row else None)
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns):
            raise ValueError(f"{path}:{n}: needs a list of strings under 'turns'")
        questions.append(
            Question(str(row.get("question_id", n)), str(row.get("category", "all")), turns)
        )
    if not questions:
        raise ValueError(f"prompt file {path} holds no questions")
    return questions[:limit] if limit is not None else questions


def packaged_mt_bench() -> Path:
    """The 80 MT-Bench questions that ship as the benchmarks' package data.

    Located with `find_spec`, which imports no benchmark code: the engine (here the drafter's
    `evaluate` command) may read the benchmark's data file, never its modules.
    """
    import importlib.util

    spec = importlib.util.find_spec("mlx_redrafter.benchmarks")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the mlx_redrafter.benchmarks package data is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "mt_bench.jsonl"
