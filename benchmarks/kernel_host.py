"""Run the kernel body on the CPU (tests): host C++, one OS thread per GPU thread.

The body in `mlx_redrafter/kernels/source.py` is compiled with the host prelude below into a
small program: the kernel becomes a function template (as `metal_kernel` declares it), groups
run one after another, the threads of a group run concurrently and meet at a `std::barrier`.
This checks the body's logic (tiling, split-K, online softmax, the ancestor walk, strides) on a
machine without a GPU; it says nothing about Metal or CUDA compilers, which
`tests/test_kernels.py` checks separately (nvcc) or leaves to a GPU machine.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import numpy as np

from mlx_redrafter.kernels.source import BODY, DEFAULT_TILING, Tiling, plan_launch

# The host prelude: one OS thread per GPU thread, a std::barrier per group, groups run one
# after another, so function-static arrays serve as the group's shared memory.
HOST_HEADER = r"""
// ---- redrafter tree attention: host-emulation prelude (tests) ----
#include <barrier>
#include <cmath>
#include <cstdint>
namespace tk_host {
inline thread_local int tid = 0, gx = 0, gy = 0, gz = 0;
inline std::barrier<>* group_barrier = nullptr;
}  // namespace tk_host
#define TK_SHARED static
#define TK_BARRIER() tk_host::group_barrier->arrive_and_wait()
inline float tk_to_float(float x) {
    return x;
}
inline float tk_to_float(_Float16 x) {
    return static_cast<float>(x);
}
template <typename U>
inline U tk_from_float(float x) {
    return static_cast<U>(x);
}
inline float tk_exp(float x) {
    return std::exp(x);
}
inline float tk_fmax(float a, float b) {
    return std::fmax(a, b);
}
"""

HOST_INDICES = r"""
    const int tk_tid = tk_host::tid;
    const int tk_gx = tk_host::gx;
    const int tk_gy = tk_host::gy;
    const int tk_gz = tk_host::gz;
"""

HOST_TYPES = {"float32": ("float", np.float32), "float16": ("_Float16", np.float16)}

_MAIN = r"""
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

template <typename X>
static std::vector<X> read_raw(const std::string& path, size_t count) {
    std::vector<X> data(count);
    std::ifstream f(path, std::ios::binary);
    f.read(reinterpret_cast<char*>(data.data()), count * sizeof(X));
    if (!f) { std::fprintf(stderr, "cannot read %s\n", path.c_str()); std::exit(2); }
    return data;
}

template <typename X>
static void write_raw(const std::string& path, const std::vector<X>& data) {
    std::ofstream f(path, std::ios::binary);
    f.write(reinterpret_cast<const char*>(data.data()), data.size() * sizeof(X));
}

int main(int argc, char** argv) {
    if (argc != 2) { std::fprintf(stderr, "usage: %s META\n", argv[0]); return 2; }
    std::ifstream meta(argv[1]);
    std::string dir;
    meta >> dir;
    int shapes[3][4];
    int64_t strides[3][4];
    size_t spans[3];
    for (int a = 0; a < 3; ++a) {
        for (int i = 0; i < 4; ++i) meta >> shapes[a][i];
        for (int i = 0; i < 4; ++i) meta >> strides[a][i];
        meta >> spans[a];
    }
    int n_parents, window, splits, gx, gy, gz;
    float scale;
    size_t out_count, ml_count;
    meta >> n_parents >> window >> splits >> scale >> gx >> gy >> gz >> out_count >> ml_count;
    if (!meta) { std::fprintf(stderr, "bad meta file\n"); return 2; }
    auto q = read_raw<ElemT>(dir + "/q.bin", spans[0]);
    auto k = read_raw<ElemT>(dir + "/k.bin", spans[1]);
    auto v = read_raw<ElemT>(dir + "/v.bin", spans[2]);
    auto parents = read_raw<int32_t>(dir + "/parents.bin", n_parents);
    std::vector<float> scale_arr{scale};
    std::vector<int32_t> params{window, splits};
    std::vector<OutT> out(out_count);
    std::vector<float> ml(ml_count);
    for (int z = 0; z < gz; ++z)
        for (int y = 0; y < gy; ++y)
            for (int x = 0; x < gx; ++x) {
                std::barrier<> group(THREADS_);
                tk_host::group_barrier = &group;
                std::vector<std::thread> threads;
                for (int t = 0; t < THREADS_; ++t) {
                    threads.emplace_back([&, t, x, y, z] {
                        tk_host::tid = t;
                        tk_host::gx = x;
                        tk_host::gy = y;
                        tk_host::gz = z;
                        KERNEL_CALL;
                    });
                }
                for (auto& th : threads) th.join();
            }
    write_raw(dir + "/out.bin", out);
    write_raw(dir + "/ml.bin", ml);
    return 0;
}
"""


def host_program(dtype: str, head_dim: int, tiling: Tiling, split: bool) -> str:
    """The whole host C++ program for one configuration."""
    ctype = HOST_TYPES[dtype][0]
    out_type = "float" if split else ctype
    source = HOST_INDICES + BODY
    params, args = [], []
    for name in ("q", "k", "v"):
        idx = "qkv".index(name)
        params.append(f"const T* {name}")
        args.append(f"{name}.data()")
        if f"{name}_shape" in source:
            params.append(f"const int* {name}_shape")
            args.append(f"shapes[{idx}]")
        if f"{name}_strides" in source:
            params.append(f"const int64_t* {name}_strides")
            args.append(f"strides[{idx}]")
    params += [
        "const int32_t* parents",
        "const float* scale",
        "const int32_t* params",
        "OT* out",
        "float* ml",
    ]
    args += ["parents.data()", "scale_arr.data()", "params.data()", "out.data()", "ml.data()"]
    targs = f"{ctype}, {out_type}, {head_dim}, {tiling.rows}, {tiling.block_k}, {tiling.threads}"
    targs += f", {'true' if split else 'false'}"
    kernel = (
        "template <typename T, typename OT, int HEAD_DIM, int ROWS, int BLOCK_K, int THREADS, "
        "bool SPLIT>\n"
        f"void tree_attention_host({', '.join(params)}) {{\n{source}\n}}\n"
    )
    main = (
        _MAIN.replace("ElemT", ctype)
        .replace("OutT", out_type)
        .replace("THREADS_", str(tiling.threads))
        .replace("KERNEL_CALL", f"tree_attention_host<{targs}>({', '.join(args)})")
    )
    return HOST_HEADER + kernel + main


def compiler() -> str | None:
    return shutil.which("g++") or shutil.which("clang++")


def build(dtype: str, head_dim: int, tiling: Tiling, split: bool, workdir: Path) -> Path:
    text = host_program(dtype, head_dim, tiling, split)
    key = hashlib.sha1(text.encode()).hexdigest()[:16]
    exe = workdir / f"tree_attention_{key}"
    if not exe.exists():
        cxx = compiler()
        if cxx is None:
            raise RuntimeError("no C++ compiler (g++ or clang++) found")
        src = workdir / f"tree_attention_{key}.cpp"
        src.write_text(text)
        cmd = [cxx, "-std=c++20", "-O1", "-pthread", str(src), "-o", str(exe)]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"host build failed:\n{result.stderr[-4000:]}")
    return exe


def _flat_span(a: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """The memory a (positively) strided view covers, as a flat array, and element strides."""
    item = a.itemsize
    if any(s < 0 for s in a.strides):
        raise ValueError("negative strides are not supported")
    span = sum((n - 1) * s for n, s in zip(a.shape, a.strides, strict=True)) // item + 1
    flat = np.lib.stride_tricks.as_strided(a, shape=(span,), strides=(item,))
    return np.ascontiguousarray(flat), [s // item for s in a.strides]


def run_host(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    parents: np.ndarray,
    *,
    scale: float,
    window: int | None,
    workdir: Path,
    tiling: Tiling = DEFAULT_TILING,
    splits: int | None = None,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Run the body on the host: (out (P, B, Hq, N, D), ml (P, B, Hq, N, 2), P).

    q, k, v are NumPy arrays of one dtype (float32 or float16), any positive strides.
    """
    dtype = str(q.dtype)
    batch, q_heads, tree, head_dim = q.shape
    kv_heads, n_keys = k.shape[1], k.shape[2]
    plan = plan_launch(batch, q_heads, kv_heads, tree, n_keys, window, tiling, splits)
    split = plan.splits > 1
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    exe = build(dtype, head_dim, tiling, split, workdir)
    run_dir = workdir / f"run_{exe.name}"
    run_dir.mkdir(exist_ok=True)
    lines = [str(run_dir)]
    for name, arr in (("q", q), ("k", k), ("v", v)):
        flat, strides = _flat_span(arr)
        flat.tofile(run_dir / f"{name}.bin")
        lines.append(" ".join(map(str, [*arr.shape, *strides, flat.shape[0]])))
    np.asarray(parents, dtype=np.int32).tofile(run_dir / "parents.bin")
    groups = (plan.grid[0] // tiling.threads, plan.grid[1], plan.grid[2])
    out_shape = (plan.splits, batch, q_heads, tree, head_dim)
    out_count = int(np.prod(out_shape))
    lines.append(
        " ".join(
            map(
                str,
                [tree, window or 0, plan.splits, repr(float(scale)), *groups]
                + [out_count, out_count // head_dim * 2],
            )
        )
    )
    meta = run_dir / "meta.txt"
    meta.write_text("\n".join(lines) + "\n")
    result = subprocess.run([str(exe), str(meta)], capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f"host run failed: {result.stderr[-2000:]}")
    out_np = np.float32 if split else HOST_TYPES[dtype][1]
    out = np.fromfile(run_dir / "out.bin", dtype=out_np).reshape(out_shape)
    ml = np.fromfile(run_dir / "ml.bin", dtype=np.float32).reshape(out_shape[:-1] + (2,))
    return out, ml, plan.splits
