"""mlx_redrafter: lossless ReDrafter speculative decoding for mlx-lm models."""

import warnings

from . import _blas  # noqa: F401  (must precede the first import of mlx.core)

# `python -m mlx_redrafter.generate` runs a module this package imports for its API; runpy's
# warning about that is harmless here (the module has no import-time side effects).
warnings.filterwarnings(
    "ignore", message=r".*'mlx_redrafter\.\w+' found in sys\.modules", category=RuntimeWarning
)
from .batch import BatchGenerator, BatchResponse, batch_generate  # noqa: E402
from .drafter import Drafter, DrafterConfig  # noqa: E402
from .generate import (  # noqa: E402
    GenerationResponse,
    StepStats,
    generate,
    generate_step,
    stream_generate,
)
from .models import load, make_prompt_cache  # noqa: E402

__all__ = [
    "BatchGenerator",
    "BatchResponse",
    "batch_generate",
    "Drafter",
    "DrafterConfig",
    "GenerationResponse",
    "StepStats",
    "generate",
    "generate_step",
    "load",
    "make_prompt_cache",
    "stream_generate",
]
__version__ = "0.1.0"
