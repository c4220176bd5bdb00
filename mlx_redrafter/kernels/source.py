"""The tree-attention kernel: one body, a small prelude per back-end, and the launch geometry.

The body is plain C++ that compiles as Metal Shading Language (`mx.fast.metal_kernel`), as CUDA
C++ (`mx.fast.cuda_kernel`) and, for tests on a machine without a GPU, as host C++ run by one
OS thread per GPU thread (`mlx_redrafter.benchmarks.kernel_host`, which brings its own
preludes). What differs per back-end lives in two small preludes:

- the *header* (`mx.fast.*_kernel(header=...)`): the shared-memory qualifier, the barrier, float
  conversions of the element type, `exp`/`max`;
- the *index prelude*, prepended to the body as part of the kernel's `source`: thread and group
  indices. It must be in `source`, not in the header: `metal_kernel` adds a thread attribute
  (`[[thread_position_in_threadgroup]]`, ...) to the generated signature only for the names it
  finds in `source`.

Work decomposition (the grid is counted in threads, as both `mx.fast` kernels count it):

- a group of `THREADS` threads owns `ROWS` query rows that share one KV head: the G = Hq / Hkv
  query heads of that KV head times the N tree tokens, flattened head-major, cut into blocks of
  ROWS (so GQA reads each key tile once for all heads of its group);
- grid = (THREADS * ceil(G * N / ROWS), Hkv, B * P). P > 1 splits the key range into P
  contiguous chunks (split-K, for short trees over long prefixes); each chunk writes an
  unnormalised partial output and its (max, sum) statistics and `launch.py` merges them.

Per key tile of BLOCK_K keys (online softmax, accumulation in float32):
1. the group loads the tile's keys and values into shared memory (any strides: the KV cache
   hands over a slice of a larger buffer, which is not row-contiguous);
2. one thread per (row, key) pair applies the visibility test and computes the scaled score;
3. one thread per row folds the tile into its running max m and sum l (rescale by
   exp(m_old - m_new)) and turns scores into probabilities;
4. one thread per (row, dim) element rescales its accumulator and adds P @ V.

Visibility, from the compact tree description `parents` (N int32: packed index of each token's
parent, -1 for the root; parents precede children, as `tree.pack_tree` orders them):
- a prefix key at position j < S is visible to tree token i at depth d unless a sliding window
  W excludes it: (S + d) - j < W;
- a tree key t is visible to i iff t is i or an ancestor of i: walk i -> parent -> ... while the
  index is above t (parents have smaller indices); t is an ancestor iff the walk lands on t, and
  the number of steps is the depth difference the window is checked against.
No (N, S + N) mask exists anywhere; the walk is at most depth(i) steps and only runs for keys in
the last tile(s).
"""

from __future__ import annotations

from dataclasses import dataclass

# ---------------------------------------------------------------------------- the body
BODY = r"""
    // ---- redrafter tree attention: body shared by Metal, CUDA and the host emulator ----
    // Template constants: T (q/k/v element type), OT (output type), HEAD_DIM, ROWS, BLOCK_K,
    // THREADS, SPLIT. The prelude defines tk_tid, tk_gx, tk_gy, tk_gz.
    constexpr int TK_STRIDE = HEAD_DIM + 1;  // padded rows of the Q and K tiles
    constexpr int TK_ACC = (ROWS * HEAD_DIM + THREADS - 1) / THREADS;
    constexpr float TK_NEG = -1.0e30f;       // "no key yet" / masked score

    const int n_batch = q_shape[0];
    const int n_qheads = q_shape[1];
    const int n_tree = q_shape[2];
    const int n_kvheads = k_shape[1];
    const int n_keys = k_shape[2];
    const int n_prefix = n_keys - n_tree;
    const int group = n_qheads / n_kvheads;
    const int window = params[0];
    const int n_splits = params[1];
    const float qk_scale = scale[0];

    const int kv_head = tk_gy;
    const int batch = tk_gz / n_splits;
    const int split = tk_gz - batch * n_splits;

    TK_SHARED float q_tile[ROWS * TK_STRIDE];
    TK_SHARED float k_tile[BLOCK_K * TK_STRIDE];
    TK_SHARED float v_tile[BLOCK_K * HEAD_DIM];
    TK_SHARED float p_tile[ROWS * BLOCK_K];
    TK_SHARED float row_max[ROWS];
    TK_SHARED float row_sum[ROWS];
    TK_SHARED float row_scale[ROWS];
    TK_SHARED int row_token[ROWS];
    TK_SHARED int row_depth[ROWS];
    TK_SHARED int row_head[ROWS];

    // Rows of this group: (query head, tree token) pairs; -1 marks padding rows.
    for (int r = tk_tid; r < ROWS; r += THREADS) {
        const int pair = tk_gx * ROWS + r;
        int token = -1;
        int depth = 0;
        int head = 0;
        if (pair < group * n_tree) {
            token = pair % n_tree;
            head = kv_head * group + pair / n_tree;
            int a = parents[token];
            for (int it = 0; a >= 0 && it < n_tree; ++it) {
                ++depth;
                a = parents[a];
            }
        }
        row_token[r] = token;
        row_depth[r] = depth;
        row_head[r] = head;
        row_max[r] = TK_NEG;
        row_sum[r] = 0.0f;
        row_scale[r] = 1.0f;
    }
    TK_BARRIER();

    for (int e = tk_tid; e < ROWS * HEAD_DIM; e += THREADS) {
        const int r = e / HEAD_DIM;
        const int d = e - r * HEAD_DIM;
        const int token = row_token[r];
        float x = 0.0f;
        if (token >= 0) {
            const int64_t at = (int64_t)batch * q_strides[0] + (int64_t)row_head[r] * q_strides[1]
                + (int64_t)token * q_strides[2] + (int64_t)d * q_strides[3];
            x = tk_to_float(q[at]) * qk_scale;
        }
        q_tile[r * TK_STRIDE + d] = x;
    }

    // Keys before key_start are outside every row's window; the rest is cut into tiles and the
    // tiles into n_splits contiguous chunks.
    const int key_start = (window > 0 && n_prefix - window + 1 > 0) ? n_prefix - window + 1 : 0;
    const int n_tiles = (n_keys - key_start + BLOCK_K - 1) / BLOCK_K;
    const int per_split = (n_tiles + n_splits - 1) / n_splits;
    const int tile_begin = split * per_split;
    const int tile_end = (tile_begin + per_split < n_tiles) ? tile_begin + per_split : n_tiles;
    const int64_t k_base = (int64_t)batch * k_strides[0] + (int64_t)kv_head * k_strides[1];
    const int64_t v_base = (int64_t)batch * v_strides[0] + (int64_t)kv_head * v_strides[1];

    float acc[TK_ACC];
    for (int a = 0; a < TK_ACC; ++a) {
        acc[a] = 0.0f;
    }

    for (int tile = tile_begin; tile < tile_end; ++tile) {
        const int key0 = key_start + tile * BLOCK_K;
        TK_BARRIER();  // the previous tile is consumed (and the Q tile is written)

        // 1. keys and values of this tile
        for (int e = tk_tid; e < BLOCK_K * HEAD_DIM; e += THREADS) {
            const int j = e / HEAD_DIM;
            const int d = e - j * HEAD_DIM;
            const int key = key0 + j;
            float kx = 0.0f;
            float vx = 0.0f;
            if (key < n_keys) {
                const int64_t kd = (int64_t)key * k_strides[2] + (int64_t)d * k_strides[3];
                const int64_t vd = (int64_t)key * v_strides[2] + (int64_t)d * v_strides[3];
                kx = tk_to_float(k[k_base + kd]);
                vx = tk_to_float(v[v_base + vd]);
            }
            k_tile[j * TK_STRIDE + d] = kx;
            v_tile[j * HEAD_DIM + d] = vx;
        }
        TK_BARRIER();

        // 2. visibility and scores
        for (int e = tk_tid; e < ROWS * BLOCK_K; e += THREADS) {
            const int r = e / BLOCK_K;
            const int j = e - r * BLOCK_K;
            const int key = key0 + j;
            const int token = row_token[r];
            bool visible = false;
            if (token >= 0 && key < n_keys) {
                if (key < n_prefix) {
                    visible = window <= 0 || (n_prefix + row_depth[r] - key) < window;
                } else {
                    const int target = key - n_prefix;
                    int a = token;
                    int steps = 0;
                    for (int it = 0; a > target && it < n_tree; ++it) {
                        a = parents[a];
                        ++steps;
                    }
                    visible = (a == target) && (window <= 0 || steps < window);
                }
            }
            float s = TK_NEG;
            if (visible) {
                s = 0.0f;
                for (int d = 0; d < HEAD_DIM; ++d) {
                    s += q_tile[r * TK_STRIDE + d] * k_tile[j * TK_STRIDE + d];
                }
            }
            p_tile[r * BLOCK_K + j] = s;
        }
        TK_BARRIER();

        // 3. online softmax, one thread per row
        for (int r = tk_tid; r < ROWS; r += THREADS) {
            const float m_old = row_max[r];
            float m_new = m_old;
            for (int j = 0; j < BLOCK_K; ++j) {
                m_new = tk_fmax(m_new, p_tile[r * BLOCK_K + j]);
            }
            const float alpha = tk_exp(m_old - m_new);
            float total = 0.0f;
            for (int j = 0; j < BLOCK_K; ++j) {
                const float s = p_tile[r * BLOCK_K + j];
                const float p = (s > 0.5f * TK_NEG) ? tk_exp(s - m_new) : 0.0f;
                p_tile[r * BLOCK_K + j] = p;
                total += p;
            }
            row_max[r] = m_new;
            row_sum[r] = row_sum[r] * alpha + total;
            row_scale[r] = alpha;
        }
        TK_BARRIER();

        // 4. rescale and accumulate P @ V, one thread per (row, dim)
        for (int a = 0; a < TK_ACC; ++a) {
            const int e = tk_tid + a * THREADS;
            if (e < ROWS * HEAD_DIM) {
                const int r = e / HEAD_DIM;
                const int d = e - r * HEAD_DIM;
                float o = acc[a] * row_scale[r];
                for (int j = 0; j < BLOCK_K; ++j) {
                    o += p_tile[r * BLOCK_K + j] * v_tile[j * HEAD_DIM + d];
                }
                acc[a] = o;
            }
        }
    }
    TK_BARRIER();  // row statistics of the last tile (or of the set-up) are visible

    // Outputs are (n_splits, B, Hq, N, HEAD_DIM) and (n_splits, B, Hq, N, 2) = (max, sum).
    for (int a = 0; a < TK_ACC; ++a) {
        const int e = tk_tid + a * THREADS;
        if (e < ROWS * HEAD_DIM) {
            const int r = e / HEAD_DIM;
            const int d = e - r * HEAD_DIM;
            const int token = row_token[r];
            if (token >= 0) {
                const int64_t row = (((int64_t)split * n_batch + batch) * n_qheads + row_head[r])
                    * n_tree + token;
                const float value = SPLIT ? acc[a] : acc[a] / row_sum[r];
                out[row * HEAD_DIM + d] = tk_from_float<OT>(value);
            }
        }
    }
    for (int r = tk_tid; r < ROWS; r += THREADS) {
        const int token = row_token[r];
        if (token >= 0) {
            const int64_t row = (((int64_t)split * n_batch + batch) * n_qheads + row_head[r])
                * n_tree + token;
            ml[row * 2] = row_max[r];
            ml[row * 2 + 1] = row_sum[r];
        }
    }
"""

# ---------------------------------------------------------------------------- preludes
METAL_HEADER = r"""
// ---- redrafter tree attention: Metal prelude ----
#define TK_SHARED threadgroup
#define TK_BARRIER() threadgroup_barrier(mem_flags::mem_threadgroup)
template <typename U>
inline float tk_to_float(U x) {
    return static_cast<float>(x);
}
template <typename U>
inline U tk_from_float(float x) {
    return static_cast<U>(x);
}
inline float tk_exp(float x) {
    return metal::exp(x);
}
inline float tk_fmax(float a, float b) {
    return metal::fmax(a, b);
}
"""

# In `source`, so that metal_kernel declares these thread attributes in the signature.
METAL_INDICES = r"""
    const int tk_tid = static_cast<int>(thread_position_in_threadgroup.x);
    const int tk_gx = static_cast<int>(threadgroup_position_in_grid.x);
    const int tk_gy = static_cast<int>(threadgroup_position_in_grid.y);
    const int tk_gz = static_cast<int>(threadgroup_position_in_grid.z);
"""

CUDA_HEADER = r"""
// ---- redrafter tree attention: CUDA prelude ----
#define TK_SHARED __shared__
#define TK_BARRIER() __syncthreads()
__device__ __forceinline__ float tk_to_float(float x) {
    return x;
}
__device__ __forceinline__ float tk_to_float(__half x) {
    return __half2float(x);
}
__device__ __forceinline__ float tk_to_float(__nv_bfloat16 x) {
    return __bfloat162float(x);
}
template <typename U>
__device__ __forceinline__ U tk_from_float(float x);
template <>
__device__ __forceinline__ float tk_from_float<float>(float x) {
    return x;
}
template <>
__device__ __forceinline__ __half tk_from_float<__half>(float x) {
    return __float2half(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 tk_from_float<__nv_bfloat16>(float x) {
    return __float2bfloat16(x);
}
__device__ __forceinline__ float tk_exp(float x) {
    return expf(x);
}
__device__ __forceinline__ float tk_fmax(float a, float b) {
    return fmaxf(a, b);
}
"""

CUDA_INDICES = r"""
    const int tk_tid = static_cast<int>(threadIdx.x);
    const int tk_gx = static_cast<int>(blockIdx.x);
    const int tk_gy = static_cast<int>(blockIdx.y);
    const int tk_gz = static_cast<int>(blockIdx.z);
"""

PRELUDES = {
    "metal": (METAL_HEADER, METAL_INDICES),
    "cuda": (CUDA_HEADER, CUDA_INDICES),
}

INPUT_NAMES = ("q", "k", "v", "parents", "scale", "params")
OUTPUT_NAMES = ("out", "ml")


def kernel_source(backend: str) -> tuple[str, str]:
    """(header, source) for `mx.fast.metal_kernel` / `mx.fast.cuda_kernel`."""
    header, indices = PRELUDES[backend]
    return header, indices + BODY


# ---------------------------------------------------------------------------- geometry
MAX_HEAD_DIM = 128
SHARED_MEMORY_LIMIT = {"metal": 32 * 1024, "cuda": 48 * 1024}


@dataclass(frozen=True)
class Tiling:
    """Tile sizes (template constants) of one launch."""

    rows: int = 16  # query rows (head x tree token pairs) per group
    block_k: int = 16  # keys per tile
    threads: int = 128  # threads per group

    def shared_bytes(self, head_dim: int) -> int:
        floats = (
            self.rows * (head_dim + 1)
            + self.block_k * (head_dim + 1)
            + self.block_k * head_dim
            + self.rows * self.block_k
            + 3 * self.rows
        )
        return 4 * floats + 4 * 3 * self.rows


DEFAULT_TILING = Tiling()
# Split the keys until the launch has about this many groups (or chunks reach MIN_SPLIT_TILES).
TARGET_GROUPS = 256
MIN_SPLIT_TILES = 8


@dataclass(frozen=True)
class Launch:
    """Grid, group and outputs of one tree-attention launch (counted in threads)."""

    grid: tuple[int, int, int]
    threadgroup: tuple[int, int, int]
    splits: int
    row_blocks: int
    key_tiles: int


def plan_launch(
    batch: int,
    q_heads: int,
    kv_heads: int,
    tree: int,
    keys: int,
    window: int | None,
    tiling: Tiling = DEFAULT_TILING,
    splits: int | None = None,
) -> Launch:
    group = q_heads // kv_heads
    row_blocks = -(-group * tree // tiling.rows)
    prefix = keys - tree
    start = max(0, prefix - window + 1) if window else 0
    key_tiles = max(1, -(-(keys - start) // tiling.block_k))
    if splits is None:
        base = row_blocks * kv_heads * batch
        splits = 1
        if base < TARGET_GROUPS:
            splits = min(-(-TARGET_GROUPS // base), max(1, key_tiles // MIN_SPLIT_TILES))
    splits = max(1, min(int(splits), key_tiles))
    return Launch(
        grid=(tiling.threads * row_blocks, kv_heads, batch * splits),
        threadgroup=(tiling.threads, 1, 1),
        splits=splits,
        row_blocks=row_blocks,
        key_tiles=key_tiles,
    )


def template_args(dtype, out_dtype, head_dim: int, tiling: Tiling, split: bool) -> list[tuple]:
    """The template constants, in order, as (name, value).

    The element types are passed through as given: `mx.Dtype`s for `mx.fast` (`launch.py`),
    dtype names for the wrapper text the nvcc check compiles.
    """
    return [
        ("T", dtype),
        ("OT", out_dtype),
        ("HEAD_DIM", head_dim),
        ("ROWS", tiling.rows),
        ("BLOCK_K", tiling.block_k),
        ("THREADS", tiling.threads),
        ("SPLIT", split),
    ]
