"""Base models: a Hugging Face folder (or a GGUF file) -> an mlx-lm model folder.

The Hugging Face path reuses mlx-lm's own loading (its per-architecture `sanitize`), dtype
handling, quantization and saving, as `mlx_lm.convert` does, adding the checks and progress
this project wants. mlx-lm reads safetensors only: a `pytorch_model*.bin` checkpoint is first
restaged as safetensors (which needs torch). The GGUF path is `mlx_redrafter.gguf.convert_gguf`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map_with_path
from tqdm import tqdm

from mlx_redrafter.verify import SUPPORTED_MODEL_TYPES

from .errors import ConversionError
from .weights_io import TORCH_BIN_GLOB, read_json, read_torch_bins, weight_files

CONVERSION_DTYPES = ("float16", "bfloat16", "float32")


def check_model_type(config: dict, where: Path) -> str:
    """The architecture must be one mlx-lm builds and mlx_redrafter can verify trees on."""
    from mlx_lm.utils import _get_classes

    model_type = config.get("model_type")
    if not model_type:
        raise ConversionError(f"{where} has no model_type")
    try:
        _get_classes(config)
    except (ValueError, ImportError):
        raise ConversionError(
            f"{where}: unknown model_type {model_type!r} (mlx-lm has no such architecture)"
        ) from None
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConversionError(
            f"{where}: model_type {model_type!r} is not supported by mlx_redrafter "
            f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    return model_type


def convert_hf(
    src: Path,
    dest: Path,
    *,
    quantize: bool = False,
    q_bits: int | None = None,
    q_group_size: int | None = None,
    dtype: str | None = None,
    progress: bool = False,
) -> None:
    """Write the mlx-lm folder `dest` (must not exist) from the Hugging Face folder `src`."""
    from mlx_lm.utils import quantize_model, save

    config = read_json(src / "config.json", "model config")
    check_model_type(config, src / "config.json")
    kind, files = weight_files(src)
    with contextlib.ExitStack() as stack:
        load_from = src
        if kind == "torch":
            stage = stack.enter_context(
                tempfile.TemporaryDirectory(prefix=".stage-", dir=dest.parent)
            )
            load_from = Path(stage)
            restage_torch_checkpoint(src, files, load_from, progress)
        model, tokenizer, config = _load_with_mlx_lm(load_from, src)

        dtype = dtype or config.get("torch_dtype") or config.get("dtype")
        if dtype in CONVERSION_DTYPES:
            target = getattr(mx, dtype)
            cast = getattr(model, "cast_predicate", lambda _: True)
            model.update(
                tree_map_with_path(
                    lambda k, v: (
                        v.astype(target) if cast(k) and mx.issubdtype(v.dtype, mx.floating) else v
                    ),
                    model.parameters(),
                )
            )
        if quantize:
            model, config = quantize_model(model, config, q_group_size, q_bits)
        _materialize(model, progress)
        dest.mkdir()
        save(dest, src, model, tokenizer, config)


def restage_torch_checkpoint(src: Path, bins: list[Path], stage: Path, progress: bool) -> None:
    """A folder mlx-lm can load: `src`'s other files linked, its .bin weights as safetensors."""
    weights = read_torch_bins(bins, progress)
    for f in src.iterdir():
        if f.is_file() and not f.match(TORCH_BIN_GLOB) and not f.name.endswith(".bin.index.json"):
            try:
                os.symlink(f.resolve(), stage / f.name)
            except OSError:
                shutil.copy(f, stage / f.name)
    mx.save_safetensors(str(stage / "model.safetensors"), weights, metadata={"format": "pt"})


def _load_with_mlx_lm(folder: Path, src: Path):
    from mlx_lm.utils import load

    try:
        return load(str(folder), lazy=True, return_config=True)
    except Exception as e:  # noqa: BLE001  (mlx-lm and transformers raise many kinds)
        raise ConversionError(f"cannot load the Hugging Face model in {src}: {e}") from None


def _materialize(model, progress: bool) -> None:
    """Compute every (cast / quantized) weight now, so the progress bar means something."""
    params = tree_flatten(model.parameters())
    try:
        for _, value in tqdm(params, desc="converting", unit="tensor", disable=not progress):
            mx.eval(value)
    except (RuntimeError, ValueError) as e:  # a truncated shard shows up when read
        raise ConversionError(
            f"cannot read the model weights (truncated or corrupt?): {e}"
        ) from None


def convert_gguf_model(
    gguf: Path, dest: Path, *, dequantize: bool, dtype: str | None, progress: bool
) -> None:
    from mlx_redrafter.gguf import convert_gguf

    if not gguf.is_file():
        raise ConversionError(f"GGUF file {gguf} does not exist")
    try:
        convert_gguf(gguf, dest, dequantize=dequantize, dtype=dtype, progress=progress)
    except (ValueError, OSError) as e:
        raise ConversionError(str(e)) from None
    except KeyError as e:
        raise ConversionError(f"{gguf}: GGUF metadata lacks {e}") from None
