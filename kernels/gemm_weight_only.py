"""Weight-only quantized GEMM in Triton: fp16/bf16/fp32 activations times int8 or packed int4 weights.

``weight_only_gemm_fwd(x, wq, w_scale, *, bits, group_size=None, bias=None)``: x ``(M, K)``
fp16/bf16/fp32 (any strides); bits 8: wq int8 ``(N, K)``; bits 4: wq uint8 ``(N, K // 2)`` holding two
int4 codes per byte (even k in the low nibble, two's complement); w_scale fp32 ``(N,)`` (per output
channel) or ``(N, K // group_size)`` (group-wise); bias ``(N,)`` any float dtype. Returns a new
contiguous ``(M, N)`` tensor in x's dtype. Semantics are those of
:func:`fastgen.kernels.quant_reference.weight_only_gemm_reference` (re-exported here): ``x @ dequant(wq).T + bias``.

The weights are never dequantized in memory: each ``(BLOCK_K, BLOCK_N)`` tile of codes is loaded,
(for int4) unpacked with a shift and a sign extension, converted to x's dtype (exact: |code| <= 128
fits fp16/bf16 mantissas) and fed to ``tl.dot`` with an fp32 accumulator. The scales are applied to
the fp32 partial sums rather than to the codes, so they cost no rounding: per channel once at the end,
per group once per K step (``BLOCK_K`` divides ``group_size``, so a K step never straddles two groups).
For int4, each byte is loaded by the two k rows it serves (the second load hits L1).

Meant for small M (text encoders, classifiers at small batch) where reading the weights dominates:
4x (int4) / 2x (int8) fewer weight bytes than fp16. There is no split-K, so with M <= 16 and small N
only ``N / BLOCK_N`` programs run.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastgen.errors import InvalidArgumentError
from fastgen.kernels._gemm_common import check_block, config_key, m_bucket, tile_ids
from fastgen.kernels.device import check_launch_device
from fastgen.kernels.launch import KernelLaunch, compiled_misfit, launch_arch, run_launches
from fastgen.kernels.launch_configs import ConfigTable, arch_default
from fastgen.kernels.quant_reference import GROUP_SIZES, weight_only_gemm_reference

__all__ = ["AUTOTUNE_CONFIGS", "plan_weight_only_gemm", "weight_only_gemm_fwd", "weight_only_gemm_reference"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _weight_only_gemm_kernel(
    # pointers
    X, W, S, BIAS, OUT,
    # sizes
    M, N, K,
    # strides: x (M, K), w (N, K) or packed (N, K // 2), scale (N, groups), out (M, N)
    stride_xm, stride_xk, stride_wn, stride_wk, stride_sn, stride_sg, stride_om, stride_on,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr, IS_FP32: tl.constexpr,
):
    pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    # Out-of-range rows/cols read a valid (wrapped) row instead of being masked; the store drops them.
    rows = ((pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M).to(tl.int64)
    cols = ((pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = X + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk  # (BLOCK_M, BLOCK_K)
    if BITS == 4:
        w_ptrs = W + cols[None, :] * stride_wn + (offs_k[:, None] // 2) * stride_wk  # (BLOCK_K, BLOCK_N) bytes
        shift = (offs_k[:, None] % 2) * 4  # even k: low nibble
    else:
        w_ptrs = W + cols[None, :] * stride_wn + offs_k[:, None] * stride_wk  # (BLOCK_K, BLOCK_N)

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        a = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
        if BITS == 4:
            byte = tl.load(w_ptrs, mask=k_ok[:, None], other=0).to(tl.int32)
            nib = (byte >> shift) & 0xF
            code = (nib ^ 8) - 8  # sign-extend the two's complement nibble
            w_ptrs += (BLOCK_K // 2) * stride_wk
        else:
            code = tl.load(w_ptrs, mask=k_ok[:, None], other=0)
            w_ptrs += BLOCK_K * stride_wk
        b = code.to(tl.float32).to(a.dtype)  # exact: |code| <= 128
        if IS_FP32:
            part = tl.dot(a, b, input_precision="ieee")
        else:
            part = tl.dot(a, b)
        if GROUP_SIZE > 0:
            s = tl.load(S + cols * stride_sn + (k0 // GROUP_SIZE) * stride_sg)  # (BLOCK_N,)
            acc += part * s[None, :]
        else:
            acc += part
        x_ptrs += BLOCK_K * stride_xk

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    if GROUP_SIZE == 0:
        acc = acc * tl.load(S + offs_n * stride_sn, mask=n_ok, other=0.0)[None, :]
    if HAS_BIAS:
        acc = acc + tl.load(BIAS + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out_ptrs = OUT + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, acc.to(OUT.dtype.element_ty), mask=(offs_m < M)[:, None] & n_ok[None, :])


def weight_only_shape_class(m: int, dtype: torch.dtype) -> str:
    """Launch-config class: fp16/bf16 activations by M's tile bucket, ``"f16-m16"`` (M <= 16), ``f16-m32``,
    ``f16-m64``, ``"f16-m128"`` (M > 64); fp32 activations (double the shared memory per tile, no tensor
    cores) ``"f32-m64"`` (M <= 64) and ``"f32-m128"``."""
    bm = 16 if m <= 16 else 32 if m <= 32 else 64 if m <= 64 else 128
    if dtype == torch.float32:
        return f"f32-m{64 if bm <= 64 else 128}"
    return f"f16-m{bm}"


def _default_config(m: int, n: int, k: int, group_size: int | None, dtype: torch.dtype,
                    arch: str) -> dict[str, int]:
    """Small-M tiles (the point of weight-only) from the architecture's default table; BLOCK_K is capped
    by the group size at launch."""
    if arch == "cpu":
        return {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": min(32, group_size or 128), "GROUP_M": 4,
                "num_warps": 4, "num_stages": 1}
    bm = 16 if m <= 16 else 32 if m <= 32 else 64 if m <= 64 else 128
    bn = 64 if m <= 64 else 128
    fallback = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": 64 if dtype == torch.float32 else 128, "GROUP_M": 8,
                "num_warps": 4 if bm * bn <= 64 * 128 else 8, "num_stages": 3}
    return arch_default(CONFIGS.kernel, arch, weight_only_shape_class(m, dtype), fallback)


# GPU autotuning candidates (never used under the interpreter or in tests); BLOCK_K is capped at the
# group size when one is set.
AUTOTUNE_CONFIGS = [
    {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "num_warps": w, "num_stages": s}
    for bm, bn, bk, w, s in ((16, 64, 128, 4, 4), (16, 128, 128, 4, 4), (16, 32, 128, 4, 4), (32, 64, 128, 4, 4),
                             (64, 64, 64, 4, 4), (64, 128, 64, 4, 3), (128, 128, 64, 8, 3), (16, 64, 64, 4, 5))
]
CONFIGS = ConfigTable("gemm_weight_only", AUTOTUNE_CONFIGS)


def plan_weight_only_gemm(x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor, *, arch: str, bits: int,
                          group_size: int | None = None, bias: torch.Tensor | None = None,
                          block_m: int | None = None, block_n: int | None = None, block_k: int | None = None,
                          autotune: bool = False, config: dict[str, int] | None = None,
                          ) -> tuple[torch.Tensor, list[KernelLaunch]]:
    """Check the arguments, allocate the ``(M, N)`` output (x's dtype) and plan the launch on ``arch``.

    ``block_*``: override the default tiles (powers of two >= 16; ``block_k`` must divide
    ``group_size``); ``config``: a whole config instead of the tables. ``autotune``: on CUDA, time
    :data:`AUTOTUNE_CONFIGS` (those that fit the GPU) once per shape bucket.
    """
    if x.dtype not in _DTYPES or x.dim() != 2:
        raise InvalidArgumentError("x", (x.dtype, tuple(x.shape)), "a 2-d float16/bfloat16/float32 tensor")
    if bits not in (8, 4):
        raise InvalidArgumentError("bits", bits, (8, 4))
    if group_size is not None and group_size not in GROUP_SIZES:
        raise InvalidArgumentError("group_size", group_size, (*GROUP_SIZES, None))
    if bits == 4 and group_size is None:
        raise InvalidArgumentError("group_size", None, GROUP_SIZES, reason="int4 needs a group size")
    m, k = x.shape
    wdtype, kw = (torch.uint8, k // 2) if bits == 4 else (torch.int8, k)
    if wq.dtype != wdtype or wq.dim() != 2 or wq.shape[1] != kw or (bits == 4 and k % 2):
        raise InvalidArgumentError("wq", (wq.dtype, tuple(wq.shape)), f"{wdtype} (N, {kw})")
    n = wq.shape[0]
    if group_size is not None and k % group_size:
        raise InvalidArgumentError("group_size", group_size, f"a divisor of K={k}")
    s_shape = (n,) if group_size is None else (n, k // group_size)
    if w_scale.dtype != torch.float32 or tuple(w_scale.shape) != s_shape:
        raise InvalidArgumentError("w_scale", (w_scale.dtype, tuple(w_scale.shape)), f"float32 {s_shape}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise InvalidArgumentError("bias.shape", tuple(bias.shape), f"({n},)")
    for name, blk in (("block_m", block_m), ("block_n", block_n), ("block_k", block_k)):
        check_block(name, blk)
    if block_k is not None and group_size is not None and group_size % block_k:
        raise InvalidArgumentError("block_k", block_k, f"a divisor of group_size={group_size}")
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out, []
    s2 = w_scale if w_scale.dim() == 2 else w_scale[:, None]
    bias_arg = bias.contiguous() if bias is not None else s2  # never read without HAS_BIAS
    args = (x, wq, s2, bias_arg, out, m, n, k, *x.stride(), *wq.stride(), *s2.stride(), *out.stride())
    meta = {"BITS": bits, "GROUP_SIZE": group_size or 0, "HAS_BIAS": bias is not None,
            "IS_FP32": x.dtype == torch.float32}

    def plan(cfg: dict[str, int]) -> list[KernelLaunch]:
        grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
        kernel_cfg = dict(cfg, BLOCK_K=min(cfg["BLOCK_K"], group_size or cfg["BLOCK_K"]))
        return [KernelLaunch(_weight_only_gemm_kernel, grid, args, {**meta, **kernel_cfg}, CONFIGS.kernel)]

    if config is not None:
        cfg = dict(config)
    else:
        key = config_key(m=m_bucket(m), n=n, k=k, bits=bits, group=group_size, dtype=x.dtype,
                         bias=bias is not None)
        cfg = CONFIGS.choose(key, arch, lambda c: run_launches(plan(c)),
                             _default_config(m, n, k, group_size, x.dtype, arch),
                             autotune and block_m is None and block_n is None and block_k is None,
                             fits=lambda c: compiled_misfit(plan(c)))
    for name, blk in (("BLOCK_M", block_m), ("BLOCK_N", block_n), ("BLOCK_K", block_k)):
        if blk is not None:
            cfg[name] = blk
    return out, plan(cfg)


def weight_only_gemm_fwd(x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor, *, bits: int,
                         group_size: int | None = None, bias: torch.Tensor | None = None,
                         block_m: int | None = None, block_n: int | None = None, block_k: int | None = None,
                         autotune: bool = False) -> torch.Tensor:
    """Launch the weight-only kernel on x's device; returns a new contiguous ``(M, N)`` tensor in x's dtype
    (arguments as :func:`plan_weight_only_gemm`)."""
    check_launch_device("x", x)
    out, launches = plan_weight_only_gemm(x, wq, w_scale, arch=launch_arch(x.device), bits=bits,
                                          group_size=group_size, bias=bias, block_m=block_m, block_n=block_n,
                                          block_k=block_k, autotune=autotune)
    run_launches(launches)
    return out
