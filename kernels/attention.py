"""Fused forward attention (flash-attention style, online softmax) in Triton.

``attention_fwd(q, k, v, *, mask=None, causal=False, scale=None)``: q ``(batch, seq_q, heads, head_dim)``,
k/v ``(batch, seq_k, heads, head_dim)``, any strides (all are passed to the kernel, nothing is made
contiguous); the output is a new contiguous tensor shaped like q. Semantics are those of
:func:`fastgen.kernels.attention_reference.attention_reference` (re-exported here; the CPU fallback
and test oracle):

- optional boolean key-padding ``mask`` ``(batch, seq_k)``, True = attend;
- ``causal``: query ``i`` sees key ``j <= i + seq_k - seq_q`` (aligned to the end like flash-attention;
  equal to SDPA's ``is_causal`` when ``seq_q == seq_k``); key blocks wholly above the diagonal are skipped;
- a row with no visible key outputs zeros (the running max stays -inf: we subtract 0 instead and
  divide by 1 instead of by the empty sum);
- ``scale`` defaults to ``1/sqrt(head_dim)``; it is folded with log2(e) so the kernel uses exp2.

Head dim: ``tl.arange`` needs power-of-two sizes, but padding 40/80/160 to 64/128/256 wastes 37.5%
of the dot-product work. The head dim is split into at most two power-of-two chunks: ``D0`` = the
largest power of two <= head_dim and ``D1`` = the next power of two >= the remainder (at least 16,
tl.dot's minimum), each with its own q tile and fp32 accumulator, the tail masked on load/store:
40 = 32 + 16 (8 masked; 48 columns computed instead of 64, -25%), 80 = 64 + 16 (-37.5% vs 128),
96 = 64 + 32 (-25%), 160 = 128 + 32 (-37.5% vs 256); 32/64/128/256 are one chunk.

Precision: scores, softmax statistics and accumulators in fp32; P is cast to the input dtype for P·V
on fp16/bf16 (as flash-attention does); fp32 inputs stay fp32 throughout (``input_precision="ieee"``).

Block sizes ``BLOCK_M`` (queries) x ``BLOCK_N`` (keys) come from :data:`CONFIGS` (per GPU architecture:
the user's autotune cache, then the shipped table, then a small default table by head dim and dtype);
``autotune=True`` times a few candidates once per shape bucket and persists the winner. Under the interpreter
(``TRITON_INTERPRET=1``) fixed small blocks are used and nothing is ever autotuned.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastgen.errors import InvalidArgumentError
from fastgen.kernels.attention_reference import attention_reference, check_attention_args
from fastgen.kernels.device import check_launch_device, interpreting
from fastgen.kernels.launch_configs import ConfigTable, pow2_bucket

__all__ = ["attention_fwd", "attention_reference", "head_dim_chunks"]

_LOG2E = 1.4426950408889634
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def softmax_step(s, m_i, l_i, offs_m, offs_n, n_ok, mask_row, stride_mn, SEQ_Q, SEQ_K,
                 HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr):
    """One key block of the online softmax, shared by the fp and int8 kernels.

    ``s``: (BLOCK_M, BLOCK_N) scores in log2 units. Masks out-of-range, padded (``mask_row``: this
    batch's key-padding row) and causal keys, then returns ``(p, alpha, m_i, l_i)``: the block's
    unnormalised probabilities, the rescale factor for the running accumulators, and the new running
    max and sum.
    """
    ok = n_ok[None, :] & (offs_m[:, None] >= 0)
    if HAS_MASK:
        kp = tl.load(mask_row + offs_n * stride_mn, mask=n_ok, other=0)
        ok = ok & (kp != 0)[None, :]
    if CAUSAL:
        ok = ok & (offs_n[None, :] <= offs_m[:, None] + (SEQ_K - SEQ_Q))
    s = tl.where(ok, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # Rows with nothing visible so far keep m = -inf; subtract 0 so exp2 gives 0, not NaN.
    m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_sub[:, None])
    alpha = tl.exp2(m_i - m_sub)
    l_i = l_i * alpha + tl.sum(p, 1)
    return p, alpha, m_new, l_i


@triton.jit
def _attn_fwd_kernel(
    # pointers
    Q, K, V, Out, MASK,
    # sizes
    H, SEQ_Q, SEQ_K, HEAD_DIM, qk_scale,
    # strides: q/k/v/o (batch, seq, heads, dim), mask (batch, seq_k)
    stride_qb, stride_qm, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_ob, stride_om, stride_oh, stride_od,
    stride_mb, stride_mn,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
    HAS_D1: tl.constexpr, HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, IS_FP32: tl.constexpr,
):
    start_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    q_base = Q + b * stride_qb + h * stride_qh
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    o_base = Out + b * stride_ob + h * stride_oh

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d0 = tl.arange(0, D0)
    m_ok = offs_m < SEQ_Q
    d0_ok = offs_d0 < HEAD_DIM

    # q tile(s) stay in registers for the whole key loop.
    q0 = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d0[None, :] * stride_qd,
                 mask=m_ok[:, None] & d0_ok[None, :], other=0.0)  # (BLOCK_M, D0)
    acc0 = tl.zeros([BLOCK_M, D0], dtype=tl.float32)
    if HAS_D1:
        offs_d1 = D0 + tl.arange(0, D1)
        d1_ok = offs_d1 < HEAD_DIM
        q1 = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d1[None, :] * stride_qd,
                     mask=m_ok[:, None] & d1_ok[None, :], other=0.0)  # (BLOCK_M, D1)
        acc1 = tl.zeros([BLOCK_M, D1], dtype=tl.float32)
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    # Causal (aligned to the end): query i sees keys j <= i + SEQ_K - SEQ_Q; skip blocks past that.
    hi = SEQ_K
    if CAUSAL:
        hi = tl.minimum(SEQ_K, (start_m + 1) * BLOCK_M + SEQ_K - SEQ_Q)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        n_ok = offs_n < SEQ_K
        kt0 = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d0[:, None] * stride_kd,
                      mask=n_ok[None, :] & d0_ok[:, None], other=0.0)  # (D0, BLOCK_N)
        if IS_FP32:
            qk = tl.dot(q0, kt0, input_precision="ieee")
        else:
            qk = tl.dot(q0, kt0)
        if HAS_D1:
            kt1 = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d1[:, None] * stride_kd,
                          mask=n_ok[None, :] & d1_ok[:, None], other=0.0)  # (D1, BLOCK_N)
            if IS_FP32:
                qk += tl.dot(q1, kt1, input_precision="ieee")
            else:
                qk += tl.dot(q1, kt1)
        p, alpha, m_i, l_i = softmax_step(qk * qk_scale, m_i, l_i, offs_m, offs_n, n_ok, MASK + b * stride_mb,
                                          stride_mn, SEQ_Q, SEQ_K, HAS_MASK, CAUSAL)

        v0 = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d0[None, :] * stride_vd,
                     mask=n_ok[:, None] & d0_ok[None, :], other=0.0)  # (BLOCK_N, D0)
        p_in = p.to(v0.dtype)
        acc0 = acc0 * alpha[:, None]
        if IS_FP32:
            acc0 += tl.dot(p_in, v0, input_precision="ieee")
        else:
            acc0 += tl.dot(p_in, v0)
        if HAS_D1:
            v1 = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d1[None, :] * stride_vd,
                         mask=n_ok[:, None] & d1_ok[None, :], other=0.0)  # (BLOCK_N, D1)
            acc1 = acc1 * alpha[:, None]
            if IS_FP32:
                acc1 += tl.dot(p_in, v1, input_precision="ieee")
            else:
                acc1 += tl.dot(p_in, v1)

    # Empty rows: acc is 0 and l is 0; divide by 1 so they come out as zeros.
    inv_l = 1.0 / tl.where(l_i == 0.0, 1.0, l_i)
    o0 = acc0 * inv_l[:, None]
    tl.store(o_base + offs_m[:, None] * stride_om + offs_d0[None, :] * stride_od,
             o0.to(Out.dtype.element_ty), mask=m_ok[:, None] & d0_ok[None, :])
    if HAS_D1:
        o1 = acc1 * inv_l[:, None]
        tl.store(o_base + offs_m[:, None] * stride_om + offs_d1[None, :] * stride_od,
                 o1.to(Out.dtype.element_ty), mask=m_ok[:, None] & d1_ok[None, :])


def head_dim_chunks(head_dim: int) -> tuple[int, int]:
    """``(D0, D1)``: power-of-two chunks covering head_dim (D1 = 0 when one chunk suffices)."""
    d0 = 1 << (head_dim.bit_length() - 1)  # largest power of two <= head_dim
    d0 = max(d0, 16)
    rem = head_dim - d0
    if rem <= 0:
        return d0, 0
    return d0, max(16, triton.next_power_of_2(rem))


def _default_config(head_dim: int, dtype: torch.dtype) -> dict[str, int]:
    """Fixed blocks: big enough to feed tensor cores, small enough for registers at this head dim."""
    if interpreting():
        # Interpreter: few, vectorised numpy steps; 32 also exercises partial blocks at seq 77/113.
        return {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}
    if dtype == torch.float32:
        return {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2}
    if head_dim <= 64:
        return {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}
    if head_dim <= 128:
        return {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3}
    return {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}


# GPU autotuning candidates (never timed under the interpreter or in tests).
AUTOTUNE_CONFIGS = [
    {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": s}
    for bm, bn, w, s in ((128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (64, 32, 4, 2))
]
CONFIGS = ConfigTable("attention", AUTOTUNE_CONFIGS)


def shape_key(seq_q: int, seq_k: int, head_dim: int, dtype: torch.dtype, masked: bool, causal: bool) -> str:
    """Key of the config tables: sequence lengths bucketed to powers of two."""
    return (f"d{head_dim}-{str(dtype).removeprefix('torch.')}-q{pow2_bucket(seq_q)}-k{pow2_bucket(seq_k)}"
            f"{'-mask' if masked else ''}{'-causal' if causal else ''}")


def _check(name: str, t: torch.Tensor) -> None:
    if t.dtype not in _DTYPES:
        raise InvalidArgumentError(f"{name}.dtype", t.dtype, "float16, bfloat16, float32")


def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: torch.Tensor | None = None,
                  causal: bool = False, scale: float | None = None, out: torch.Tensor | None = None,
                  block_m: int | None = None, block_n: int | None = None,
                  autotune: bool = False) -> torch.Tensor:
    """Launch the fused attention kernel; returns ``out`` (new contiguous tensor unless given).

    ``out``: optional preallocated output shaped like q (any strides), e.g. a poisoned buffer in tests.
    ``block_m``/``block_n``: override the default block table (powers of two >= 16).
    ``autotune``: on CUDA, time :data:`AUTOTUNE_CONFIGS` once per shape bucket and persist the fastest
    (see :mod:`fastgen.kernels.launch_configs`); without it, tuned/shipped configs are used when present, else
    the default table. Ignored under the interpreter.
    """
    check_attention_args(q, k, v, mask, scale)
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check(name, t)
    batch, seq_q, heads, head_dim = q.shape
    seq_k = k.shape[1]
    if not 16 <= head_dim <= 256:
        raise InvalidArgumentError("q.shape[-1] (head_dim)", head_dim, "16..256")
    check_launch_device("q", q)
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # contiguous
    elif out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
        raise InvalidArgumentError("out", (tuple(out.shape), out.dtype, str(out.device)),
                                   f"shape {tuple(q.shape)}, dtype {q.dtype}, device {q.device}")
    for name, blk in (("block_m", block_m), ("block_n", block_n)):
        if blk is not None and (blk < 16 or blk & (blk - 1)):
            raise InvalidArgumentError(name, blk, "a power of two >= 16")
    sm_scale = head_dim ** -0.5 if scale is None else float(scale)
    d0, d1 = head_dim_chunks(head_dim)
    if mask is not None:
        mask_arg, smb, smn = mask.view(torch.uint8), mask.stride(0), mask.stride(1)  # same bytes, int8 loads
    else:
        mask_arg, smb, smn = q, 0, 0  # never read (HAS_MASK=False)

    args = (q, k, v, out, mask_arg, heads, seq_q, seq_k, head_dim, sm_scale * _LOG2E,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(), smb, smn)
    meta = {"D0": d0, "D1": max(d1, 16), "HAS_D1": d1 > 0, "HAS_MASK": mask is not None,
            "CAUSAL": bool(causal), "IS_FP32": q.dtype == torch.float32}

    def launch(cfg: dict[str, int]) -> None:
        grid = (triton.cdiv(seq_q, cfg["BLOCK_M"]), batch * heads)
        _attn_fwd_kernel[grid](*args, **meta, **cfg)

    key = shape_key(seq_q, seq_k, head_dim, q.dtype, mask is not None, bool(causal))
    cfg = CONFIGS.choose(key, q.device, launch, _default_config(head_dim, q.dtype),
                         autotune and block_m is None and block_n is None)
    if block_m is not None:
        cfg["BLOCK_M"] = block_m
    if block_n is not None:
        cfg["BLOCK_N"] = block_n
    launch(cfg)
    return out
