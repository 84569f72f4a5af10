"""W8A8 GEMM in Triton: int8 x int8 -> exact int32 accumulator, fused scale / bias / activation epilogue.

``int8_gemm_fwd(xq, x_scale, wq, w_scale, *, bias=None, activation=None, out_dtype=torch.float16)``:
xq ``(M, K)`` int8 (any strides), x_scale ``(M,)`` fp32, wq ``(N, K)`` int8 (nn.Linear layout, any
strides), w_scale ``(N,)`` fp32, bias ``(N,)`` any float dtype; returns a new contiguous ``(M, N)``
tensor in out_dtype. Semantics are those of :func:`~fastgen.kernels.quant_reference.int8_gemm_reference`
(re-exported here):

    out = act(float32(int32(xq @ wq.T)) * w_scale[None, :] * x_scale[:, None] + bias)

The kernel is the scaled GEMM shared with :mod:`fastgen.kernels.gemm_fp8`
(:func:`~fastgen.kernels._gemm_common.scaled_gemm_body` with int8 operands; accumulator, epilogue,
tiling and activation codes are described in :mod:`fastgen.kernels._gemm_common`). Launch configs:
the table ``gemm_int8`` (:mod:`fastgen.kernels.launch_configs`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastgen.kernels._gemm_common import (
    SCALED_GEMM_AUTOTUNE_CONFIGS,
    launch_scaled_gemm,
    plan_scaled_gemm,
    scaled_gemm_body,
)
from fastgen.kernels.launch import KernelLaunch
from fastgen.kernels.launch_configs import ConfigTable
from fastgen.kernels.quant_reference import int8_gemm_reference

__all__ = ["AUTOTUNE_CONFIGS", "int8_gemm_fwd", "int8_gemm_reference", "plan_int8_gemm"]


@triton.jit
def _int8_gemm_kernel(
    # pointers
    X, W, XS, WS, BIAS, OUT,
    # sizes
    M, N, K,
    # strides: x (M, K), w (N, K), out (M, N)
    stride_xm, stride_xk, stride_wn, stride_wk, stride_om, stride_on,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr,
):
    scaled_gemm_body(X, W, XS, WS, BIAS, OUT, M, N, K,
                     stride_xm, stride_xk, stride_wn, stride_wk, stride_om, stride_on,
                     BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, HAS_BIAS, ACTIVATION, IS_FP8=False, FAST_ACCUM=False)


# GPU autotuning candidates (never used under the interpreter or in tests; those that do not fit the GPU
# are dropped before timing).
AUTOTUNE_CONFIGS = SCALED_GEMM_AUTOTUNE_CONFIGS
CONFIGS = ConfigTable("gemm_int8", AUTOTUNE_CONFIGS)


def plan_int8_gemm(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor, *, arch: str,
             bias: torch.Tensor | None = None, activation: str | None = None,
             out_dtype: torch.dtype = torch.float16, block_m: int | None = None, block_n: int | None = None,
             block_k: int | None = None, autotune: bool = False, config: dict[str, int] | None = None,
             ) -> tuple[torch.Tensor, list[KernelLaunch]]:
    """``(out, launches)`` on ``arch`` (see :func:`~fastgen.kernels._gemm_common.plan_scaled_gemm`)."""
    return plan_scaled_gemm(_int8_gemm_kernel, torch.int8, CONFIGS, xq, x_scale, wq, w_scale, arch=arch, bias=bias,
                            activation=activation, out_dtype=out_dtype, block_m=block_m, block_n=block_n,
                            block_k=block_k, autotune=autotune, config=config)


def int8_gemm_fwd(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor, *,
             bias: torch.Tensor | None = None, activation: str | None = None,
             out_dtype: torch.dtype = torch.float16, block_m: int | None = None, block_n: int | None = None,
             block_k: int | None = None, autotune: bool = False) -> torch.Tensor:
    """Launch the kernel on the operands' device; returns a new contiguous ``(M, N)`` tensor in ``out_dtype``.

    ``block_*``: override the default tiles (powers of two >= 16). ``autotune``: on CUDA, time
    :data:`AUTOTUNE_CONFIGS` (those that fit the GPU) once per (M bucket, N, K, epilogue) and persist the
    fastest.
    """
    return launch_scaled_gemm(_int8_gemm_kernel, torch.int8, CONFIGS, xq, x_scale, wq, w_scale, bias=bias, activation=activation,
                              out_dtype=out_dtype, block_m=block_m, block_n=block_n, block_k=block_k,
                              autotune=autotune)
