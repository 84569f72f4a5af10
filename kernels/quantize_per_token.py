"""Per-token (per-row) symmetric quantization to int8 or fp8 e4m3, scales computed and applied in one launch.

``quantize_per_token_fwd(x, *, smooth=None, fp8=False)``: x ``(..., K)`` fp16/bf16/fp32 with any
strides (leading dims are collapsed to (batch, seq) strides when possible, else copied); returns
``(xq, scale)``: xq ``(..., K)`` int8 or float8_e4m3fn (contiguous), scale ``(...,)`` fp32. Semantics
are those of :func:`fastgen.kernels.quant_reference.quantize_per_token_reference` (re-exported here), bit for bit:

- ``x / smooth`` (optional SmoothQuant divisor), amax per row, ``scale = amax / qmax`` (1 if amax == 0),
  codes from ``x / scale``. Every division is ``tl.math.div_rn`` (IEEE round-to-nearest): Triton's
  plain fp32 ``/`` is ``div.full.f32`` on NVIDIA (2 ulp), which would break bit-exactness (and a
  multiply by ``1 / scale`` would round differently from the ONNX / reference ``x / scale``).
- int8: round half to even (``rint`` on the GPU; the 1.5 * 2**23 add/subtract trick under the
  interpreter, which has no libdevice), clamp to [-127, 127].
- fp8: clamp to +-448 and round to the e4m3 grid in fp32 (ulp = 2**(max(exponent, -6) - 3), round half
  to even), so the final cast is exact. The interpreter's own fp32 -> fp8 cast rounds half up and does
  not carry into the exponent, which would disagree with torch's RNE cast.

One program quantizes ``BLOCK_M`` rows. When the row fits one ``BLOCK_K`` tile (K <= 8192 by default)
the row is read once and kept in registers; otherwise the kernel reads it twice (amax, then codes),
the second read mostly from L2.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from fastgen.errors import InvalidArgumentError, UnsupportedError
from fastgen.kernels._gemm_common import check_block, config_key, m_bucket
from fastgen.kernels.device import check_launch_device
from fastgen.kernels.launch import KernelLaunch, arch_capability, compiled_misfit, launch_arch, run_launches
from fastgen.kernels.launch_configs import ConfigTable
from fastgen.kernels.quant_reference import quantize_per_token_reference

__all__ = ["plan_quantize_per_token", "quantize_per_token_fwd", "quantize_per_token_reference"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAGIC = 12582912.0  # 1.5 * 2**23: x + MAGIC rounds x to an integer (half to even) for |x| < 2**22
_MAX_SINGLE_K = 8192  # rows up to this many elements stay in registers (one read)


@triton.jit
def _rint(v, USE_LIBDEVICE: tl.constexpr):
    """Round half to even, fp32 (|v| < 2**22)."""
    if USE_LIBDEVICE:
        r = libdevice.rint(v)
    else:
        r = (v + 12582912.0) - 12582912.0
    return r


@triton.jit
def _codes(v, IS_FP8: tl.constexpr, USE_LIBDEVICE: tl.constexpr):
    """fp32 ``x / scale`` -> int8 codes or e4m3 values (see the module docstring)."""
    if IS_FP8:
        v = tl.minimum(tl.maximum(v, -448.0), 448.0)
        e = ((v.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127  # unbiased exponent (-127 for 0)
        e = tl.maximum(e, -6) - 3  # e4m3: 3 mantissa bits; below 2**-6 the spacing is fixed (subnormals)
        up = ((127 - e) << 23).to(tl.float32, bitcast=True)  # 2**-e, exact powers of two
        down = ((127 + e) << 23).to(tl.float32, bitcast=True)
        q = (_rint(v * up, USE_LIBDEVICE) * down).to(tl.float8e4nv)
    else:
        v = tl.minimum(tl.maximum(v, -127.0), 127.0)
        q = _rint(v, USE_LIBDEVICE).to(tl.int8)
    return q


@triton.jit
def _quantize_per_token_kernel(
    # pointers
    X, SMOOTH, XQ, SCALE,
    # sizes: ROWS = batch * seq rows of K elements
    ROWS, SEQ, K,
    # strides: x (batch, seq, k); xq (rows, k)
    stride_xb, stride_xs, stride_xk, stride_qm, stride_qk,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, SINGLE_PASS: tl.constexpr, HAS_SMOOTH: tl.constexpr,
    IS_FP8: tl.constexpr, USE_LIBDEVICE: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < ROWS
    r64 = rows.to(tl.int64)
    x_rows = X + (r64 // SEQ) * stride_xb + (r64 % SEQ) * stride_xs  # (BLOCK_M,) row pointers
    q_rows = XQ + r64 * stride_qm
    offs_k = tl.arange(0, BLOCK_K)
    if IS_FP8:
        qmax = tl.full([BLOCK_M], 448.0, tl.float32)
    else:
        qmax = tl.full([BLOCK_M], 127.0, tl.float32)

    if SINGLE_PASS:
        k_ok = offs_k < K
        ok = row_ok[:, None] & k_ok[None, :]
        x = tl.load(x_rows[:, None] + offs_k[None, :] * stride_xk, mask=ok, other=0.0).to(tl.float32)
        if HAS_SMOOTH:
            sm = tl.load(SMOOTH + offs_k, mask=k_ok, other=1.0)
            x = tl.math.div_rn(x, tl.broadcast_to(sm[None, :], [BLOCK_M, BLOCK_K]))
        amax = tl.max(tl.abs(x), axis=1)  # (BLOCK_M,)
        bad = tl.max(((x != x) | (tl.abs(x) == float("inf"))).to(tl.int32), axis=1) > 0  # NaN / inf in the row
        scale = tl.where(amax > 0.0, tl.math.div_rn(amax, qmax), 1.0)
        scale = tl.where(bad, float("nan"), scale)
        tl.store(SCALE + rows, scale, mask=row_ok)
        v = tl.math.div_rn(x, tl.broadcast_to(scale[:, None], [BLOCK_M, BLOCK_K]))
        v = tl.where(bad[:, None], 0.0, v)
        tl.store(q_rows[:, None] + offs_k[None, :] * stride_qk, _codes(v, IS_FP8, USE_LIBDEVICE), mask=ok)
    else:
        amax = tl.zeros([BLOCK_M], dtype=tl.float32)
        nonfinite = tl.zeros([BLOCK_M], dtype=tl.int32)
        for k0 in range(0, K, BLOCK_K):
            k_ok = (k0 + offs_k) < K
            ok = row_ok[:, None] & k_ok[None, :]
            x = tl.load(x_rows[:, None] + (k0 + offs_k)[None, :] * stride_xk, mask=ok, other=0.0).to(tl.float32)
            if HAS_SMOOTH:
                sm = tl.load(SMOOTH + k0 + offs_k, mask=k_ok, other=1.0)
                x = tl.math.div_rn(x, tl.broadcast_to(sm[None, :], [BLOCK_M, BLOCK_K]))
            amax = tl.maximum(amax, tl.max(tl.abs(x), axis=1))
            nonfinite = tl.maximum(nonfinite, tl.max(((x != x) | (tl.abs(x) == float("inf"))).to(tl.int32), axis=1))
        bad = nonfinite > 0
        scale = tl.where(amax > 0.0, tl.math.div_rn(amax, qmax), 1.0)
        scale = tl.where(bad, float("nan"), scale)
        tl.store(SCALE + rows, scale, mask=row_ok)
        for k0 in range(0, K, BLOCK_K):
            k_ok = (k0 + offs_k) < K
            ok = row_ok[:, None] & k_ok[None, :]
            x = tl.load(x_rows[:, None] + (k0 + offs_k)[None, :] * stride_xk, mask=ok, other=0.0).to(tl.float32)
            if HAS_SMOOTH:
                sm = tl.load(SMOOTH + k0 + offs_k, mask=k_ok, other=1.0)
                x = tl.math.div_rn(x, tl.broadcast_to(sm[None, :], [BLOCK_M, BLOCK_K]))
            v = tl.math.div_rn(x, tl.broadcast_to(scale[:, None], [BLOCK_M, BLOCK_K]))
            v = tl.where(bad[:, None], 0.0, v)
            tl.store(q_rows[:, None] + (k0 + offs_k)[None, :] * stride_qk, _codes(v, IS_FP8, USE_LIBDEVICE),
                     mask=ok)


def _as_3d(x: torch.Tensor) -> torch.Tensor:
    """(..., K) -> (batch, seq, K) without copying when the strides allow it."""
    if x.dim() == 1:
        return x[None, None]
    if x.dim() == 2:
        return x[None]
    if x.dim() == 3:
        return x
    try:
        return x.view(-1, x.shape[-2], x.shape[-1])  # collapses the dims before seq when they are uniform
    except RuntimeError:
        return x.reshape(-1, x.shape[-2], x.shape[-1])  # copy: strides not expressible as (batch, seq)


def _default_config(k: int, arch: str) -> dict[str, int]:
    block_k = min(triton.next_power_of_2(k), _MAX_SINGLE_K)
    if arch == "cpu":
        return {"BLOCK_M": max(2, min(16, 1024 // block_k)), "BLOCK_K": block_k, "num_warps": 4}
    # ~4K elements per program in flight: small K packs several rows, big K one row with more warps.
    block_m = max(2, min(64, 4096 // block_k))  # >= 2: no 1-long aranges
    # No per-architecture table: an elementwise pass (no MMA, no shared memory) whose blocks follow K; the
    # compile gate holds these to no spills on every target at K = 320 ... 14336.
    return {"BLOCK_M": block_m, "BLOCK_K": block_k, "num_warps": 4 if block_m * block_k <= 4096 else 8}


# GPU autotuning candidates (rows per program, row chunk, warps); never used under the interpreter or in tests.
AUTOTUNE_CONFIGS = [
    {"BLOCK_M": bm, "BLOCK_K": bk, "num_warps": w}
    for bm, bk, w in ((2, 1024, 4), (2, 2048, 4), (2, 4096, 8), (2, 8192, 8), (4, 1024, 4), (8, 512, 4),
                      (16, 256, 4), (32, 128, 4))
]
CONFIGS = ConfigTable("quantize_per_token", AUTOTUNE_CONFIGS)


def plan_quantize_per_token(x: torch.Tensor, *, arch: str, smooth: torch.Tensor | None = None, fp8: bool = False,
                            block_m: int | None = None, block_k: int | None = None, autotune: bool = False,
                            config: dict[str, int] | None = None,
                            ) -> tuple[tuple[torch.Tensor, torch.Tensor], list[KernelLaunch]]:
    """``((xq, scale), launches)`` on ``arch``: the outputs (new contiguous tensors) and their launch.

    ``block_m`` / ``block_k``: override the defaults (powers of two); a ``block_k`` smaller than K
    selects the two-read path (tests use it to cover that path at small K); ``config``: a whole config.
    ``autotune``: on CUDA, time :data:`AUTOTUNE_CONFIGS` once per (rows bucket, K, dtypes) and reuse
    the fastest.
    """
    if x.dtype not in _DTYPES:
        raise InvalidArgumentError("x.dtype", x.dtype, "float16, bfloat16, float32")
    if x.dim() < 1 or x.shape[-1] < 1:
        raise InvalidArgumentError("x.shape", tuple(x.shape), "(..., K) with K >= 1")
    k = x.shape[-1]
    if smooth is not None and (smooth.dtype != torch.float32 or tuple(smooth.shape) != (k,)):
        raise InvalidArgumentError("smooth", (smooth.dtype, tuple(smooth.shape)), f"float32 of shape ({k},)")
    check_block("block_m", block_m, 2)
    check_block("block_k", block_k)
    if fp8 and arch != "cpu" and arch_capability(arch) < (8, 9):
        raise UnsupportedError(f"fp8 e4m3 quantization needs compute capability >= 8.9; got {arch}")
    qdtype = torch.float8_e4m3fn if fp8 else torch.int8
    xq = torch.empty(x.shape, dtype=qdtype, device=x.device)
    scale = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    rows = scale.numel()
    if rows == 0:
        return (xq, scale), []
    x3 = _as_3d(x)
    smooth_arg = smooth.contiguous() if smooth is not None else scale  # never read without HAS_SMOOTH

    def plan(cfg: dict[str, int]) -> list[KernelLaunch]:
        grid = (triton.cdiv(rows, cfg["BLOCK_M"]),)
        args = (x3, smooth_arg, xq, scale, rows, x3.shape[1], k, x3.stride(0), x3.stride(1), x3.stride(2), k, 1)
        meta = dict(SINGLE_PASS=cfg["BLOCK_K"] >= k, HAS_SMOOTH=smooth is not None, IS_FP8=fp8,
                    USE_LIBDEVICE=arch != "cpu")
        return [KernelLaunch(_quantize_per_token_kernel, grid, args, {**meta, **cfg}, CONFIGS.kernel)]

    if config is not None:
        cfg = dict(config)
    else:
        key = config_key(m=m_bucket(rows), k=k, dtype=x.dtype, fp8=fp8, smooth=smooth is not None)
        cfg = CONFIGS.choose(key, arch, lambda c: run_launches(plan(c)), _default_config(k, arch),
                             autotune and block_m is None and block_k is None,
                             fits=lambda c: compiled_misfit(plan(c)))
    if block_m is not None:
        cfg["BLOCK_M"] = block_m
    if block_k is not None:
        cfg["BLOCK_K"] = block_k
    return (xq, scale), plan(cfg)


def quantize_per_token_fwd(x: torch.Tensor, *, smooth: torch.Tensor | None = None, fp8: bool = False,
                           block_m: int | None = None, block_k: int | None = None,
                           autotune: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the quantizer on x's device; returns ``(xq, scale)`` (arguments as :func:`plan_quantize_per_token`)."""
    check_launch_device("x", x)
    outs, launches = plan_quantize_per_token(x, arch=launch_arch(x.device), smooth=smooth, fp8=fp8,
                                             block_m=block_m, block_k=block_k, autotune=autotune)
    run_launches(launches)
    return outs
