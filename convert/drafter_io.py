"""Drafters in the reference layout (PyTorch / TensorRT-LLM) <-> MLX drafter folders.

The reference trainer's `save_pretrained` writes `config.json` (`model_type:
recurrent_drafting_drafter`) and `model.safetensors` or `pytorch_model.bin`, with the keys of
docs/DESIGN.md section 2 in torch `[out, in]` layout, which is also `mlx.nn.Linear`'s: conversion
is validation, key checks and an optional dtype cast, never a transpose.

Two differences, handled by `mlx_redrafter.drafter.from_reference_weights`: a reference drafter
trained with `rnn: false` stores no `rnn_u`/`rnn_w` (its state update is additive), while
`mlx_redrafter.Drafter` always has them; they are written as zeros (never read when `rnn` is
false) and dropped again on export. An `emb_norm.weight` (never applied by the reference
forward) is dropped.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_redrafter.drafter import (
    MODEL_TYPE,
    RNN_KEYS,
    Drafter,
    DrafterConfig,
    check_drafter,
    from_reference_weights,
)

from .errors import ConversionError
from .weights_io import read_json, read_weights

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
# Reference config fields, in the order the reference's config class declares them.
REFERENCE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "exit_dim",
    "num_draft_layers",
    "num_lookback_tokens",
    "rnn",
)
# transformers bookkeeping that describes the source file, not the drafter.
DROPPED_CONFIG_KEYS = ("_name_or_path", "dtype", "transformers_version")


def drafter_folder(path: Path) -> Path:
    """A drafter folder, or a model folder with the drafter in its `drafter/` subfolder."""
    if not path.exists():
        raise ConversionError(f"drafter folder {path} does not exist")
    if (path / "drafter" / "config.json").is_file() and not _is_drafter_config(
        path / "config.json"
    ):
        return path / "drafter"
    if not path.is_dir():
        raise ConversionError(f"{path} is not a folder (expected a drafter folder)")
    return path


def _is_drafter_config(path: Path) -> bool:
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("model_type") == MODEL_TYPE
    except (OSError, ValueError, AttributeError):
        return False


def read_config(folder: Path) -> tuple[DrafterConfig, dict]:
    """The drafter config, and the raw JSON it came from."""
    raw = read_json(folder / "config.json", "drafter config")
    model_type = raw.get("model_type")
    if model_type != MODEL_TYPE:
        raise ConversionError(
            f"{folder / 'config.json'}: unknown model_type {model_type!r} for a drafter "
            f"(expected {MODEL_TYPE!r})"
        )
    for name in ("vocab_size", "hidden_size", "num_draft_layers"):
        value = raw.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ConversionError(
                f"{folder / 'config.json'}: {name} must be a non-negative integer, got {value!r}"
            )
    cleaned = {k: v for k, v in raw.items() if k not in DROPPED_CONFIG_KEYS}
    if cleaned.get("exit_dim") in (None, -1):  # the reference config's "unset"
        cleaned["exit_dim"] = 2 * raw["hidden_size"]
    try:
        return DrafterConfig.from_dict(cleaned), raw
    except (TypeError, ValueError) as e:
        raise ConversionError(f"{folder / 'config.json'}: {e}") from None


def read_drafter(path: Path, *, dtype: str | None = None, progress: bool = False) -> Drafter:
    """Read a drafter folder (reference layout or our own), checking keys and shapes.

    The weights keep their stored floating dtype unless `dtype` names another.
    """
    folder = drafter_folder(Path(path))
    config, raw = read_config(folder)
    weights, source = read_weights(folder, progress)
    stored = _floating_dtype(weights, source)
    weights = from_reference_weights(config, weights, rnn_in_config="rnn" in raw)
    drafter = Drafter(config)
    try:
        drafter.load_checked_weights(weights, source=source)
    except ValueError as e:
        raise ConversionError(str(e)) from None
    target = DTYPES[dtype] if dtype else stored
    drafter.set_dtype(target)
    mx.eval(drafter.parameters())
    drafter.config.torch_dtype = _dtype_name(target)
    return drafter


def write_mlx_drafter(drafter: Drafter, folder: Path) -> None:
    """Our drafter folder: exactly what `Drafter.from_pretrained` reads."""
    drafter.save_pretrained(folder)


def reference_config(config: DrafterConfig) -> dict:
    """config.json for the reference layout (what its DrafterConfig and TensorRT-LLM read)."""
    if config.draft_vocab_size is not None:  # `full_vocab.expand_to_full_vocabulary` first
        raise ConversionError(
            "internal error: a reduced-vocabulary drafter must be expanded before export"
        )
    d = config.to_dict()
    out = {k: v for k, v in d.items() if k not in (*REFERENCE_FIELDS, "model_type", "torch_dtype")}
    out.setdefault("architectures", ["Drafter"])
    out["model_type"] = MODEL_TYPE
    out.update({k: d[k] for k in REFERENCE_FIELDS})
    out["torch_dtype"] = config.torch_dtype
    return out


def reference_weights(drafter: Drafter) -> dict[str, mx.array]:
    weights = dict(tree_flatten(drafter.parameters()))
    if not drafter.config.rnn:
        for key in RNN_KEYS:
            weights.pop(key, None)
    return weights


def write_reference_drafter(drafter: Drafter, folder: Path) -> None:
    """`config.json` + `model.safetensors` in the reference layout (same keys, torch metadata)."""
    config = reference_config(drafter.config)
    folder.mkdir(parents=True)
    mx.save_safetensors(
        str(folder / "model.safetensors"), reference_weights(drafter), metadata={"format": "pt"}
    )
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def check_against_model(drafter: Drafter, model_dir: Path) -> None:
    """The drafter must fit the base model in `model_dir` (hidden size, vocabulary)."""
    from mlx_lm.utils import load_model

    try:
        model, _ = load_model(model_dir, lazy=True)
    except Exception as e:  # noqa: BLE001  (mlx-lm raises many kinds for a bad folder)
        raise ConversionError(f"cannot open the base model in {model_dir}: {e}") from None
    try:
        check_drafter(model, drafter)
    except ValueError as e:
        raise ConversionError(f"drafter does not fit the base model in {model_dir}: {e}") from None


def _floating_dtype(weights: dict[str, mx.array], source: str) -> mx.Dtype:
    kinds = {v.dtype for v in weights.values() if mx.issubdtype(v.dtype, mx.floating)}
    if not kinds:
        raise ConversionError(f"{source} holds no floating-point weights")
    if len(kinds) > 1:  # mixed: keep the widest
        for dtype in (mx.float32, mx.bfloat16, mx.float16):
            if dtype in kinds:
                return dtype
    kind = kinds.pop()
    if kind == mx.float64:
        return mx.float32
    if kind not in DTYPES.values():
        raise ConversionError(f"{source}: unsupported weight dtype {kind}")
    return kind


def _dtype_name(dtype: mx.Dtype) -> str:
    return next(name for name, d in DTYPES.items() if d == dtype)
