"""Reading checkpoint weight files into MLX arrays, with clear errors.

Safetensors files are read by `mx.load` (no torch needed, bfloat16 included). PyTorch pickles
(`pytorch_model*.bin`) need torch and are read with `torch.load(..., weights_only=True)`, which
refuses arbitrary pickled code.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
from tqdm import tqdm

from .errors import ConversionError

SAFETENSORS_GLOB = "model*.safetensors"
TORCH_BIN_GLOB = "pytorch_model*.bin"
TORCH_INSTALL = "pip install torch"


def read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise ConversionError(f"{path.parent} has no {path.name} ({what})")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path} is not valid JSON (truncated or corrupt?): {e}") from None
    if not isinstance(data, dict):
        raise ConversionError(f"{path} does not hold a JSON object")
    return data


def weight_files(folder: Path) -> tuple[str, list[Path]]:
    """("safetensors" | "torch", files) for a checkpoint folder; safetensors preferred."""
    files = sorted(folder.glob(SAFETENSORS_GLOB))
    if files:
        return "safetensors", files
    files = sorted(folder.glob(TORCH_BIN_GLOB))
    if files:
        return "torch", files
    raise ConversionError(
        f"{folder} has no weights (expected model.safetensors, model-*-of-*.safetensors or "
        "pytorch_model*.bin)"
    )


def read_safetensors(files: list[Path], progress: bool = False) -> dict[str, mx.array]:
    weights: dict[str, mx.array] = {}
    for f in tqdm(
        files, desc="reading safetensors", unit="file", disable=not progress or len(files) < 2
    ):
        try:
            part = mx.load(str(f))
            mx.eval(part)  # surface truncation here, not at save time
        except (RuntimeError, ValueError, OSError) as e:
            raise ConversionError(f"cannot read {f} (truncated or corrupt?): {e}") from None
        _merge(weights, part, f)
    return weights


def require_torch(purpose: str):
    try:
        import torch
    except ImportError:
        raise ConversionError(
            f"{purpose} is a PyTorch pickle (.bin), which needs torch to read "
            f"(`{TORCH_INSTALL}`), or save it as safetensors, which does not"
        ) from None
    return torch


def read_torch_bins(files: list[Path], progress: bool = False) -> dict[str, mx.array]:
    torch = require_torch(str(files[0]))
    weights: dict[str, mx.array] = {}
    for f in tqdm(files, desc="reading .bin", unit="file", disable=not progress or len(files) < 2):
        try:
            state = torch.load(str(f), map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises RuntimeError/UnpicklingError/EOFError/...
            raise ConversionError(f"cannot read {f} (truncated or corrupt?): {e}") from None
        if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
            raise ConversionError(f"{f} does not hold a state dict of tensors")
        _merge(weights, {k: torch_to_mx(v) for k, v in state.items()}, f)
    return weights


def read_weights(folder: Path, progress: bool = False) -> tuple[dict[str, mx.array], str]:
    """All weights of a checkpoint folder, and a short description of where they came from."""
    kind, files = weight_files(folder)
    read = read_safetensors if kind == "safetensors" else read_torch_bins
    source = str(files[0]) if len(files) == 1 else f"{folder}/{files[0].name} (+{len(files) - 1})"
    return read(files, progress), source


def torch_to_mx(tensor) -> mx.array:
    import torch

    tensor = tensor.detach().cpu().contiguous()
    if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16: widen exactly, narrow again
        return mx.array(tensor.float().numpy()).astype(mx.bfloat16)
    return mx.array(tensor.numpy())


def _merge(weights: dict, part: dict, source: Path) -> None:
    clash = sorted(set(weights) & set(part))
    if clash:
        raise ConversionError(f"{source} repeats tensors already read from another shard: {clash}")
    weights.update(part)
