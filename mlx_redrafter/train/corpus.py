"""Plain documents as training text: whole files cut into model-sized chunks.

Teacher forcing on ordinary text is the cheap source of volume (one LLM pass, no generation).
With the trainer's LLM labels the drafter still learns what the LLM would say next, only over
contexts a person wrote. Python's own library sources and documentation install offline with
the interpreter, so every user has a corpus of code and English at hand.
"""

from __future__ import annotations

import hashlib
import sysconfig
from collections.abc import Iterator
from pathlib import Path

TEXT_SUFFIXES = (".py", ".md", ".txt", ".rst")
STDLIB = "stdlib"


def corpus_files(spec: str | Path) -> list[Path]:
    """Files of a corpus: one file, every text file under a folder, or 'stdlib' (Python's
    standard library sources). Folder files come in a fixed pseudo-random order (a hash of each
    relative path), so that a --corpus-tokens cap samples many files, not the first few."""
    root = Path(sysconfig.get_paths()["stdlib"]) if str(spec) == STDLIB else Path(spec)
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise FileNotFoundError(f"corpus {spec}: no such file or folder")
    skip = {"site-packages", "test", "tests", "idlelib", "__pycache__"}
    files = [
        p
        for p in root.rglob("*")
        if p.suffix in TEXT_SUFFIXES and p.is_file() and not skip & set(p.relative_to(root).parts)
    ]
    files.sort(key=lambda p: hashlib.sha1(str(p.relative_to(root)).encode()).hexdigest())
    if not files:
        raise ValueError(f"corpus {spec}: no {'/'.join(TEXT_SUFFIXES)} files found")
    return files


def corpus_chunks(
    spec: str | Path, tokenizer, chunk_tokens: int, max_tokens: int | None = None
) -> Iterator[tuple[str, list[int]]]:
    """(id, token ids) chunks of at most `chunk_tokens`, in file order, until `max_tokens`."""
    root = Path(spec)
    total = 0
    for path in corpus_files(spec):
        text = path.read_text(encoding="utf-8", errors="replace").strip()
        if not text:
            continue
        ids = tokenizer.encode(text, add_special_tokens=False)
        name = path.name if root.is_file() or str(spec) == STDLIB else path.relative_to(root)
        for i in range(0, len(ids), chunk_tokens):
            chunk = ids[i : i + chunk_tokens]
            if max_tokens is not None and total + len(chunk) > max_tokens:
                chunk = chunk[: max_tokens - total]
            if len(chunk) > 2:
                yield f"corpus:{name}#{i // chunk_tokens}", chunk
                total += len(chunk)
            if max_tokens is not None and total >= max_tokens:
                return
