"""mlx_redrafter.atomic: a write that fails halfway leaves nothing new and the old content
intact; a finished one is complete."""

from __future__ import annotations

import os

import pytest

from mlx_redrafter.atomic import TMP_MARK, atomic_folder, atomic_write, remove_leftovers


class Boom(Exception):
    pass


def names(folder):
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("error", [Boom, KeyboardInterrupt])
def test_failed_file_write_leaves_no_file_and_no_temp_file(tmp_path, error):
    def half(f):
        f.write(b"half")
        raise error

    with pytest.raises(error):
        atomic_write(tmp_path / "out.bin", half)
    assert names(tmp_path) == []


@pytest.mark.parametrize("fsync", [True, False])
def test_failed_file_write_keeps_the_existing_file(tmp_path, fsync):
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")

    def half(f):
        f.write(b"new, but not all of it")
        assert path.read_bytes() == b"old"  # the target is untouched while writing
        raise Boom

    with pytest.raises(Boom):
        atomic_write(path, half, fsync=fsync)
    assert path.read_bytes() == b"old" and names(tmp_path) == ["out.bin"]
    atomic_write(path, lambda f: f.write(b"new"), fsync=fsync)
    assert path.read_bytes() == b"new" and names(tmp_path) == ["out.bin"]


def test_file_write_uses_a_marked_hidden_temp_name_and_the_umask(tmp_path):
    seen = []

    def write(f):
        seen.extend(names(tmp_path))
        f.write(b"x")

    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "out.bin", write)
    finally:
        os.umask(old)
    assert len(seen) == 1 and seen[0].startswith(".out.bin" + TMP_MARK)
    assert (tmp_path / "out.bin").stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("error", [Boom, KeyboardInterrupt])
def test_failed_folder_build_leaves_nothing_new(tmp_path, error):
    target = tmp_path / "new" / "parents" / "out"
    with pytest.raises(error), atomic_folder(target) as staged:
        staged.mkdir()
        (staged / "a.txt").write_text("a")
        raise error
    assert names(tmp_path) == []  # no output, no hidden work folder, no new parent


def test_failed_folder_build_keeps_the_existing_folder(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "mine.txt").write_text("keep")
    with pytest.raises(Boom), atomic_folder(target, replace=True) as staged:
        staged.mkdir()
        (staged / "new.txt").write_text("new")
        raise Boom
    assert names(target) == ["mine.txt"] and names(tmp_path) == ["out"]


def test_existing_folder_is_refused_unless_replace(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "mine.txt").write_text("keep")
    with pytest.raises(FileExistsError), atomic_folder(target) as staged:
        staged.mkdir()
        (staged / "new.txt").write_text("new")
    assert names(target) == ["mine.txt"] and names(tmp_path) == ["out"]
    with atomic_folder(target, replace=True) as staged:
        staged.mkdir()
        (staged / "new.txt").write_text("new")
    assert names(target) == ["new.txt"] and names(tmp_path) == ["out"]


def test_folder_created_meanwhile_is_not_clobbered(tmp_path):
    """Another process installs the same folder first: ours is dropped, theirs is kept."""
    target = tmp_path / "out"
    with pytest.raises(FileExistsError), atomic_folder(target) as staged:
        staged.mkdir()
        (staged / "ours.txt").write_text("ours")
        target.mkdir()
        (target / "theirs.txt").write_text("theirs")
    assert names(target) == ["theirs.txt"] and names(tmp_path) == ["out"]


def test_a_block_that_writes_nothing_installs_nothing(tmp_path):
    with (
        pytest.raises(FileNotFoundError, match="nothing was written"),
        atomic_folder(tmp_path / "out"),
    ):
        pass
    assert names(tmp_path) == []


def test_remove_leftovers_of_killed_writes(tmp_path):
    target = tmp_path / "checkpoint"
    target.mkdir()
    (tmp_path / f".checkpoint{TMP_MARK}dir-1-ab").mkdir()
    (tmp_path / f".checkpoint{TMP_MARK}dir-1-ab" / "x").write_text("x")
    (tmp_path / f".checkpoint{TMP_MARK}file-1-cd").write_text("x")
    (tmp_path / f".other{TMP_MARK}file-1-cd").write_text("x")
    remove_leftovers(target)
    assert names(tmp_path) == [f".other{TMP_MARK}file-1-cd", "checkpoint"]
