"""Where a tuned choice is kept: its key (what the measurement depends on) and one JSON file
per key in `<cache_home>/autotune/`, written atomically so that a reader never sees half."""

from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path

import mlx.core as mx

from ..atomic import atomic_write

# Part of the cache key. Bump it whenever the decode step or the beam search changes cost
# (2: the beam search reads each row's top-50 candidates, and greedy W=1 skips a sync), so
# that shapes tuned against the old costs are measured again instead of reused.
# (3: prompt lookup joins the options, and the pick is confirmed online)
# (4: the online confirmation runs every calibration prompt to max_tokens, not 2 x 48 tokens:
# options within a few percent were ranked by noise)
# (5: the lookup's n-gram sizes are part of the key, and the default minimum is 2)
TUNER_VERSION = 5


def device_description() -> str:
    """The device, BLAS and MLX version: a choice tuned on one machine is not reused on another."""
    from .._blas import blas_description

    info = {}
    try:
        info = mx.device_info()
    except Exception:  # older MLX or a back-end without it
        pass
    name = info.get("device_name") or platform.processor() or "unknown"
    return (
        f"{mx.default_device()} | {name} | {platform.machine()} | cores={os.cpu_count()} | "
        f"BLAS: {blas_description()} | mlx {mx.__version__}"
    )


def cache_path(key: dict, cache_dir: str | Path | None = None) -> Path:
    """The record's file: a hash of the key, under `cache_dir` or `<cache_home>/autotune`."""
    from ..default_model import cache_home

    root = Path(cache_dir) if cache_dir is not None else cache_home() / "autotune"
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return root / f"{digest}.json"


def read_record(path: Path, key: dict) -> dict | None:
    """The cached record at `path` if it holds exactly this key; None when absent or unreadable
    (a damaged file is measured again, not an error)."""
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(record, dict) or record.get("key") != json.loads(json.dumps(key)):
        return None
    return record


def cached_record(
    key: dict, cache_dir: str | Path | None, use_cache: bool, refresh: bool
) -> tuple[Path, dict | None]:
    """The record's path, and the record cached there for this key (marked with its path), or
    None when the caller must measure (absent, another key, caching off, or a refresh)."""
    path = cache_path(key, cache_dir)
    record = read_record(path, key) if use_cache and not refresh else None
    if record is not None:
        record["cached"] = str(path)
    return path, record


def write_record(path: Path, record: dict) -> None:
    """Write the record through a temp file and a rename (concurrent tuners never see half)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(record, indent=1) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()), fsync=False)  # a cache: can be redone


def tuning_key(
    model,
    drafter,
    shapes: list,
    lookups: list,
    prompts: list[str],
    max_tokens: int,
    cache_len: int,
    confirm: bool,
    **extra,
) -> dict:
    """What a tuned choice depends on: the tuner, package, device, model, drafter, options,
    calibration prompts and measurement settings (`extra`: e.g. the batch sizes)."""
    from .. import __version__
    from ..models import model_fingerprint

    return {
        "tuner": TUNER_VERSION,
        "package": __version__,
        "device": device_description(),
        "model": model_fingerprint(model),
        "drafter": model_fingerprint(drafter) if drafter is not None else None,
        "shapes": shapes,
        "lookups": lookups,
        "prompts": hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:16],
        "max_tokens": max_tokens,
        "cache_len": cache_len,
        **extra,
        "confirm": confirm,
    }
