"""Load OpenBLAS before MLX on Linux.

The Linux `mlx[cpu]` wheel links a slow reference BLAS (figures in BENCHMARKS.md). Debian's
`libopenblas0-pthread` exports the same symbols; loaded globally before `mlx.core`, MLX's CPU
back-end resolves to it, an optimized BLAS for every matmul. This must run before the
first `import mlx.core` in the process, so `mlx_redrafter/__init__.py` imports it first.
Set MLX_REDRAFTER_NO_OPENBLAS=1 to opt out.
"""

from __future__ import annotations

import ctypes
import os
import sys

OPENBLAS_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
)

loaded_openblas: str | None = None


def preload_openblas() -> str | None:
    """Load OpenBLAS globally if this is Linux and it is installed; return its path."""
    global loaded_openblas
    if loaded_openblas is not None:
        return loaded_openblas
    if not sys.platform.startswith("linux") or os.environ.get("MLX_REDRAFTER_NO_OPENBLAS"):
        return None
    for path in OPENBLAS_CANDIDATES:
        if os.path.exists(path):
            try:
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            except OSError:
                continue
            loaded_openblas = path
            return path
    return None


def blas_description() -> str:
    """One line for --verbose output and benchmark records."""
    if loaded_openblas:
        late = " (loaded after mlx.core: not in effect)" if _mlx_was_first else ""
        return f"OpenBLAS {loaded_openblas}{late}"
    if sys.platform.startswith("linux"):
        return "bundled reference BLAS (slow; apt-get install libopenblas0-pthread)"
    return "platform BLAS"


_mlx_was_first = "mlx.core" in sys.modules
preload_openblas()
