"""Prompt caches saved by mlx-lm (`mlx_lm.cache_prompt`, `save_prompt_cache`) for this engine.

mlx-lm's file holds one `KVCache` per layer with the whole cached prompt. The engine needs its
own `TreeKVCache` (it also serves the tree mask and the commit of an accepted path), so the
keys and values are moved into one; generation then continues after the cached prompt, with
the new prompt appended, as `mlx_lm.generate --prompt-cache-file` does.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.nn as nn
from mlx_lm.models.cache import KVCache, QuantizedKVCache, RotatingKVCache

from .cache import TreeKVCache, make_tree_cache
from .chat_template import has_chat_template, messages_for, template_text

QUERY = "<query>"  # mlx-lm's placeholder for the new message when a cache holds the prompt


def load_prompt_cache(path: str | Path, model: nn.Module) -> tuple[list[TreeKVCache], dict]:
    """(engine cache holding the saved prompt, the file's metadata) from an mlx-lm cache file."""
    cache, metadata = read_file(path)
    return to_tree_cache(cache, model, source=str(path)), metadata


def read_file(path: str | Path) -> tuple[list, dict]:
    """mlx-lm's cache layers and metadata, as `mlx_lm.models.cache.load_prompt_cache` reads them."""
    from mlx_lm.models.cache import load_prompt_cache as mlx_lm_load

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"prompt cache file {path} does not exist")
    return mlx_lm_load(str(path), return_metadata=True)


def read_for_cli(path: str | None, model_arg: str | None) -> tuple[list, str | None, dict] | None:
    """--prompt-cache-file: (mlx-lm's cache layers, the model to load, tokenizer settings), or
    None without a file. The model defaults to the file's, as in `mlx_lm.generate`."""
    if path is None:
        return None
    cache, metadata = read_file(path)
    return cache, check_cache_model(metadata, model_arg), tokenizer_config(metadata)


def to_tree_cache(cache: list, model: nn.Module, source: str = "the prompt cache") -> list:
    """An engine cache with the same keys and values as mlx-lm `KVCache` layers."""
    tree = make_tree_cache(model)
    if len(cache) != len(tree):
        raise ValueError(
            f"{source} has {len(cache)} layers but the model has {len(tree)}: it was made for "
            "another model"
        )
    for i, (layer, target) in enumerate(zip(cache, tree, strict=True)):
        _check_layer(layer, source)
        if layer.keys is None:
            continue
        keys, values = layer.keys[..., : layer.offset, :], layer.values[..., : layer.offset, :]
        attn = model.layers[i].self_attn
        heads = getattr(attn, "n_kv_heads", None) or getattr(attn, "num_key_value_heads", None)
        if heads is not None and keys.shape[1] != heads:
            raise ValueError(
                f"{source}: layer {i} holds {keys.shape[1]} key/value heads but the model has "
                f"{heads}: it was made for another model"
            )
        target.state = (keys, values, layer.offset)
    offsets = {c.offset for c in tree}
    if len(offsets) > 1:
        raise ValueError(f"{source}: layers hold different numbers of tokens {sorted(offsets)}")
    return tree


def _check_layer(layer, source: str) -> None:
    if isinstance(layer, RotatingKVCache):
        raise ValueError(
            f"{source} holds rotating KV caches (made with --max-kv-size or for a sliding-window "
            "model); mlx_redrafter needs full caches: make the file again without --max-kv-size"
        )
    if isinstance(layer, QuantizedKVCache):
        raise ValueError(
            f"{source} holds quantized KV caches (made with --kv-bits); make the file again "
            "without --kv-bits (the engine quantizes its own cache with --kv-bits)"
        )
    if type(layer) is not KVCache:
        raise ValueError(f"{source} holds a {type(layer).__name__}; mlx_redrafter needs KVCache")


def check_cache_model(metadata: dict, model_arg: str | None) -> str | None:
    """The model to load: --model, else the file's; an error when they differ (as mlx-lm)."""
    saved = metadata.get("model")
    if model_arg is None:
        return saved
    if saved is not None and not _same_model(model_arg, saved):
        raise ValueError(
            f"Providing a different model ({model_arg}) than that used to create the prompt "
            f"cache ({saved}) is an error."
        )
    return model_arg


def _same_model(a: str, b: str) -> bool:
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    if pa.exists() and pb.exists():
        return pa.resolve() == pb.resolve()
    return a == b


def tokenizer_config(metadata: dict) -> dict:
    """The tokenizer settings the cache was made with (mlx-lm stores them as JSON)."""
    return json.loads(metadata.get("tokenizer_config", "{}"))


def continuation_prompt(tokenizer, text: str, system: str | None, use_template: bool) -> list[int]:
    """Token ids to append after a cached prompt, as mlx-lm's generate computes them.

    With a chat template the message is rendered, and only what follows where the message's
    text starts is kept (mlx-lm renders `<query>` in its place to find that point): the cache
    holds the template's head and the cached part of the message. No BOS is added mid-sequence
    (mlx-lm adds one without a template; here the text alone is appended).
    """
    if not (use_template and has_chat_template(tokenizer)):
        return tokenizer.encode(text, add_special_tokens=False)
    full = template_text(tokenizer, messages_for(system, (), text))
    suffix = full[template_text(tokenizer, messages_for(system, (), QUERY)).index(QUERY) :]
    return tokenizer.encode(suffix, add_special_tokens=False)
