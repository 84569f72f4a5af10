"""FP8 GEMM in Triton: e4m3 x e4m3 with fp32 accumulation, row-wise scales, fused bias / activation.

``fp8_gemm_fwd(xq, x_scale, wq, w_scale, *, bias=None, activation=None, out_dtype=torch.bfloat16)``:
xq ``(M, K)`` float8_e4m3fn (any strides) with per-row x_scale ``(M,)`` fp32, wq ``(N, K)``
float8_e4m3fn (nn.Linear layout; K-contiguous, as Hopper's fp8 wgmma requires for both operands, so
this layout needs no transpose) with per-output-channel w_scale ``(N,)`` fp32, bias ``(N,)`` any float
dtype; returns a new contiguous ``(M, N)`` tensor in out_dtype. Semantics are those of
:func:`fastgen.ops.quant.fp8_gemm_reference` (re-exported here):

    out = act((xq @ wq.T in fp32) * w_scale[None, :] * x_scale[:, None] + bias)

``tl.dot`` on ``float8e4nv`` operands maps to fp8 tensor cores on sm_89+ (Ada, Hopper); Triton has no
e4m3fn on older GPUs, so the dispatcher sends those to the reference. Products of two e4m3 values are
exact in fp32, so the kernel differs from the reference only in summation order and in the tensor
core's accumulation: Hopper's fp8 wgmma adds into an accumulator with fewer than fp32's mantissa bits,
and Triton's default on sm_90 never promotes it (``max_num_imprecise_acc`` = 2**30, "fast accumulation").
By default (``fast_accum=False``) we pass ``max_num_imprecise_acc=BLOCK_K``: the partial sum of each
K step is added into a true fp32 accumulator, the same trade as ``torch._scaled_mm``'s default
``use_fast_accum=False``. ``fast_accum=True`` keeps Triton's default (faster, less precise at large K).
Tiling and tile order are those of :mod:`fastgen.kernels.gemm_int8`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastgen.kernels._gemm_common import (
    capability,
    check_scaled_gemm_launch,
    interpreting,
    launch_scaled_gemm,
    scaled_epilogue,
    tile_ids,
)
from fastgen.kernels.tuning import ConfigTable
from fastgen.ops.quant import fp8_gemm_reference

__all__ = ["AUTOTUNE_CONFIGS", "fp8_gemm_fwd", "fp8_gemm_reference"]


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
    pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    # Out-of-range rows/cols read a valid (wrapped) row instead of being masked; the store drops them.
    rows = ((pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M).to(tl.int64)
    cols = ((pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = X + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk  # (BLOCK_M, BLOCK_K)
    w_ptrs = W + cols[None, :] * stride_wn + offs_k[:, None] * stride_wk  # (BLOCK_K, BLOCK_N)

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        a = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0)
        if FAST_ACCUM:
            acc = tl.dot(a, b, acc)
        else:  # promote the tensor core's partial sum into fp32 once per K step (see the docstring)
            acc = tl.dot(a, b, acc, max_num_imprecise_acc=BLOCK_K)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    scaled_epilogue(acc, XS, WS, BIAS, OUT, M, N, stride_om, stride_on, pid_m, pid_n,
                    BLOCK_M, BLOCK_N, HAS_BIAS, ACTIVATION)


def _default_config(m: int, n: int, k: int, device: torch.device) -> dict[str, int]:
    """Fixed tiles per architecture; small M gets short tiles so more programs run."""
    if interpreting():
        return {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4, "num_warps": 4, "num_stages": 1}
    major, _ = capability(device)
    bm = 64 if m <= 64 else 128
    if major >= 9:  # Hopper: 128 x 128 x 128 fp8 wgmma tiles, 4 stages of 32 KiB
        return {"BLOCK_M": bm, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 8 if bm == 128 else 4,
                "num_stages": 4}
    # Ada (sm_89): mma.sync fp8, less shared memory (100 KiB)
    return {"BLOCK_M": bm, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 4, "num_stages": 4}


# GPU autotuning candidates (never used under the interpreter or in tests).
AUTOTUNE_CONFIGS = [
    {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "num_warps": w, "num_stages": s}
    for bm, bn, bk, w, s in ((128, 128, 128, 8, 4), (128, 256, 128, 8, 3), (256, 128, 128, 8, 3),
                             (128, 128, 64, 4, 4), (64, 128, 128, 4, 4), (128, 64, 128, 4, 4),
                             (64, 64, 128, 4, 5), (128, 128, 256, 8, 3))
]
CONFIGS = ConfigTable("gemm_fp8", AUTOTUNE_CONFIGS)


def fp8_gemm_fwd(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor, *,
                 bias: torch.Tensor | None = None, activation: str | None = None,
                 out_dtype: torch.dtype = torch.bfloat16, block_m: int | None = None, block_n: int | None = None,
                 block_k: int | None = None, autotune: bool = False, fast_accum: bool = False) -> torch.Tensor:
    """Launch the fp8 kernel; returns a new contiguous ``(M, N)`` tensor in ``out_dtype``.

    ``block_*``: override the default tiles (powers of two >= 16). ``autotune``: on CUDA, time
    :data:`AUTOTUNE_CONFIGS` once per (M bucket, N, K, epilogue) and persist the fastest.
    ``fast_accum``: skip the per-K-step fp32 promotion on Hopper (see the module docstring).
    """
    check_scaled_gemm_launch(xq, x_scale, wq, w_scale, bias, activation, out_dtype, torch.float8_e4m3fn)
    return launch_scaled_gemm(_fp8_gemm_kernel, _default_config, CONFIGS, xq, x_scale, wq,
                              w_scale, bias, activation, out_dtype, block_m, block_n, block_k, autotune,
                              extra_meta={"FAST_ACCUM": bool(fast_accum)})
