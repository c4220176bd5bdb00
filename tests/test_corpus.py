"""Plain documents cut into training chunks (the cheap volume source of the trainer)."""

from __future__ import annotations

import pytest

from mlx_redrafter.benchmarks.tiny import make_tokenizer
from mlx_redrafter.train.corpus import corpus_chunks, corpus_files


def write_corpus(root):
    (root / "pkg").mkdir(parents=True)
    (root / "a.py").write_text(" ".join(f"t{i}" for i in range(3, 23)))  # 20 tokens
    (root / "pkg" / "b.md").write_text(" ".join(f"t{i}" for i in range(30, 37)))  # 7 tokens
    (root / "pkg" / "skip.bin").write_text("t5 t6 t7")
    (root / "tests").mkdir()
    (root / "tests" / "c.py").write_text("t8 t9 t10")  # test folders are left out
    return root


def test_files_are_text_files_outside_test_folders(tmp_path):
    root = write_corpus(tmp_path / "c")
    names = sorted(p.relative_to(root).as_posix() for p in corpus_files(root))
    assert names == ["a.py", "pkg/b.md"]
    assert corpus_files(root / "a.py") == [root / "a.py"]


def test_chunks_cover_every_token_once_and_respect_the_cap(tmp_path):
    root = write_corpus(tmp_path / "c")
    tok = make_tokenizer()
    chunks = list(corpus_chunks(root, tok, chunk_tokens=8))
    by_file = {}
    for cid, ids in chunks:
        assert len(ids) <= 8 and cid.startswith("corpus:")
        by_file.setdefault(cid.split("#")[0], []).extend(ids)
    assert by_file["corpus:a.py"] == tok.encode(" ".join(f"t{i}" for i in range(3, 23)))
    assert len(by_file["corpus:pkg/b.md"]) == 7
    assert len({cid for cid, _ in chunks}) == len(chunks)  # ids unique: the val split uses them
    capped = list(corpus_chunks(root, tok, chunk_tokens=8, max_tokens=13))
    assert sum(len(ids) for _, ids in capped) == 13


def test_stdlib_corpus_exists_offline():
    files = corpus_files("stdlib")
    assert len(files) > 100 and any(p.name == "os.py" for p in files)


def test_missing_or_empty_corpus_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        corpus_files(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .py"):
        corpus_files(tmp_path / "empty")
