"""What `mx.fast` wraps around the kernel source, reproduced so that it can be checked here.

`tests/test_kernels.py` compiles the CUDA variant with nvcc inside the text `mx.fast.cuda_kernel`
would generate, and checks that the Metal source names the thread attributes `metal_kernel`
adds to the signature. Nothing here runs in the engine.
"""

from __future__ import annotations

# What `mx.fast.cuda_kernel` generates around `source` (mlx 0.32, mlx/backend/cuda/
# custom_kernel.cpp, `build_kernel`), reproduced so that nvcc can compile the same text here.
# MLX compiles with NVRTC and includes its own "mlx/backend/cuda/device/utils.cuh"; the stub
# below declares only what a custom kernel's signature uses from it (Shape, Strides, MAX_NDIM,
# the fp16/bf16 headers), written for this project.
CUDA_TYPES = {
    "float32": "float",
    "float16": "__half",
    "bfloat16": "__nv_bfloat16",
    "int32": "int32_t",
}
CUDA_UTILS_STUB = r"""
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda/std/array>
#include <cuda/std/limits>
#include <cuda/std/tuple>
#define MAX_NDIM 10
#define WARP_SIZE 32
namespace mlx::core::cu {
using Shape = cuda::std::array<int32_t, MAX_NDIM>;
using Strides = cuda::std::array<int64_t, MAX_NDIM>;
}  // namespace mlx::core::cu
"""


def _kernel_name(name: str, targs) -> str:
    parts = []
    for _, value in targs:
        if isinstance(value, bool):
            parts.append("t" if value else "f")
        elif isinstance(value, int):
            parts.append(str(value))
        else:
            parts.append(CUDA_TYPES[value])
    return "custom_kernel_" + name + "".join("_" + p for p in parts)


def cuda_translation_unit(
    name: str,
    inputs: list[tuple[str, str, int]],
    outputs: list[tuple[str, str]],
    targs,
    header: str,
    source: str,
    utils_include: str = '#include "mlx/backend/cuda/device/utils.cuh"',
    preamble: bool = True,
) -> str:
    """The CUDA text `mx.fast.cuda_kernel` compiles: inputs are (name, dtype, ndim).

    With `preamble=False` only the kernel's namespace block (several kernels can then share
    one preamble in one file, to compile them with one nvcc run).
    """
    text = []
    if preamble:
        text += [
            utils_include,
            "",
            "#include <cooperative_groups.h>",
            "",
            "#define inf cuda::std::numeric_limits<float>::infinity()",
            "",
            header,
        ]
    text += [
        "namespace mlx::core::cu {\n",
        "namespace cg = cooperative_groups;\n",
        f"__global__ void {_kernel_name(name, targs)}(",
    ]
    params = []
    for arg, dtype, ndim in inputs:
        params.append(f"    const {CUDA_TYPES[dtype]}* {arg}")
        if ndim > 0:
            if f"{arg}_shape" in source:
                params.append(f"    const __grid_constant__ Shape {arg}_shape")
            if f"{arg}_strides" in source:
                params.append(f"    const __grid_constant__ Strides {arg}_strides")
            if f"{arg}_ndim" in source:
                params.append(f"    const __grid_constant__ int {arg}_ndim")
    for arg, dtype in outputs:
        params.append(f"    {CUDA_TYPES[dtype]}* {arg}")
    text.append(",\n".join(params) + ") {")
    for tname, value in targs:
        if isinstance(value, bool):
            text.append(f"  constexpr bool {tname} = {'true' if value else 'false'};")
        elif isinstance(value, int):
            text.append(f"  constexpr int {tname} = {value};")
        else:
            text.append(f"  using {tname} = {CUDA_TYPES[value]};")
    text.append("")
    text.append(source)
    text.append("}\n\n} // namespace mlx::core::cu\n")
    return "\n".join(text)


METAL_ATTRIBUTES = (
    ("dispatch_quadgroups_per_threadgroup", "uint"),
    ("dispatch_simdgroups_per_threadgroup", "uint"),
    ("dispatch_threads_per_threadgroup", "uint3"),
    ("grid_origin", "uint3"),
    ("grid_size", "uint3"),
    ("quadgroup_index_in_threadgroup", "uint"),
    ("quadgroups_per_threadgroup", "uint"),
    ("simdgroup_index_in_threadgroup", "uint"),
    ("simdgroups_per_threadgroup", "uint"),
    ("thread_execution_width", "uint"),
    ("thread_index_in_quadgroup", "uint"),
    ("thread_index_in_simdgroup", "uint"),
    ("thread_index_in_threadgroup", "uint"),
    ("thread_position_in_grid", "uint3"),
    ("thread_position_in_threadgroup", "uint3"),
    ("threadgroup_position_in_grid", "uint3"),
    ("threadgroups_per_grid", "uint3"),
    ("threads_per_grid", "uint3"),
    ("threads_per_simdgroup", "uint"),
    ("threads_per_threadgroup", "uint3"),
)


def metal_signature_attributes(source: str) -> list[str]:
    """The thread attributes `metal_kernel` adds to the signature: those named in `source`."""
    return [f"{t} {a} [[{a}]]" for a, t in METAL_ATTRIBUTES if a in source]
