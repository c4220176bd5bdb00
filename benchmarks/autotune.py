"""The speculation tuner, as the benchmarks use it: it lives in the engine
(`mlx_redrafter.tuning`), and this module re-exports its names for the benchmark scripts and
for code written against `mlx_redrafter.benchmarks.autotune`.

The cache key's `tuner` version is `mlx_redrafter.tuning.cache.TUNER_VERSION` (patch it there).
"""

from mlx_redrafter.tuning.cache import cache_path, device_description, fingerprint
from mlx_redrafter.tuning.calibrate import (
    CALIBRATION_PROMPTS,
    calibration_answers,
    load_calibration_prompts,
)
from mlx_redrafter.tuning.choose import (
    CONFIRM_CANDIDATES,
    DEFAULT_LOOKUPS,
    DEFAULT_SHAPES,
    ShapeEstimate,
    auto_grid,
    autotune,
    best_shape,
    choose_shape,
    confirm_online,
    estimate_shapes,
    resolve_shape,
    resolve_speculation,
)
from mlx_redrafter.tuning.simulate import acceptance_by_shape

__all__ = [
    "CALIBRATION_PROMPTS",
    "CONFIRM_CANDIDATES",
    "DEFAULT_LOOKUPS",
    "DEFAULT_SHAPES",
    "ShapeEstimate",
    "acceptance_by_shape",
    "auto_grid",
    "autotune",
    "best_shape",
    "cache_path",
    "calibration_answers",
    "choose_shape",
    "confirm_online",
    "device_description",
    "estimate_shapes",
    "fingerprint",
    "load_calibration_prompts",
    "resolve_shape",
    "resolve_speculation",
]
