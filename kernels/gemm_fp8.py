"""FP8 GEMM in Triton: e4m3 x e4m3 with fp32 accumulation, row-wise scales, fused bias / activation.

``fp8_gemm_fwd(xq, x_scale, wq, w_scale, *, bias=None, activation=None, out_dtype=torch.bfloat16,
fast_accum=False)``: xq ``(M, K)`` float8_e4m3fn (any strides) with per-row x_scale ``(M,)`` fp32, wq
``(N, K)`` float8_e4m3fn (nn.Linear layout; K-contiguous, as Hopper's fp8 wgmma requires for both
operands, so this layout needs no transpose) with per-output-channel w_scale ``(N,)`` fp32, bias ``(N,)``
any float dtype; returns a new contiguous ``(M, N)`` tensor in out_dtype. Semantics are those of
:func:`~fastgen.kernels.quant_reference.fp8_gemm_reference` (re-exported here):

    out = act((xq @ wq.T in fp32) * w_scale[None, :] * x_scale[:, None] + bias)

The kernel is the scaled GEMM shared with :mod:`fastgen.kernels.gemm_int8`
(:func:`~fastgen.kernels._gemm_common.scaled_gemm_body` with e4m3 operands). fp8 tensor cores need
sm_89+ (Ada, Hopper); the dispatcher sends older GPUs to the reference. ``fast_accum=False`` (the
default) promotes the tensor core's partial sum into a true fp32 accumulator once per K step
(``max_num_imprecise_acc=BLOCK_K``, like ``torch._scaled_mm``'s ``use_fast_accum=False``);
``fast_accum=True`` keeps Triton's default (faster on Hopper, less precise at large K). See
:mod:`fastgen.kernels._gemm_common` for the accumulation, epilogue, tiling and activation codes.
Launch configs: the table ``gemm_fp8`` (:mod:`fastgen.kernels.launch_configs`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastgen.errors import UnsupportedError
from fastgen.kernels._gemm_common import (
    SCALED_GEMM_AUTOTUNE_CONFIGS,
    launch_scaled_gemm,
    plan_scaled_gemm,
    scaled_gemm_body,
)
from fastgen.kernels.launch import KernelLaunch, arch_capability
from fastgen.kernels.launch_configs import ConfigTable
from fastgen.kernels.quant_reference import fp8_gemm_reference

__all__ = ["AUTOTUNE_CONFIGS", "fp8_gemm_fwd", "fp8_gemm_reference", "plan_fp8_gemm"]


@triton.jit
def _fp8_gemm_kernel(
    # pointers
    X, W, XS, WS, BIAS, OUT,
    # sizes
    M, N, K,
    # strides: x (M, K), w (N, K), out (M, N)
    stride_xm, stride_xk, stride_wn, stride_wk, stride_om, stride_on,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, FAST_ACCUM: tl.constexpr,
):
    scaled_gemm_body(X, W, XS, WS, BIAS, OUT, M, N, K,
                     stride_xm, stride_xk, stride_wn, stride_wk, stride_om, stride_on,
                     BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, HAS_BIAS, ACTIVATION, IS_FP8=True, FAST_ACCUM=FAST_ACCUM)


# GPU autotuning candidates (never used under the interpreter or in tests; those that do not fit the GPU
# are dropped before timing).
AUTOTUNE_CONFIGS = SCALED_GEMM_AUTOTUNE_CONFIGS
CONFIGS = ConfigTable("gemm_fp8", AUTOTUNE_CONFIGS)


def plan_fp8_gemm(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor, *, arch: str,
             bias: torch.Tensor | None = None, activation: str | None = None,
             out_dtype: torch.dtype = torch.bfloat16, block_m: int | None = None, block_n: int | None = None,
             block_k: int | None = None, autotune: bool = False, config: dict[str, int] | None = None, fast_accum: bool = False,
             ) -> tuple[torch.Tensor, list[KernelLaunch]]:
    """``(out, launches)`` on ``arch`` (see :func:`~fastgen.kernels._gemm_common.plan_scaled_gemm`);
    refused below sm89 (no fp8 tensor cores, and Triton has no e4m3 there)."""
    if arch != "cpu" and arch_capability(arch) < (8, 9):
        raise UnsupportedError(f"the fp8 GEMM needs compute capability >= 8.9 (Ada, Hopper, Blackwell); got {arch}")
    return plan_scaled_gemm(_fp8_gemm_kernel, torch.float8_e4m3fn, CONFIGS, xq, x_scale, wq, w_scale, arch=arch, bias=bias,
                            activation=activation, out_dtype=out_dtype, block_m=block_m, block_n=block_n,
                            block_k=block_k, autotune=autotune, config=config, extra_meta={"FAST_ACCUM": bool(fast_accum)})


def fp8_gemm_fwd(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor, *,
             bias: torch.Tensor | None = None, activation: str | None = None,
             out_dtype: torch.dtype = torch.bfloat16, block_m: int | None = None, block_n: int | None = None,
             block_k: int | None = None, autotune: bool = False, fast_accum: bool = False) -> torch.Tensor:
    """Launch the kernel on the operands' device; returns a new contiguous ``(M, N)`` tensor in ``out_dtype``.

    ``block_*``: override the default tiles (powers of two >= 16). ``autotune``: on CUDA, time
    :data:`AUTOTUNE_CONFIGS` (those that fit the GPU) once per (M bucket, N, K, epilogue) and persist the
    fastest.
    ``fast_accum``: skip the per-K-step fp32 promotion on Hopper (see the module docstring).
    """
    return launch_scaled_gemm(_fp8_gemm_kernel, torch.float8_e4m3fn, CONFIGS, xq, x_scale, wq, w_scale, bias=bias, activation=activation,
                              out_dtype=out_dtype, block_m=block_m, block_n=block_n, block_k=block_k,
                              autotune=autotune, extra_meta={"FAST_ACCUM": bool(fast_accum)})
