"""W8A8 GEMM in Triton: int8 x int8 -> int32 accumulator, fused scale / bias / activation epilogue.

``int8_gemm_fwd(xq, x_scale, wq, w_scale, *, bias=None, activation=None, out_dtype=torch.float16)``:
xq ``(M, K)`` int8 (any strides), x_scale ``(M,)`` fp32, wq ``(N, K)`` int8 (nn.Linear layout, any
strides; K-contiguous is what Hopper's int8 tensor cores want), w_scale ``(N,)`` fp32, bias ``(N,)``
any float dtype; returns a new contiguous ``(M, N)`` tensor in out_dtype. Semantics are those of
:func:`fastgen.ops.quant.int8_gemm_reference` (re-exported here):

    out = act(float32(int32(xq @ wq.T)) * w_scale[None, :] * x_scale[:, None] + bias)

The int32 accumulator is exact (tl.dot with ``out_dtype=tl.int32``; K <= 131072 so it cannot
overflow); the epilogue runs in fp32 in the order written (the GPU may fuse the bias add into an FMA,
so the output matches the reference to fp32 rounding, not bit for bit).

Tiles: ``BLOCK_M x BLOCK_N`` outputs per program, ``BLOCK_K`` deep steps, programs ordered ``GROUP_M``
row tiles at a time for L2 reuse of W. Rows and columns beyond M / N are wrapped (``% M``) rather than
masked in the K loop, so only the K tail is masked there; the store is masked.
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
from fastgen.ops.quant import int8_gemm_reference

__all__ = ["AUTOTUNE_CONFIGS", "int8_gemm_fwd", "int8_gemm_reference"]


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
    pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    # Out-of-range rows/cols read a valid (wrapped) row instead of being masked; the store drops them.
    rows = ((pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M).to(tl.int64)
    cols = ((pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = X + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk  # (BLOCK_M, BLOCK_K)
    w_ptrs = W + cols[None, :] * stride_wn + offs_k[:, None] * stride_wk  # (BLOCK_K, BLOCK_N)

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        a = tl.load(x_ptrs, mask=k_ok[None, :], other=0)
        b = tl.load(w_ptrs, mask=k_ok[:, None], other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    scaled_epilogue(acc.to(tl.float32), XS, WS, BIAS, OUT, M, N, stride_om, stride_on, pid_m, pid_n,
                    BLOCK_M, BLOCK_N, HAS_BIAS, ACTIVATION)


def _default_config(m: int, n: int, k: int, device: torch.device) -> dict[str, int]:
    """Fixed tiles per architecture; small M gets short tiles so more programs run."""
    if interpreting():
        return {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4, "num_warps": 4, "num_stages": 1}
    major, _ = capability(device)
    bm = 64 if m <= 64 else 128
    if major >= 9:  # Hopper: 128-wide wgmma tiles, deep pipeline (4 x 32 KiB of shared memory)
        return {"BLOCK_M": bm, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 8 if bm == 128 else 4,
                "num_stages": 4}
    if major == 8:  # Ampere / Ada
        return {"BLOCK_M": bm, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 4, "num_stages": 4}
    return {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 4, "num_stages": 2}


# GPU autotuning candidates (never used under the interpreter or in tests).
AUTOTUNE_CONFIGS = [
    {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "num_warps": w, "num_stages": s}
    for bm, bn, bk, w, s in ((128, 128, 128, 8, 4), (128, 256, 128, 8, 3), (256, 128, 128, 8, 3),
                             (128, 128, 64, 4, 4), (64, 128, 128, 4, 4), (128, 64, 128, 4, 4),
                             (64, 64, 128, 4, 5), (128, 128, 256, 8, 3))
]
CONFIGS = ConfigTable("gemm_int8", AUTOTUNE_CONFIGS)


def int8_gemm_fwd(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor, *,
                  bias: torch.Tensor | None = None, activation: str | None = None,
                  out_dtype: torch.dtype = torch.float16, block_m: int | None = None, block_n: int | None = None,
                  block_k: int | None = None, autotune: bool = False) -> torch.Tensor:
    """Launch the W8A8 kernel; returns a new contiguous ``(M, N)`` tensor in ``out_dtype``.

    ``block_*``: override the default tiles (powers of two >= 16). ``autotune``: on CUDA, time
    :data:`AUTOTUNE_CONFIGS` once per (M bucket, N, K, epilogue) and persist the fastest.
    """
    check_scaled_gemm_launch(xq, x_scale, wq, w_scale, bias, activation, out_dtype, torch.int8)
    return launch_scaled_gemm(_int8_gemm_kernel, _default_config, CONFIGS, xq, x_scale, wq, w_scale, bias,
                              activation, out_dtype, block_m, block_n, block_k, autotune)
