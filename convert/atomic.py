"""All-or-nothing output folders for the converter: `mlx_redrafter.atomic` with its messages.

A conversion writes into a hidden sibling of the output (same file system, so the final rename
is atomic). If anything fails, the sibling is removed and the output never appears; an existing
output is replaced only with `force`, and only once the new folder is complete. The mechanics
live in `mlx_redrafter.atomic` (shared with the GGUF converter, training and the data store);
this module only turns "already exists" into the converter's `ConversionError`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from mlx_redrafter.atomic import atomic_folder

from .errors import ConversionError


def check_absent(target: Path, force: bool, flag: str = "--force") -> None:
    """Refuse an existing `target` before any work starts, unless `force`."""
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
    try:
        with atomic_folder(target, replace=force) as staged:
            yield staged
    except FileExistsError as e:  # created while we were converting
        if e.filename != str(target):
            raise
        raise ConversionError(f"{target} already exists (pass --force to replace it)") from None
    except FileNotFoundError as e:
        if not str(e).startswith("nothing was written"):
            raise
        raise ConversionError(f"internal error: {e}") from None
