"""All-or-nothing output folders: build beside the target, rename into place at the end.

A conversion writes into a hidden sibling of the output (same file system, so the final rename
is atomic). If anything fails, the sibling is removed and the output never appears; an existing
output is replaced only with `force`, and only once the new folder is complete.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

from .errors import ConversionError


def hidden_sibling(target: Path, kind: str) -> Path:
    """Create an empty hidden folder `.NAME.KIND-XXXXXXXX` next to `target`."""
    while True:
        path = target.parent / f".{target.name}.{kind}-{secrets.token_hex(4)}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


def check_absent(target: Path, force: bool, flag: str = "--force") -> None:
    if (target.exists() or target.is_symlink()) and not force:
        raise ConversionError(f"{target} already exists (pass {flag} to replace it)")


@contextlib.contextmanager
def staged_output(target: str | os.PathLike, *, force: bool) -> Iterator[Path]:
    """Yield a path (not yet created) to write the output folder at; install it on success.

    The yielded path lies in a hidden work folder beside `target`. When the block finishes it
    is renamed to `target` (an existing `target` is refused unless `force`); when the block
    raises, the work folder is removed and `target` is left as it was.
    """
    target = Path(target)
    check_absent(target, force)
    created = _missing_ancestors(target.parent)
    target.parent.mkdir(parents=True, exist_ok=True)
    work = hidden_sibling(target, "tmp")
    staged = work / target.name
    done = False
    try:
        yield staged
        if not staged.is_dir():
            raise ConversionError(f"internal error: nothing was written for {target}")
        _install(staged, target, work, force)
        done = True
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if not done:
            for folder in created:  # innermost first; only folders that are still empty
                try:
                    folder.rmdir()
                except OSError:
                    break


def _missing_ancestors(folder: Path) -> list[Path]:
    """`folder` and its parents that do not exist yet, innermost first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


def _install(staged: Path, target: Path, work: Path, force: bool) -> None:
    previous = work / ".previous"
    if target.exists() or target.is_symlink():
        if not force:  # created while we were converting
            raise ConversionError(f"{target} already exists (pass --force to replace it)")
        os.rename(target, previous)
    try:
        os.rename(staged, target)
    except BaseException:
        if previous.exists() or previous.is_symlink():
            os.rename(previous, target)
        raise
