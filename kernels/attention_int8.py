"""Quantized attention forward (SageAttention style) in Triton: int8 Q.K^T, fp16 or fp8 P.V.

``attention_int8_fwd(q, k, v, *, mask=None, causal=False, scale=None, pv=None)``: same layout and
semantics as :func:`fastgen.kernels.attention.attention_fwd` (q ``(batch, seq_q, heads, head_dim)``,
k/v ``(batch, seq_k, heads, head_dim)``, any strides, bool key-padding mask, causal aligned to the end,
empty rows -> zeros, scale default ``1/sqrt(head_dim)``). The arithmetic is that of
:func:`fastgen.kernels.attention_int8_reference.attention_int8_reference` (re-exported; the CPU
fallback and the test oracle), which documents the algorithm. Three launches:

1. ``_quant_int8_kernel`` for Q and for K: one pass per block of rows computes the block's amax and
   writes int8 values plus one fp32 scale, K smoothed on the fly (its fp32 mean over the sequence is
   one torch reduction beforehand: a block cannot know the mean of the whole sequence). Output: a
   zero-padded contiguous ``(batch*heads, seq_pad, DQK)`` int8 buffer, so the attention kernel loads
   whole aligned tiles without masks.
2. ``pv="fp8"`` only: ``_quant_v_fp8_kernel`` writes V as e4m3, per-channel scaled, *transposed*
   to ``(batch*heads, DV, seq_pad)``: Hopper's fp8 wgmma wants its B operand contiguous along K (the
   key axis). ``pv="fp16"`` reads V in place (any strides) and converts tiles in registers.
3. ``_attn_int8_fwd_kernel``: int8 ``tl.dot`` -> int32, dequantized by ``q_scale * k_scale`` (sm_scale
   and log2(e) are folded into Q's scale), fp32 online softmax with exp2, P.V accumulated in fp32.

Head dim: int8 (and fp8) ``tl.dot`` needs K >= 32 (Triton's ``min_dot_size`` for 8-bit operands; M, N
>= 16 on older Triton). Q.K^T contracts over the head dim, so its power-of-two chunks are at least 32:
40 -> 32+32 (64 columns, +60%: no better split exists with a minimum of 32), 80 -> 64+32 (96, +20%;
one 128 chunk would be +60%), 96 -> 64+32, 160 -> 128+32 (exact); int8 MMA runs at twice the fp16
rate, so even 40's 64 int8 columns cost less than the fp16 kernel's 48. P.V contracts over keys
(``BLOCK_N >= 32``) and the head dim is its N: chunks of at least 16 as in the fp16 kernel
(40 -> 32+16, 80 -> 64+16, 160 -> 128+32). Head dims 1..256 work (below 32 the int8 tile is padded).

Blocks: ``BLOCK_M`` x ``BLOCK_N`` are also the quantization blocks (one Q scale per tile row block,
one K scale per key tile), so a different block size gives slightly different numbers; the reference
takes the same ``block_m``/``block_n``. Under the interpreter fixed 32 x 32 blocks are used and
nothing is autotuned.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastgen.errors import InvalidArgumentError, UnsupportedError
from fastgen.kernels.attention import aligned8, round8, shape_key, softmax_step
from fastgen.kernels.attention_int8_reference import (
    DTYPES,
    LOG2E,
    attention_int8_reference,
    check_blocks,
    default_blocks,
    fp8_v_scales,
    int8_shape_class,
    k_mean,
    resolve_pv,
)
from fastgen.kernels.attention_reference import check_attention_args, head_dim_chunks
from fastgen.kernels.device import check_launch_device
from fastgen.kernels.launch import KernelLaunch, arch_capability, compiled_misfit, launch_arch, run_launches
from fastgen.kernels.launch_configs import ConfigTable, arch_default

__all__ = ["AUTOTUNE_CONFIGS", "attention_int8_fwd", "attention_int8_reference", "int8_head_dim_chunks",
           "plan_attention_int8", "quantize_int8", "quantize_v_fp8"]


@triton.jit
def _to_e4m3(x, EMULATE: tl.constexpr):
    """fp32 (|x| <= 448) -> float8 e4m3fn, round to nearest even.

    The GPU's conversion rounds correctly; the interpreter's does not (it rounds half up on one bit
    and loses the carry into the exponent), so under the interpreter the value is first rounded onto
    the e4m3 grid in fp32, which makes its conversion exact.
    """
    if EMULATE:
        bits = x.to(tl.int32, bitcast=True)
        # normal range (|x| >= 2^-6): keep 3 of fp32's 23 mantissa bits, ties to even
        rb = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576  # -1048576 = 0xFFF00000
        normal = rb.to(tl.float32, bitcast=True)
        # subnormals: multiples of 2^-9; 1.5 * 2^23 added and removed rounds to an integer, ties to even
        sub = ((x * 512.0 + 12582912.0) - 12582912.0) * 0.001953125
        x = tl.where(tl.abs(x) >= 0.015625, normal, sub)
    return x.to(tl.float8e4nv)


@triton.jit
def _quant_int8_kernel(
    # pointers: x (batch, seq, heads, dim); shift (batch*heads, dim) fp32; out (batch*heads, SEQ_PAD, DQK)
    # int8; scales (batch*heads, n_blocks) fp32
    X, SHIFT, XQ, XS,
    # sizes
    H, SEQ, SEQ_PAD, N_BLOCKS, mult,
    # strides of x
    stride_b, stride_n, stride_h, stride_d,
    # meta-parameters
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, DP: tl.constexpr, DQK: tl.constexpr, HAS_SHIFT: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    if ALIGNED:  # strides multiples of 8 elements (see attention._attn_fwd_kernel): 16-byte loads
        stride_b, stride_n, stride_h = round8(stride_b), round8(stride_n), round8(stride_h)
    blk = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_n = blk * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, DP)
    ok = (offs_n < SEQ)[:, None] & (offs_d < HEAD_DIM)[None, :]
    x = tl.load(X + b * stride_b + h * stride_h + offs_n[:, None] * stride_n + offs_d[None, :] * stride_d,
                mask=ok, other=0.0).to(tl.float32)  # (BLOCK, DP)
    if HAS_SHIFT:
        sh = tl.load(SHIFT + pid_bh * HEAD_DIM + offs_d, mask=offs_d < HEAD_DIM, other=0.0)
        x = tl.where(ok, x - sh[None, :], 0.0)  # padding rows must stay 0, not -mean
    amax = tl.max(tl.max(tl.abs(x), 1), 0)
    scale = tl.math.div_rn(amax, 127.0)
    inv = tl.where(amax > 0, tl.math.div_rn(127.0, tl.maximum(amax, 1e-30)), 0.0)
    t = x * inv
    t = t + tl.where(t >= 0, 0.5, -0.5)  # round half away from zero: the int8 cast truncates
    t = tl.minimum(tl.maximum(t, -127.0), 127.0)
    base = XQ + pid_bh.to(tl.int64) * SEQ_PAD * DQK
    tl.store(base + offs_n[:, None] * DQK + offs_d[None, :], t.to(tl.int8),
             mask=(offs_n < SEQ_PAD)[:, None] & (offs_d < DQK)[None, :])
    tl.store(XS + pid_bh * N_BLOCKS + blk, scale * mult)


@triton.jit
def _quant_v_fp8_kernel(
    # pointers: v (batch, seq, heads, dim); v_inv (batch*heads, dim) fp32; out (batch*heads, DV, SEQ_PAD) e4m3
    V, VINV, V8,
    # sizes
    H, SEQ, SEQ_PAD,
    # strides of v
    stride_b, stride_n, stride_h, stride_d,
    # meta-parameters
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, DP: tl.constexpr, DV: tl.constexpr, EMULATE: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    if ALIGNED:
        stride_b, stride_n, stride_h = round8(stride_b), round8(stride_n), round8(stride_h)
    blk = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_n = blk * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, DP)
    d_ok = offs_d < HEAD_DIM
    x = tl.load(V + b * stride_b + h * stride_h + offs_n[:, None] * stride_n + offs_d[None, :] * stride_d,
                mask=(offs_n < SEQ)[:, None] & d_ok[None, :], other=0.0).to(tl.float32)  # (BLOCK, DP)
    inv = tl.load(VINV + pid_bh * HEAD_DIM + offs_d, mask=d_ok, other=0.0)
    x = tl.minimum(tl.maximum(x * inv[None, :], -448.0), 448.0)
    base = V8 + pid_bh.to(tl.int64) * DV * SEQ_PAD
    tl.store(base + offs_d[None, :] * SEQ_PAD + offs_n[:, None], _to_e4m3(x, EMULATE),
             mask=(offs_n < SEQ_PAD)[:, None] & (offs_d < DV)[None, :])


@triton.jit
def _attn_int8_fwd_kernel(
    # pointers: q8/k8 (batch*heads, seq_pad, DQ0+DQ1) int8, their scales (batch*heads, n_blocks), v (any
    # (batch, seq, heads, dim) strides: the input or the fp8 copy), out, key-padding mask, fp8 o_mult
    Q8, K8, QS, KS, V, Out, MASK, OMULT,
    # sizes
    H, SEQ_Q, SEQ_K, SEQ_Q_PAD, SEQ_K_PAD,
    # strides: v/o (batch, seq, heads, dim), mask (batch, seq_k)
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_ob, stride_om, stride_oh, stride_od,
    stride_mb, stride_mn,
    # meta-parameters
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DQ0: tl.constexpr,
    DQ1: tl.constexpr, DV0: tl.constexpr, DV1: tl.constexpr, HAS_DV1: tl.constexpr, HAS_MASK: tl.constexpr,
    CAUSAL: tl.constexpr, PV_FP8: tl.constexpr, V_CLAMP: tl.constexpr, EMULATE: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    DQK: tl.constexpr = DQ0 + DQ1
    if ALIGNED:  # v (input or fp8 copy) and out strides multiples of 8 elements: 16-byte loads and stores
        stride_vb, stride_vn, stride_vh = round8(stride_vb), round8(stride_vn), round8(stride_vh)
        stride_ob, stride_om, stride_oh = round8(stride_ob), round8(stride_om), round8(stride_oh)
    start_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    q_base = Q8 + pid_bh.to(tl.int64) * SEQ_Q_PAD * DQK
    k_base = K8 + pid_bh.to(tl.int64) * SEQ_K_PAD * DQK
    v_base = V + b * stride_vb + h * stride_vh
    o_base = Out + b * stride_ob + h * stride_oh
    n_kblocks = SEQ_K_PAD // BLOCK_N

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    m_ok = offs_m < SEQ_Q
    offs_q0 = tl.arange(0, DQ0)
    # int8 q tiles: padded buffer, no masks; they stay in registers for the whole key loop.
    q0 = tl.load(q_base + offs_m[:, None] * DQK + offs_q0[None, :])  # (BLOCK_M, DQ0)
    if DQ1 > 0:
        offs_q1 = DQ0 + tl.arange(0, DQ1)
        q1 = tl.load(q_base + offs_m[:, None] * DQK + offs_q1[None, :])  # (BLOCK_M, DQ1)
    q_scale = tl.load(QS + pid_bh * (SEQ_Q_PAD // BLOCK_M) + start_m)

    offs_v0 = tl.arange(0, DV0)
    dv0_ok = offs_v0 < HEAD_DIM
    acc0 = tl.zeros([BLOCK_M, DV0], dtype=tl.float32)
    if HAS_DV1:
        offs_v1 = DV0 + tl.arange(0, DV1)
        dv1_ok = offs_v1 < HEAD_DIM
        acc1 = tl.zeros([BLOCK_M, DV1], dtype=tl.float32)
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    # Causal (aligned to the end): query i sees keys j <= i + SEQ_K - SEQ_Q; skip blocks past that.
    hi = SEQ_K
    if CAUSAL:
        hi = tl.minimum(SEQ_K, (start_m + 1) * BLOCK_M + SEQ_K - SEQ_Q)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        n_ok = offs_n < SEQ_K
        kt0 = tl.load(k_base + offs_n[None, :] * DQK + offs_q0[:, None])  # (DQ0, BLOCK_N) int8
        # int32, exact; out_dtype spelled out: Triton 3.6 asserts an int32 accumulator matches it
        qk = tl.dot(q0, kt0, out_dtype=tl.int32)
        if DQ1 > 0:
            kt1 = tl.load(k_base + offs_n[None, :] * DQK + offs_q1[:, None])  # (DQ1, BLOCK_N)
            qk = tl.dot(q1, kt1, qk, out_dtype=tl.int32)
        k_scale = tl.load(KS + pid_bh * n_kblocks + start_n // BLOCK_N)
        s = qk.to(tl.float32) * (q_scale * k_scale)  # (BLOCK_M, BLOCK_N), log2 units
        p, alpha, m_i, l_i = softmax_step(s, m_i, l_i, offs_m, offs_n, n_ok, MASK + b * stride_mb, stride_mn,
                                          SEQ_Q, SEQ_K, HAS_MASK, CAUSAL)
        if PV_FP8:
            p_in = _to_e4m3(p * 448.0, EMULATE)  # p <= 1: the row max maps to e4m3's largest value
        else:
            p_in = p.to(tl.float16)

        v0 = tl.load(v_base + offs_n[:, None] * stride_vn + offs_v0[None, :] * stride_vd,
                     mask=n_ok[:, None] & dv0_ok[None, :], other=0.0)  # (BLOCK_N, DV0)
        if V_CLAMP:  # bf16 / fp32 V: saturate into fp16's range instead of overflowing to inf
            v0 = tl.minimum(tl.maximum(v0.to(tl.float32), -65504.0), 65504.0)
        if not PV_FP8:
            v0 = v0.to(tl.float16)
        if PV_FP8:
            # Rescale outside the MMA: fed ``acc0 * alpha`` as its accumulator, Hopper's fp8 wgmma is
            # serialized by ptxas (C7515: non-wgmma instructions define its accumulator registers).
            acc0 = acc0 * alpha[:, None] + tl.dot(p_in, v0)
        else:
            acc0 = tl.dot(p_in, v0, acc0 * alpha[:, None])
        if HAS_DV1:
            v1 = tl.load(v_base + offs_n[:, None] * stride_vn + offs_v1[None, :] * stride_vd,
                         mask=n_ok[:, None] & dv1_ok[None, :], other=0.0)  # (BLOCK_N, DV1)
            if V_CLAMP:
                v1 = tl.minimum(tl.maximum(v1.to(tl.float32), -65504.0), 65504.0)
            if not PV_FP8:
                v1 = v1.to(tl.float16)
            if PV_FP8:
                acc1 = acc1 * alpha[:, None] + tl.dot(p_in, v1)
            else:
                acc1 = tl.dot(p_in, v1, acc1 * alpha[:, None])

    # Empty rows: acc is 0 and l is 0; divide by 1 so they come out as zeros.
    inv_l = 1.0 / tl.where(l_i == 0.0, 1.0, l_i)
    o0 = acc0 * inv_l[:, None]
    if PV_FP8:
        o0 = o0 * tl.load(OMULT + pid_bh * HEAD_DIM + offs_v0, mask=dv0_ok, other=0.0)[None, :]
    tl.store(o_base + offs_m[:, None] * stride_om + offs_v0[None, :] * stride_od,
             o0.to(Out.dtype.element_ty), mask=m_ok[:, None] & dv0_ok[None, :])
    if HAS_DV1:
        o1 = acc1 * inv_l[:, None]
        if PV_FP8:
            o1 = o1 * tl.load(OMULT + pid_bh * HEAD_DIM + offs_v1, mask=dv1_ok, other=0.0)[None, :]
        tl.store(o_base + offs_m[:, None] * stride_om + offs_v1[None, :] * stride_od,
                 o1.to(Out.dtype.element_ty), mask=m_ok[:, None] & dv1_ok[None, :])


def int8_head_dim_chunks(head_dim: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """``((DQ0, DQ1), (DV0, DV1))``: head-dim chunks of the int8 Q.K^T (>= 32) and of P.V (>= 16)."""
    return head_dim_chunks(head_dim, 32), head_dim_chunks(head_dim, 16)


def _default_config(head_dim: int, pv: str, arch: str) -> dict[str, int]:
    if arch == "cpu":
        # Interpreter: few, vectorised numpy steps; 32 also exercises partial blocks at seq 77/113.
        return {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}
    bm, bn = default_blocks(head_dim)
    warps = 8 if bm == 128 and head_dim > 64 else 4
    fallback = {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": warps, "num_stages": 3 if head_dim <= 128 else 2}
    return arch_default(CONFIGS.kernel, arch, int8_shape_class(head_dim, pv), fallback)


# GPU autotuning candidates (never used under the interpreter or in tests); those that spill or exceed the
# GPU's shared memory are dropped before timing. The blocks are also the quantization blocks, so the winner
# fixes the numerics for that shape (all within int8 error).
AUTOTUNE_CONFIGS = [
    {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": s}
    for bm, bn, w, s in ((128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (64, 32, 4, 3))
]
CONFIGS = ConfigTable("attention_int8", AUTOTUNE_CONFIGS)


def _plan_quant_int8(x: torch.Tensor, block: int, shift: torch.Tensor | None, mult: float, width: int,
                     arch: str) -> tuple[torch.Tensor, torch.Tensor, KernelLaunch]:
    batch, seq, heads, dim = x.shape
    nb = triton.cdiv(seq, block)
    xq = torch.empty((batch, heads, nb * block, width), dtype=torch.int8, device=x.device)
    xs = torch.empty((batch, heads, nb), dtype=torch.float32, device=x.device)
    launch = KernelLaunch(
        _quant_int8_kernel, (nb, batch * heads),
        (x, x if shift is None else shift, xq, xs, heads, seq, nb * block, nb, float(mult), *x.stride()),
        dict(HEAD_DIM=dim, BLOCK=block, DP=triton.next_power_of_2(max(dim, width)), DQK=width,
             HAS_SHIFT=shift is not None, ALIGNED=aligned8(x),
             enable_fp_fusion=False))  # no fma in x * inv + 0.5: the int8 codes stay bit-identical to the reference
    return xq, xs, launch


def _plan_quant_v_fp8(v: torch.Tensor, v_inv: torch.Tensor, block: int, width: int,
                      arch: str) -> tuple[torch.Tensor, KernelLaunch]:
    batch, seq, heads, dim = v.shape
    nb = triton.cdiv(seq, block)
    v8 = torch.empty((batch, heads, width, nb * block), dtype=torch.float8_e4m3fn, device=v.device)
    launch = KernelLaunch(
        _quant_v_fp8_kernel, (nb, batch * heads), (v, v_inv, v8, heads, seq, nb * block, *v.stride()),
        dict(HEAD_DIM=dim, BLOCK=block, DP=triton.next_power_of_2(max(dim, width)), DV=width,
             EMULATE=arch == "cpu", ALIGNED=aligned8(v), enable_fp_fusion=False))
    return v8, launch


def quantize_int8(x: torch.Tensor, block: int, *, shift: torch.Tensor | None = None, mult: float = 1.0,
                  width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of :func:`fastgen.kernels.attention_int8_reference.quantize_blocks` (same numbers).

    x ``(batch, seq, heads, dim)`` any strides -> int8 ``(batch, heads, seq_pad, width)`` zero-padded
    (``seq_pad`` a multiple of ``block``, ``width`` >= dim, default the Q.K^T chunk total) and fp32
    scales ``(batch, heads, seq_pad // block)``.
    """
    if width is None:
        width = sum(int8_head_dim_chunks(x.shape[-1])[0])
    xq, xs, launch = _plan_quant_int8(x, block, shift, mult, width, launch_arch(x.device))
    launch.run()
    return xq, xs


def quantize_v_fp8(v: torch.Tensor, v_inv: torch.Tensor, block: int, width: int) -> torch.Tensor:
    """V ``(batch, seq, heads, dim)`` -> e4m3 ``(batch, heads, width, seq_pad)`` of ``v * v_inv``, zero-padded."""
    v8, launch = _plan_quant_v_fp8(v, v_inv, block, width, launch_arch(v.device))
    launch.run()
    return v8


def plan_attention_int8(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, arch: str,
                        mask: torch.Tensor | None = None, causal: bool = False, scale: float | None = None,
                        out: torch.Tensor | None = None, block_m: int | None = None, block_n: int | None = None,
                        config: dict[str, int] | None = None, autotune: bool = False,
                        pv: str | None = None) -> tuple[torch.Tensor, list[KernelLaunch]]:
    """``(out, launches)`` on ``arch``: Q and K quantizers, V's fp8 quantizer (``pv="fp8"``), the attention.

    Like :func:`fastgen.kernels.attention.plan_attention`; ``k_mean`` and V's fp8 scales (torch
    reductions) are computed here, before anything is launched.
    """
    check_attention_args(q, k, v, mask, scale)
    if q.dtype not in DTYPES:
        raise InvalidArgumentError("q.dtype", q.dtype, "float16, bfloat16, float32")
    batch, seq_q, heads, head_dim = q.shape
    seq_k = k.shape[1]
    if not 1 <= head_dim <= 256:
        raise InvalidArgumentError("q.shape[-1] (head_dim)", head_dim, "1..256")
    if pv is None and arch != "cpu":
        pv = "fp8" if arch_capability(arch) >= (8, 9) else "fp16"  # fp8 tensor cores from Ada on
    pv = resolve_pv(pv, q.device)
    if pv == "fp8" and arch != "cpu" and arch_capability(arch) < (8, 9):
        raise UnsupportedError(f"attention backend 'triton-int8' does not support pv='fp8' on {arch} (compute "
                               "capability < 8.9: no fp8 tensor cores); use pv='fp16'")
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # contiguous
    elif out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
        raise InvalidArgumentError("out", (tuple(out.shape), out.dtype, str(out.device)),
                                   f"shape {tuple(q.shape)}, dtype {q.dtype}, device {q.device}")
    check_blocks(128 if block_m is None else block_m, 64 if block_n is None else block_n)
    sm_scale = head_dim ** -0.5 if scale is None else float(scale)
    (dq0, dq1), (dv0, dv1) = int8_head_dim_chunks(head_dim)
    km = k_mean(k)  # (batch, heads, head_dim) fp32: one reduction, shared with the reference
    if pv == "fp8":
        v_inv, o_mult = fp8_v_scales(v)
    if mask is not None:
        mask_arg, smb, smn = mask.view(torch.uint8), mask.stride(0), mask.stride(1)  # same bytes, int8 loads
    else:
        mask_arg, smb, smn = q, 0, 0  # never read (HAS_MASK=False)

    def plan(cfg: dict[str, int]) -> list[KernelLaunch]:
        bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
        q8, qs, q_launch = _plan_quant_int8(q, bm, None, sm_scale * LOG2E, dq0 + dq1, arch)
        k8, ks, k_launch = _plan_quant_int8(k, bn, km, 1.0, dq0 + dq1, arch)
        launches = [q_launch, k_launch]
        if pv == "fp8":
            v8, v_launch = _plan_quant_v_fp8(v, v_inv, bn, dv0 + dv1, arch)
            launches.append(v_launch)
            v_arg, om = v8.permute(0, 3, 1, 2), o_mult  # (b, seq_pad, h, DV) view
        else:
            v_arg, om = v, q  # om never read
        grid = (triton.cdiv(seq_q, bm), batch * heads)
        launches.append(KernelLaunch(
            _attn_int8_fwd_kernel, grid,
            (q8, k8, qs, ks, v_arg, out, mask_arg, om, heads, seq_q, seq_k, q8.shape[2], k8.shape[2],
             *v_arg.stride(), *out.stride(), smb, smn),
            dict(HEAD_DIM=head_dim, DQ0=dq0, DQ1=dq1, DV0=dv0, DV1=max(dv1, 16), HAS_DV1=dv1 > 0,
                 HAS_MASK=mask is not None, CAUSAL=bool(causal), PV_FP8=pv == "fp8",
                 V_CLAMP=pv == "fp16" and v.dtype != torch.float16, EMULATE=arch == "cpu",
                 ALIGNED=aligned8(v_arg, out), **cfg),
            CONFIGS.kernel))
        return launches

    if config is not None:
        cfg = dict(config)
    else:
        key = f"{shape_key(seq_q, seq_k, head_dim, q.dtype, mask is not None, bool(causal))}-pv{pv}"
        cfg = CONFIGS.choose(key, arch, lambda c: run_launches(plan(c)), _default_config(head_dim, pv, arch),
                             autotune and block_m is None and block_n is None,
                             fits=lambda c: compiled_misfit(plan(c)))
    if block_m is not None:
        cfg["BLOCK_M"] = block_m
    if block_n is not None:
        cfg["BLOCK_N"] = block_n
    return out, plan(cfg)


def attention_int8_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: torch.Tensor | None = None,
                       causal: bool = False, scale: float | None = None, out: torch.Tensor | None = None,
                       block_m: int | None = None, block_n: int | None = None, autotune: bool = False,
                       pv: str | None = None) -> torch.Tensor:
    """Quantize Q/K (and V for fp8), launch the attention kernel; returns ``out`` (new contiguous unless given).

    ``out``: optional preallocated output shaped like q (any strides). ``block_m``/``block_n``: powers
    of two, >= 16 / >= 32, overriding the default table (they are the quantization blocks too).
    ``autotune``: on CUDA, time :data:`AUTOTUNE_CONFIGS` (those that fit this GPU) once per shape bucket
    and persist the winner (:mod:`fastgen.kernels.launch_configs`); otherwise tuned or shipped configs are
    used when present, else the architecture's default table. ``pv``: ``"fp16"``, ``"fp8"`` or None (fp8
    on CUDA compute capability >= 8.9, else fp16).
    """
    check_launch_device("q", q)
    out, launches = plan_attention_int8(q, k, v, arch=launch_arch(q.device), mask=mask, causal=causal,
                                        scale=scale, out=out, block_m=block_m, block_n=block_n,
                                        autotune=autotune, pv=pv)
    run_launches(launches)
    return out
