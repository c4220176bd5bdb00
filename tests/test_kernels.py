"""Tree attention: the portable SDPA path, the kernel body, its Metal/CUDA sources, the seam.

Here (Linux CPU): the portable path against a float64 NumPy reference on random trees; the
kernel body run on the host (`benchmarks/kernel_host.py`: the same body, one OS thread per GPU
thread) against the same reference and inside the engine; the Metal and CUDA sources assembled
and checked for what each back-end needs; the CUDA variant compiled with nvcc inside the wrapper
`mx.fast.cuda_kernel` generates (`benchmarks/kernel_wrappers.py`). On a Metal or CUDA machine
the kernel itself runs against the reference and inside the engine (skipped elsewhere, with the
reason).
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess

import mlx.core as mx
import numpy as np
import pytest

from mlx_redrafter import generate_step
from mlx_redrafter.benchmarks import kernel_host, kernel_wrappers
from mlx_redrafter.benchmarks.kernel_reference import reference_attention
from mlx_redrafter.benchmarks.tiny import (
    VOCAB,
    OracleDrafter,
    engine_tokens,
    first_divergence_is_tie,
    make_model,
    reference_greedy,
)
from mlx_redrafter.kernels import (
    dense_tree_mask,
    gpu_backend,
    kernel_tree_attention,
    launch,
    resolve_attention,
    routable,
    route_attention,
    sdpa_tree_attention,
    seam,
    source,
    tree_attention,
    tree_parents,
)
from mlx_redrafter.tree import pack_tree, verification_mask

GPU = gpu_backend()
NEEDS_GPU = f"kernel not run: needs Metal/CUDA (MLX's default device is {mx.default_device()})"


def need_gpu() -> None:
    """Skip without a Metal/CUDA back-end; fail instead where CI says one must be there."""
    if GPU is None:
        if os.environ.get("MLX_REDRAFTER_REQUIRE_KERNEL"):
            pytest.fail(f"MLX_REDRAFTER_REQUIRE_KERNEL is set; {NEEDS_GPU}")
        pytest.skip(NEEDS_GPU)


# ---------------------------------------------------------------------------- references
def random_tree(rng, width: int, length: int):
    beams = rng.integers(3, 6, size=(width, length))  # small alphabet: shared prefixes
    beams[:, 0] = 4
    return pack_tree(beams)


def random_case(rng, batch, q_heads, kv_heads, head_dim, prefix, tree, dtype=np.float32):
    n = tree.size
    q = rng.standard_normal((batch, q_heads, n, head_dim)).astype(dtype)
    k = rng.standard_normal((batch, kv_heads, prefix + n, head_dim)).astype(dtype)
    v = rng.standard_normal((batch, kv_heads, prefix + n, head_dim)).astype(dtype)
    return q, k, v


def relative_error(got, ref) -> float:
    return float(np.abs(np.asarray(got, dtype=np.float64) - ref).max() / np.abs(ref).max())


CASES = [
    # batch, q_heads, kv_heads, head_dim, prefix, window, beams (W, L)
    (1, 4, 2, 64, 29, None, (5, 4)),
    (1, 6, 2, 128, 40, None, (4, 5)),  # group of 3
    (2, 4, 4, 64, 17, 5, (3, 3)),  # multi-head, window shorter than prefix + depth
    (1, 8, 2, 128, 1, 3, (6, 4)),  # window shorter than the tree's depth
    (1, 2, 1, 64, 0, None, (2, 2)),  # no prefix
]


# ---------------------------------------------------------------------------- portable path
@pytest.mark.parametrize("case", CASES)
def test_portable_path_matches_float64_reference(case):
    batch, qh, kvh, dim, prefix, window, (w, length) = case
    rng = np.random.default_rng(CASES.index(case))
    for _ in range(3):
        tree = random_tree(rng, w, length)
        q, k, v = random_case(rng, batch, qh, kvh, dim, prefix, tree)
        mask = verification_mask(tree.mask, tree.depths, prefix, window)
        ref = reference_attention(q, k, v, mask, dim**-0.5)
        parents = tree_parents(tree)
        got = sdpa_tree_attention(
            mx.array(q), mx.array(k), mx.array(v), parents, scale=dim**-0.5, window=window
        )
        assert relative_error(got, ref) < 1e-5
        auto = tree_attention(
            mx.array(q), mx.array(k), mx.array(v), parents, scale=dim**-0.5, window=window
        )
        assert relative_error(auto, ref) < (1e-5 if GPU is None else 1e-4)


@pytest.mark.parametrize("window", [None, 1, 2, 4, 9])
def test_parents_describe_the_packed_tree(window):
    rng = np.random.default_rng(window or 0)
    for width, length in [(1, 1), (1, 4), (4, 5), (8, 3)]:
        tree = random_tree(rng, width, length)
        parents = tree_parents(tree)
        assert parents[0] == -1 and (parents[1:] < np.arange(1, tree.size)).all()
        assert (tree.depths[1:] == tree.depths[parents[1:]] + 1).all()
        for cache_len in (0, 3, 11):
            np.testing.assert_array_equal(
                dense_tree_mask(parents, cache_len, window),
                verification_mask(tree.mask, tree.depths, cache_len, window),
            )


def test_attention_choice():
    assert resolve_attention("sdpa") == "sdpa"
    with pytest.raises(ValueError, match="unknown attention"):
        resolve_attention("flash")
    if GPU is None:
        assert resolve_attention("auto") == "sdpa"
        with pytest.raises(ValueError, match="needs MLX's Metal or CUDA back-end"):
            resolve_attention("kernel")
    else:
        assert resolve_attention("kernel") == "kernel"
        assert resolve_attention("auto") in ("kernel", "sdpa")


# ---------------------------------------------------------------------------- sources
def test_body_is_backend_neutral():
    body = source.BODY
    for name in ("__syncthreads", "threadIdx", "blockIdx", "__shared__", "threadgroup", "metal::"):
        assert name not in body, name
    assert not re.search(r"\binf\b", body)  # MLX's CUDA wrapper #defines `inf`
    # the body reads every input through strides (ensure_row_contiguous=False)
    for name in ("q_shape", "k_shape", "q_strides", "k_strides", "v_strides"):
        assert name in body


def test_metal_source_declares_its_thread_attributes():
    header, src = source.kernel_source("metal")
    assert src.startswith(source.METAL_INDICES) and src.endswith(source.BODY)
    # metal_kernel adds attributes only for names found in `source`
    attributes = kernel_wrappers.metal_signature_attributes(src)
    assert "uint3 thread_position_in_threadgroup [[thread_position_in_threadgroup]]" in attributes
    assert "uint3 threadgroup_position_in_grid [[threadgroup_position_in_grid]]" in attributes
    assert kernel_wrappers.metal_signature_attributes(header) == []
    assert "threadgroup_barrier(mem_flags::mem_threadgroup)" in header
    assert "#define TK_SHARED threadgroup" in header
    assert "metal::exp" in header
    tiling = source.DEFAULT_TILING
    for dim in (64, 128):
        assert tiling.shared_bytes(dim) <= source.SHARED_MEMORY_LIMIT["metal"]


def test_cuda_source_pieces():
    header, src = source.kernel_source("cuda")
    assert src.startswith(source.CUDA_INDICES) and src.endswith(source.BODY)
    for piece in ("threadIdx.x", "blockIdx.x", "blockIdx.y", "blockIdx.z"):
        assert piece in src
    for piece in ("__syncthreads()", "__shared__", "__half2float", "__bfloat162float"):
        assert piece in header
    assert "__device__" in header


def test_launch_plan():
    plan = source.plan_launch(1, 32, 8, 64, 8192 + 64, None)
    assert plan.threadgroup == (128, 1, 1)
    assert plan.grid == (128 * plan.row_blocks, 8, plan.splits)
    assert plan.row_blocks == 4 * 64 // 16
    # few groups over a long prefix: split the keys
    small = source.plan_launch(1, 32, 8, 8, 8192 + 8, None)
    assert small.splits > 1 and small.grid[2] == small.splits
    assert small.splits <= small.key_tiles
    # a window leaves only its last keys to read
    windowed = source.plan_launch(1, 4, 2, 8, 4096 + 8, 32)
    assert windowed.key_tiles == -(-(32 - 1 + 8) // 16)
    assert source.plan_launch(1, 4, 2, 8, 100, None, splits=1000).splits <= 7


# ---------------------------------------------------------------------------- nvcc
NVCC = shutil.which("nvcc")
DTYPES = ("float32", "float16", "bfloat16")


def test_cuda_variant_compiles_with_nvcc(tmp_path):
    """Every dtype x head dim compiles as `mx.fast.cuda_kernel` would wrap it (and split-K)."""
    if NVCC is None:
        pytest.skip("nvcc not found: the CUDA variant was not compile-checked")
    include = tmp_path / "include" / "mlx" / "backend" / "cuda" / "device"
    include.mkdir(parents=True)
    (include / "utils.cuh").write_text(kernel_wrappers.CUDA_UTILS_STUB)
    header, src = source.kernel_source("cuda")
    units = []
    configs = [(dtype, dim, False) for dtype in DTYPES for dim in (64, 128)]
    configs += [("float16", 128, True), ("bfloat16", 64, True)]  # split-K: float32 partials
    for dtype, dim, split in configs:
        out = "float32" if split else dtype
        units.append(
            kernel_wrappers.cuda_translation_unit(
                "redrafter_tree_attention",
                [(n, dtype, 4) for n in ("q", "k", "v")]
                + [("parents", "int32", 1), ("scale", "float32", 1), ("params", "int32", 1)],
                [("out", out), ("ml", "float32")],
                source.template_args(dtype, out, dim, source.DEFAULT_TILING, split),
                header,
                src,
                preamble=not units,
            )
        )
    cu = tmp_path / "tree_attention.cu"
    cu.write_text("\n".join(units))
    cmd = [NVCC, "-arch=sm_90", "-std=c++17", "-I", str(tmp_path / "include"), "-c", str(cu)]
    result = subprocess.run(
        cmd + ["-o", str(tmp_path / "tree_attention.o")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert len(re.findall(r"__global__ void custom_kernel_", cu.read_text())) == len(configs)


# ---------------------------------------------------------------------------- the body on the host
@pytest.fixture(scope="module")
def host_dir(tmp_path_factory):
    if kernel_host.compiler() is None:
        pytest.skip("no C++ compiler: the kernel body was not run on the host")
    return tmp_path_factory.mktemp("host-kernel")


def merge(out, ml, splits):
    if splits == 1:
        return out[0]
    return np.asarray(launch.merge_splits(mx.array(out), mx.array(ml)))


HOST_CASES = [
    # batch, q_heads, kv_heads, head_dim, prefix, window, beams, splits, dtype
    (1, 4, 2, 64, 37, None, (5, 4), None, "float32"),
    (2, 6, 2, 64, 300, None, (4, 4), None, "float32"),  # split-K chosen by the plan
    (1, 8, 2, 128, 150, 40, (6, 5), 3, "float32"),  # window + explicit splits
    (1, 4, 4, 128, 0, 2, (3, 4), None, "float32"),  # no prefix, window inside the tree
    (1, 4, 2, 64, 53, 7, (5, 5), None, "float16"),
]


@pytest.mark.parametrize("case", HOST_CASES)
def test_kernel_body_on_host_matches_reference(case, host_dir):
    batch, qh, kvh, dim, prefix, window, (w, length), splits, dtype = case
    rng = np.random.default_rng(len(HOST_CASES) + prefix)
    tree = random_tree(rng, w, length)
    n = tree.size
    np_dtype = np.float16 if dtype == "float16" else np.float32
    # queries as mlx-lm leaves them (a transposed view), keys as a slice of a larger buffer
    q = rng.standard_normal((batch, n, qh, dim)).astype(np_dtype).transpose(0, 2, 1, 3)
    k_buf = rng.standard_normal((batch, kvh, prefix + n + 9, dim)).astype(np_dtype)
    k = k_buf[:, :, : prefix + n]
    v = rng.standard_normal((batch, kvh, prefix + n, dim)).astype(np_dtype)
    out, ml, used = kernel_host.run_host(
        q, k, v, tree_parents(tree), scale=dim**-0.5, window=window, workdir=host_dir, splits=splits
    )
    if splits is not None:
        assert used == splits
    if case[4] == 300:
        assert used > 1
    mask = verification_mask(tree.mask, tree.depths, prefix, window)
    ref = reference_attention(q, k, v, mask, dim**-0.5)
    assert relative_error(merge(out, ml, used), ref) < (2e-3 if dtype == "float16" else 1e-5)


# ---------------------------------------------------------------------------- the seam
@functools.cache
def model_for(name):
    return make_model(name)


@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2", "qwen3", "gemma3_text"])
def test_every_architecture_is_routable(name):
    model = model_for(name)
    assert routable(model)
    module = seam.attention_modules(model)[0]
    original = module.scaled_dot_product_attention
    with pytest.raises(RuntimeError), route_attention(model):
        assert module.scaled_dot_product_attention is seam.tree_sdpa
        raise RuntimeError
    assert module.scaled_dot_product_attention is original


def run_engine(model, prompt, expected, attention, max_tokens=24, width=4, length=4):
    oracle = OracleDrafter(prompt + expected, len(prompt), VOCAB, seed=1)
    kw = dict(beam_width=width, beam_length=length, attention=attention)
    return engine_tokens(model, oracle, prompt, max_tokens, **kw)[0]


def assert_lossless(model, prompt, expected, got):
    ok, diff, gap = first_divergence_is_tie(model, prompt, expected[: len(got)], got)
    assert ok, f"differs from greedy decoding at {diff} (gap {gap:.2e}): {expected} vs {got}"


@pytest.mark.parametrize("name", ["llama", "gemma3_text"])
def test_greedy_sdpa_path_is_lossless(name):
    model = model_for(name)
    prompt = np.random.default_rng(3).integers(3, VOCAB, size=13).tolist()
    expected = reference_greedy(model, prompt, 24)
    got = run_engine(model, prompt, expected, "sdpa")
    assert_lossless(model, prompt, expected, got)
    assert model._redrafter_context.attention == "sdpa"


def test_kernel_on_cpu_is_a_clear_error():
    if GPU is not None:
        pytest.skip(f"this process has a {GPU} back-end")
    model = model_for("llama")
    with pytest.raises(ValueError, match="attention='kernel' needs MLX's Metal or CUDA"):
        generate_step(mx.array([5, 6, 7]), model, None, attention="kernel")


def test_cli_attention_flag(tiny_model_dir, capsys):
    from mlx_redrafter.generate import main

    args = ["--model", str(tiny_model_dir), "--prompt", "t5 t6", "--max-tokens", "6", "--verbose"]
    assert main(args + ["--attention", "sdpa"]) == 0
    assert "Attention: SDPA + dense tree mask" in capsys.readouterr().err
    if GPU is None:
        assert main(args + ["--attention", "kernel"]) == 2
        assert "needs MLX's Metal or CUDA back-end" in capsys.readouterr().err
    else:
        assert main(args + ["--attention", "kernel"]) == 0
        assert f"Attention: tree-attention kernel ({GPU})" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["llama", "gemma3_text"])
def test_engine_routes_verification_to_the_kernel(name, host_dir, monkeypatch):
    """The kernel path end to end, with the kernel body run on the host in place of the GPU."""
    calls = []

    def host_kernel(queries, keys, values, parents, *, scale, window=None, **_):
        out, ml, splits = kernel_host.run_host(
            np.array(queries),
            np.array(keys),
            np.array(values),
            np.array(parents),
            scale=scale,
            window=window,
            workdir=host_dir,
        )
        calls.append((queries.shape, keys.shape, window))
        return mx.array(merge(out, ml, splits)).astype(queries.dtype)

    monkeypatch.setattr(launch, "kernel_tree_attention", host_kernel)
    monkeypatch.setattr(launch, "gpu_backend", lambda: "cuda")
    monkeypatch.setattr("mlx_redrafter.kernels.gpu_backend", lambda: "cuda")
    model = model_for(name)
    prompt = np.random.default_rng(4).integers(3, VOCAB, size=9).tolist()
    expected = reference_greedy(model, prompt, 16)
    try:
        got = run_engine(model, prompt, expected, "kernel", max_tokens=16, width=3, length=3)
        assert model._redrafter_context.attention == "kernel"
    finally:
        model._redrafter_context.attention = "sdpa"
    assert_lossless(model, prompt, expected, got)
    assert calls, "verification attention never reached the kernel"
    assert all(q[2] > 1 for q, _, _ in calls)  # tree forwards only, not the prefill
    windows = {w for _, _, w in calls}
    assert windows == ({None, 6} if name == "gemma3_text" else {None})


# ---------------------------------------------------------------------------- on a GPU
KERNEL_TOLERANCE = {mx.float32: 1e-5, mx.float16: 1e-3, mx.bfloat16: 8e-3}


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
@pytest.mark.parametrize("case", CASES)
def test_kernel_matches_reference_on_gpu(case, dtype):
    need_gpu()
    batch, qh, kvh, dim, prefix, window, (w, length) = case
    rng = np.random.default_rng(7)
    for prefix_len, splits in [(prefix, None), (prefix + 700, None), (prefix + 700, 1)]:
        tree = random_tree(rng, w, length)
        q, k, v = random_case(rng, batch, qh, kvh, dim, prefix_len, tree)
        qx, kx, vx = (mx.array(x).astype(dtype) for x in (q, k, v))
        mask = verification_mask(tree.mask, tree.depths, prefix_len, window)
        ref = reference_attention(
            *(np.array(x.astype(mx.float32)) for x in (qx, kx, vx)), mask, dim**-0.5
        )
        got = kernel_tree_attention(
            qx, kx, vx, mx.array(tree_parents(tree)), scale=dim**-0.5, window=window, splits=splits
        )
        assert got.dtype == dtype and got.shape == q.shape
        assert relative_error(got.astype(mx.float32), ref) < KERNEL_TOLERANCE[dtype]


def test_kernel_reads_a_strided_cache_slice_on_gpu():
    need_gpu()
    rng = np.random.default_rng(8)
    tree = random_tree(rng, 4, 4)
    n, prefix = tree.size, 300
    buf = mx.array(rng.standard_normal((1, 2, 512, 64)).astype(np.float32))
    k, v = buf[:, :, : prefix + n], buf[:, :, 7 : 7 + prefix + n]
    q = mx.array(rng.standard_normal((1, n, 4, 64)).astype(np.float32)).transpose(0, 2, 1, 3)
    ref = reference_attention(
        np.array(q), np.array(k), np.array(v), dense_tree_mask(tree_parents(tree), prefix), 0.125
    )
    got = kernel_tree_attention(q, k, v, mx.array(tree_parents(tree)), scale=0.125)
    assert relative_error(got, ref) < 1e-5


@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2", "qwen3", "gemma3_text"])
def test_greedy_kernel_path_is_lossless_on_gpu(name):
    need_gpu()
    model = model_for(name)
    prompt = np.random.default_rng(5).integers(3, VOCAB, size=13).tolist()
    expected = reference_greedy(model, prompt, 24)
    try:
        got = run_engine(model, prompt, expected, "kernel")
    finally:
        model._redrafter_context.attention = "sdpa"
    assert_lossless(model, prompt, expected, got)


def test_benchmark_script_smoke(tmp_path, capsys):
    import json

    from mlx_redrafter.benchmarks import kernels as bench

    assert bench.main(["--smoke", "--out", str(tmp_path), "--parts", "correctness,timings"]) == 0
    results = json.loads((tmp_path / "kernels.json").read_text())
    assert "errors" not in results
    assert len(results["timings"]) == 4 and all(r["sdpa_ms"] > 0 for r in results["timings"])
    assert all(r["sdpa_err"] < 1e-2 for r in results["correctness"])
    if GPU is not None:
        assert all(r["ok"] for r in results["correctness"])
    assert "correctness: 6 cases, 0 failing" in capsys.readouterr().out
