"""Tuning the speculation settings ('auto') for this device, model and drafter.

Each module answers one question:

- `costs`     what a verification forward over N tokens and a beam search cost here;
- `simulate`  how many tokens a setting accepts per step along the LLM's own answers (offline);
- `calibrate` those answers, written by the engine, and the per-step overhead they measured;
- `choose`    the predicted tokens/s of each option, the online confirmation by the engine's
              decode loop, and `resolve_speculation`, which the front ends call;
- `cache`     the key a choice depends on and its JSON file;
- `batch_costs`  what one batched step costs: t(B, N) through the batch engine's verify seam,
              the batched beam search per (B, W, L);
- `batch_choose` the option per batch size (a table {B: (W, L, N)}) that `BatchGenerator`
              uses for 'auto' shapes.

The engine imports this package; the benchmarks report what it measures. Nothing here imports
the benchmarks.
"""

from .cache import TUNER_VERSION
from .choose import (
    CONFIRM_CANDIDATES,
    DEFAULT_LOOKUPS,
    DEFAULT_SHAPES,
    ShapeEstimate,
    auto_grid,
    autotune,
    best_shape,
    choose_shape,
    estimate_shapes,
    predicted_speedup,
    resolve_shape,
    resolve_speculation,
)

__all__ = [
    "CONFIRM_CANDIDATES",
    "DEFAULT_LOOKUPS",
    "DEFAULT_SHAPES",
    "TUNER_VERSION",
    "ShapeEstimate",
    "auto_grid",
    "autotune",
    "best_shape",
    "choose_shape",
    "estimate_shapes",
    "predicted_speedup",
    "resolve_shape",
    "resolve_speculation",
]
