"""Build and call the tree-attention kernel (`mx.fast.metal_kernel` / `mx.fast.cuda_kernel`)."""

from __future__ import annotations

import functools

import mlx.core as mx

from .source import (
    DEFAULT_TILING,
    INPUT_NAMES,
    MAX_HEAD_DIM,
    OUTPUT_NAMES,
    SHARED_MEMORY_LIMIT,
    Tiling,
    kernel_source,
    plan_launch,
    template_args,
)

KERNEL_DTYPES = (mx.float32, mx.float16, mx.bfloat16)


def gpu_backend() -> str | None:
    """'metal' or 'cuda' when the default device is a GPU that MLX can run custom kernels on."""
    if mx.default_device().type != mx.DeviceType.gpu:
        return None
    if mx.metal.is_available():
        return "metal"
    cuda = getattr(mx, "cuda", None)
    if cuda is not None and cuda.is_available():
        return "cuda"
    return None


def unsupported_reason(queries: mx.array, keys: mx.array, tiling: Tiling = DEFAULT_TILING):
    """Why the kernel cannot run these shapes (None when it can)."""
    backend = gpu_backend()
    if backend is None:
        return f"no Metal/CUDA back-end (default device {mx.default_device()})"
    if queries.ndim != 4 or keys.ndim != 4:
        return "queries and keys must be (B, heads, length, head_dim)"
    head_dim = queries.shape[-1]
    if head_dim > MAX_HEAD_DIM or keys.shape[-1] != head_dim:
        return f"head dim {head_dim} (the kernel takes up to {MAX_HEAD_DIM})"
    if queries.dtype not in KERNEL_DTYPES:
        return f"dtype {queries.dtype}"
    if queries.shape[1] % keys.shape[1]:
        return f"{queries.shape[1]} query heads over {keys.shape[1]} KV heads"
    if tiling.shared_bytes(head_dim) > SHARED_MEMORY_LIMIT[backend]:
        return f"tiling {tiling} needs {tiling.shared_bytes(head_dim)} bytes of shared memory"
    return None


@functools.cache
def _kernel(backend: str):
    header, source = kernel_source(backend)
    common = dict(
        name="redrafter_tree_attention",
        input_names=list(INPUT_NAMES),
        output_names=list(OUTPUT_NAMES),
        source=source,
        header=header,
        # The KV cache hands over a slice of a larger buffer: read it through its strides
        # instead of copying the whole prefix every layer.
        ensure_row_contiguous=False,
    )
    if backend == "metal":
        return mx.fast.metal_kernel(**common)
    return mx.fast.cuda_kernel(**common)


@functools.cache
def _scalars(scale: float, window: int, splits: int) -> tuple[mx.array, mx.array]:
    return mx.array([scale], dtype=mx.float32), mx.array([window, splits], dtype=mx.int32)


def kernel_tree_attention(
    queries: mx.array,
    keys: mx.array,
    values: mx.array,
    parents: mx.array,
    *,
    scale: float,
    window: int | None = None,
    tiling: Tiling = DEFAULT_TILING,
    splits: int | None = None,
) -> mx.array:
    """Tree attention on the GPU: (B, Hq, N, D) queries over (B, Hkv, S + N, D) keys/values.

    `parents` (N,) int32 describes the tree (see `source.py`); the result has the queries'
    shape and dtype.
    """
    backend = gpu_backend()
    reason = unsupported_reason(queries, keys, tiling)
    if reason is not None:
        raise ValueError(f"the tree-attention kernel cannot run here: {reason}")
    batch, q_heads, tree, head_dim = queries.shape
    kv_heads, n_keys = keys.shape[1], keys.shape[2]
    if n_keys < tree or parents.shape != (tree,):
        raise ValueError(
            f"{tree} tree queries need a ({tree},) parents array and at least {tree} keys "
            f"(got parents {parents.shape}, {n_keys} keys)"
        )
    dtype = queries.dtype
    keys, values = keys.astype(dtype), values.astype(dtype)
    plan = plan_launch(batch, q_heads, kv_heads, tree, n_keys, window, tiling, splits)
    split = plan.splits > 1
    out_dtype = mx.float32 if split else dtype
    scale_arr, params = _scalars(float(scale), int(window or 0), plan.splits)
    out, ml = _kernel(backend)(
        inputs=[queries, keys, values, parents.astype(mx.int32), scale_arr, params],
        template=template_args(dtype, out_dtype, head_dim, tiling, split),
        grid=plan.grid,
        threadgroup=plan.threadgroup,
        output_shapes=[
            (plan.splits, batch, q_heads, tree, head_dim),
            (plan.splits, batch, q_heads, tree, 2),
        ],
        output_dtypes=[out_dtype, mx.float32],
    )
    if not split:
        return out[0]
    return merge_splits(out, ml).astype(dtype)


def merge_splits(partial: mx.array, stats: mx.array) -> mx.array:
    """Merge split-K partials: (P, ..., D) unnormalised outputs and (P, ..., 2) (max, sum)."""
    row_max, row_sum = stats[..., 0], stats[..., 1]
    w = mx.exp(row_max - mx.max(row_max, axis=0, keepdims=True))
    num = mx.sum(partial * w[..., None], axis=0)
    den = mx.sum(row_sum * w, axis=0)
    return num / den[..., None]
