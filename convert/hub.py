"""Converter inputs given as Hugging Face repo ids ("org/name") instead of local paths.

Resolution is `mlx_redrafter.models.resolve_path` (the same rule `load` uses); this module only
picks the files a base model needs and falls back to PyTorch `.bin` weights when a repo has no
safetensors. A drafter's files are `mlx_redrafter.models.DRAFTER_PATTERNS`, the engine's own.
"""

from __future__ import annotations

from pathlib import Path

from mlx_redrafter.models import MODEL_PATTERNS, hub_snapshot, resolve_path

from .errors import ConversionError
from .weights_io import SAFETENSORS_GLOB, TORCH_BIN_GLOB

# A base model: what `load` fetches (mlx-lm's patterns and a drafter/ folder, which the
# converter carries over).
BASE_PATTERNS = MODEL_PATTERNS
TORCH_PATTERNS = (TORCH_BIN_GLOB, "*.bin.index.json")


def resolve_input(name: str, *, what: str, patterns: tuple[str, ...]) -> Path:
    """A local path as is; a repo id fetched (or found in the cache) with `patterns`."""
    try:
        path = resolve_path(name, what=what, patterns=patterns)
        if path.is_dir() and not any(path.glob(SAFETENSORS_GLOB)) and not Path(name).exists():
            # a Hub repo with PyTorch weights only
            path = hub_snapshot(name, what=what, patterns=patterns + TORCH_PATTERNS)
    except FileNotFoundError as e:
        raise ConversionError(str(e)) from None
    return path
