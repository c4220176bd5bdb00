"""All-or-nothing writes: a file or a folder appears complete or not at all.

Why: a crash, a full disk or Ctrl-C halfway through a write must never leave a truncated
file or a half-filled folder where a later run would take it for a finished one (a dataset
shard, a cached entry, a checkpoint, a converted model). Everything is written under a hidden
name beside its target (same folder, so the same file system) and renamed into place at the
end; on any error, KeyboardInterrupt included, the hidden copy is removed and the target is
left as it was.

Hidden names contain `TMP_MARK`, so a folder's owner can sweep what a killed process (which
gets no chance to clean up) left behind.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

TMP_MARK = ".tmp-"


def _hidden_name(target: Path, kind: str) -> str:
    return f".{target.name}{TMP_MARK}{kind}-{os.getpid()}-{secrets.token_hex(4)}"


def atomic_write(
    path: str | os.PathLike, write: Callable[[BinaryIO], None], *, fsync: bool = True
) -> None:
    """Call `write(f)` on a hidden temp file beside `path`, then rename it to `path`.

    An existing `path` is replaced only once the new content is complete; if `write` raises
    (or the process is interrupted), the temp file is removed and `path` is untouched.
    `fsync=False` skips flushing to disk, for caches whose entries can be computed again.
    The temp file is opened with the umask's permissions (unlike `tempfile.mkstemp`'s 0600).
    """
    path = Path(path)
    tmp = path.with_name(_hidden_name(path, "file"))
    try:
        with open(tmp, "xb") as f:
            write(f)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def hidden_sibling(target: str | os.PathLike, kind: str = "dir") -> Path:
    """Create an empty hidden folder beside `target` (same file system, so renames work)."""
    target = Path(target)
    while True:
        path = target.parent / _hidden_name(target, kind)
        try:
            path.mkdir()  # honours the umask, unlike tempfile.mkdtemp's 0700
            return path
        except FileExistsError:
            continue


@contextlib.contextmanager
def atomic_folder(target: str | os.PathLike, *, replace: bool = False) -> Iterator[Path]:
    """Yield a path (not yet created) to build a folder at; rename it to `target` at the end.

    The path lies in a hidden work folder beside `target` (missing parents of `target` are
    created, and removed again if nothing gets installed). When the block finishes, the folder
    built there becomes `target`: an existing `target` raises FileExistsError unless `replace`,
    and is replaced only now that the new folder is complete. When the block raises, the work
    folder is removed and `target` is left as it was.
    """
    target = Path(target)
    created = _missing_ancestors(target.parent)
    target.parent.mkdir(parents=True, exist_ok=True)
    work = hidden_sibling(target)
    staged = work / target.name
    done = False
    try:
        yield staged
        if not staged.is_dir():
            raise FileNotFoundError(f"nothing was written for {target}")
        install_folder(staged, target, replace=replace)
        done = True
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if not done:
            for folder in created:  # innermost first; only folders that are still empty
                try:
                    folder.rmdir()
                except OSError:
                    break


def install_folder(staged: Path, target: Path, *, replace: bool) -> None:
    """Rename the finished folder `staged` to `target`.

    Without `replace`, an existing `target` (even one created by another process a moment
    ago) raises FileExistsError and stays as it is. With it, the old `target` is moved aside,
    restored if the rename fails, and deleted once the new folder is in place.
    """
    if not replace:
        if target.exists() or target.is_symlink():
            raise FileExistsError(errno.EEXIST, "already exists", str(target))
        try:
            os.rename(staged, target)
        except OSError as e:
            if e.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR):  # created meanwhile
                raise FileExistsError(errno.EEXIST, "already exists", str(target)) from e
            raise
        return
    aside = hidden_sibling(target, "old")
    previous = aside / "previous"
    try:
        with contextlib.suppress(FileNotFoundError):  # none, or removed meanwhile
            os.rename(target, previous)
        try:
            os.rename(staged, target)
        except BaseException:
            if previous.exists() or previous.is_symlink():
                os.rename(previous, target)
            raise
    finally:
        shutil.rmtree(aside, ignore_errors=True)


def remove_leftovers(target: str | os.PathLike) -> None:
    """Delete the hidden files and folders that writes of `target` left when killed.

    Only for a target that no other process is writing at the same time (one whose writer
    holds a lock, or is the only one by design, like a training run's checkpoint).
    """
    target = Path(target)
    for path in target.parent.glob(f".{glob.escape(target.name)}{TMP_MARK}*"):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _missing_ancestors(folder: Path) -> list[Path]:
    """`folder` and its parents that do not exist yet, innermost first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing
