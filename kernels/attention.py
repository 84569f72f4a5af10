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

from fastgen.errors import InvalidArgumentError, UnsupportedError
from fastgen.kernels.attention_reference import (
    attention_reference,
    attention_shape_class,
    check_attention_args,
    head_dim_chunks,
)
from fastgen.kernels.device import check_launch_device
from fastgen.kernels.launch import KernelLaunch, arch_capability, compiled_misfit, launch_arch, run_launches
from fastgen.kernels.launch_configs import ConfigTable, arch_default, has_fitting_config, pow2_bucket

__all__ = ["attention_fwd", "attention_reference", "head_dim_chunks", "plan_attention"]

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
def round8(x):
    """``x`` rounded down to a multiple of 8: the identity on the strides the launcher checked
    (``ALIGNED``), written so that Triton's alignment analysis sees the divisibility."""
    return (x // 8) * 8


@triton.jit
def _attn_fwd_kernel(
    # pointers
    Q, K, V, Out, MASK,
    # sizes
    H, SEQ_Q, SEQ_K, qk_scale,
    # strides: q/k/v/o (batch, seq, heads, dim), mask (batch, seq_k)
    stride_qb, stride_qm, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_ob, stride_om, stride_oh, stride_od,
    stride_mb, stride_mn,
    # meta-parameters
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
    HAS_D1: tl.constexpr, HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, IS_FP32: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    if ALIGNED:
        # The launcher checked that every batch/seq/head stride is a multiple of 8 elements (16 bytes at
        # fp16): say so, or at head dims 40/72 (strides not multiples of 16) Triton proves no alignment
        # and falls back to 16-bit loads without cp.async. (tl.multiple_of is dropped on a bare kernel
        # argument; rounding down to a multiple of 8, a no-op here, is what Triton can see.)
        stride_qb, stride_qm, stride_qh = round8(stride_qb), round8(stride_qm), round8(stride_qh)
        stride_kb, stride_kn, stride_kh = round8(stride_kb), round8(stride_kn), round8(stride_kh)
        stride_vb, stride_vn, stride_vh = round8(stride_vb), round8(stride_vn), round8(stride_vh)
        stride_ob, stride_om, stride_oh = round8(stride_ob), round8(stride_om), round8(stride_oh)
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


def _default_config(head_dim: int, dtype: torch.dtype, arch: str) -> dict[str, int]:
    """The default blocks on ``arch``: its default table's entry for this head-dim class (chosen there
    with the compiled kernel's static figures), else a heuristic: big enough to feed tensor cores,
    small enough for registers at this head dim."""
    if arch == "cpu":
        # Interpreter: few, vectorised numpy steps; 32 also exercises partial blocks at seq 77/113.
        return {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}
    if dtype == torch.float32:
        fallback = {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2}
    elif head_dim <= 64:
        fallback = {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}
    elif head_dim <= 128:
        fallback = {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3}
    else:
        fallback = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}
    return arch_default(CONFIGS.kernel, arch, attention_shape_class(head_dim, dtype), fallback)


# GPU autotuning candidates (never timed under the interpreter or in tests); before timing, the ones that
# spill or exceed the GPU's shared memory are dropped (ConfigTable.tune's ``fits``).
AUTOTUNE_CONFIGS = [
    {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": s}
    for bm, bn, w, s in ((128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (64, 32, 4, 2),
                         (128, 32, 8, 3), (64, 64, 4, 2))
]
CONFIGS = ConfigTable("attention", AUTOTUNE_CONFIGS)


def shape_key(seq_q: int, seq_k: int, head_dim: int, dtype: torch.dtype, masked: bool, causal: bool) -> str:
    """Key of the config tables: sequence lengths bucketed to powers of two."""
    return (f"d{head_dim}-{str(dtype).removeprefix('torch.')}-q{pow2_bucket(seq_q)}-k{pow2_bucket(seq_k)}"
            f"{'-mask' if masked else ''}{'-causal' if causal else ''}")


def aligned8(*tensors: torch.Tensor) -> bool:
    """Whether every tensor has a unit last stride, other strides multiples of 8 elements and a 16-byte
    aligned base: the kernel may then promise Triton 16-byte vector loads (``ALIGNED``)."""
    return all(t.stride(-1) == 1 and all(s % 8 == 0 for s in t.stride()[:-1]) and t.data_ptr() % 16 == 0
               for t in tensors)


def _check(name: str, t: torch.Tensor) -> None:
    if t.dtype not in _DTYPES:
        raise InvalidArgumentError(f"{name}.dtype", t.dtype, "float16, bfloat16, float32")


def plan_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, arch: str,
                   mask: torch.Tensor | None = None, causal: bool = False, scale: float | None = None,
                   out: torch.Tensor | None = None, block_m: int | None = None, block_n: int | None = None,
                   config: dict[str, int] | None = None, autotune: bool = False,
                   tma: bool | None = None) -> tuple[torch.Tensor, list[KernelLaunch]]:
    """``(out, launches)``: the attention launch on ``arch`` (see :mod:`fastgen.kernels.launch`), nothing run.

    ``config``: a whole launch config to use instead of the tables (the static report sweeps them).
    ``tma``: the tensor-descriptor kernel (:mod:`fastgen.kernels.attention_tma`): None (default) = on
    sm90+ wherever the layout allows it (fp16/bf16, 16-byte aligned strides) and a config fits, else the
    pointer kernel; True = that kernel or :class:`UnsupportedError` (also under the interpreter, for
    tests); False = the pointer kernel.
    """
    check_attention_args(q, k, v, mask, scale)
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check(name, t)
    batch, seq_q, heads, head_dim = q.shape
    seq_k = k.shape[1]
    if not 16 <= head_dim <= 256:
        raise InvalidArgumentError("q.shape[-1] (head_dim)", head_dim, "16..256")
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # contiguous
    elif out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
        raise InvalidArgumentError("out", (tuple(out.shape), out.dtype, str(out.device)),
                                   f"shape {tuple(q.shape)}, dtype {q.dtype}, device {q.device}")
    for name, blk in (("block_m", block_m), ("block_n", block_n)):
        if blk is not None and (blk < 16 or blk & (blk - 1)):
            raise InvalidArgumentError(name, blk, "a power of two >= 16")
    sm_scale = head_dim ** -0.5 if scale is None else float(scale)
    if tma is not False and block_m is None and block_n is None:
        launches = _plan_tma(q, k, v, out, mask, bool(causal), sm_scale, arch, autotune, config, tma is True)
        if launches is not None:
            return out, launches
    d0, d1 = head_dim_chunks(head_dim)
    if mask is not None:
        mask_arg, smb, smn = mask.view(torch.uint8), mask.stride(0), mask.stride(1)  # same bytes, int8 loads
    else:
        mask_arg, smb, smn = q, 0, 0  # never read (HAS_MASK=False)

    args = (q, k, v, out, mask_arg, heads, seq_q, seq_k, sm_scale * _LOG2E,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(), smb, smn)
    meta = {"HEAD_DIM": head_dim, "D0": d0, "D1": max(d1, 16), "HAS_D1": d1 > 0, "HAS_MASK": mask is not None,
            "CAUSAL": bool(causal), "IS_FP32": q.dtype == torch.float32, "ALIGNED": aligned8(q, k, v, out)}

    def plan(cfg: dict[str, int]) -> list[KernelLaunch]:
        grid = (triton.cdiv(seq_q, cfg["BLOCK_M"]), batch * heads)
        return [KernelLaunch(_attn_fwd_kernel, grid, args, {**meta, **cfg}, CONFIGS.kernel)]

    if config is not None:
        cfg = dict(config)
    else:
        key = shape_key(seq_q, seq_k, head_dim, q.dtype, mask is not None, bool(causal))
        tune = autotune and block_m is None and block_n is None
        cfg = CONFIGS.choose(key, arch, lambda c: run_launches(plan(c)),
                             _default_config(head_dim, q.dtype, arch), tune, fits=lambda c: compiled_misfit(plan(c)))
    if block_m is not None:
        cfg["BLOCK_M"] = block_m
    if block_n is not None:
        cfg["BLOCK_N"] = block_n
    return out, plan(cfg)


def _plan_tma(q, k, v, out, mask, causal, sm_scale, arch, autotune, config, required) -> list[KernelLaunch] | None:
    """The TMA kernel's launches (:mod:`fastgen.kernels.attention_tma`) where it applies: sm90+, a
    TMA-able layout, and a fitting config for the class on this GPU; None where it does not (the pointer
    kernel runs), unless ``required`` (``tma=True``), which raises why instead."""
    from fastgen.kernels import attention_tma as tma_kernel  # lazy: it imports this module

    head_dim = q.shape[-1]
    cls = attention_shape_class(head_dim, q.dtype)
    if arch == "cpu":
        reason = None if required else "the interpreter runs the pointer kernel unless tma=True"
    elif arch_capability(arch) < (9, 0):
        reason = f"{arch} has no TMA (sm90 and newer)"
    else:
        reason = tma_kernel.tma_layout_ok(q, k, v, out)
        if reason is None and config is None and not has_fitting_config(tma_kernel.CONFIGS.kernel, arch, cls):
            if required:  # the table's null entry says why
                arch_default(tma_kernel.CONFIGS.kernel, arch, cls, {})
            return None
    if reason is not None:
        if required:
            raise UnsupportedError(f"attention TMA kernel: {reason}")
        return None

    def plan(cfg: dict[str, int]) -> list[KernelLaunch]:
        return tma_kernel.plan_attention_tma(q, k, v, out, mask=mask, causal=causal, sm_scale=sm_scale, cfg=cfg,
                                             arch=arch)

    if config is None:
        key = shape_key(q.shape[1], k.shape[1], head_dim, q.dtype, mask is not None, causal)
        default = arch_default(tma_kernel.CONFIGS.kernel, arch, cls, tma_kernel.default_tma_config(head_dim, arch))
        config = tma_kernel.CONFIGS.choose(key, arch, lambda c: run_launches(plan(c)), default, autotune,
                                           fits=lambda c: compiled_misfit(plan(c)))
    return plan(config)


def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: torch.Tensor | None = None,
                  causal: bool = False, scale: float | None = None, out: torch.Tensor | None = None,
                  block_m: int | None = None, block_n: int | None = None,
                  autotune: bool = False, tma: bool | None = None) -> torch.Tensor:
    """Launch the fused attention kernel; returns ``out`` (new contiguous tensor unless given).

    ``out``: optional preallocated output shaped like q (any strides), e.g. a poisoned buffer in tests.
    ``block_m``/``block_n``: override the default block table (powers of two >= 16).
    ``autotune``: on CUDA, time :data:`AUTOTUNE_CONFIGS` (those that fit this GPU) once per shape bucket
    and persist the fastest (see :mod:`fastgen.kernels.launch_configs`); without it, tuned/shipped configs
    are used when present, else the architecture's default table. Ignored under the interpreter.
    ``tma``: the TMA kernel on sm90+ (see :func:`plan_attention`).
    Raises :class:`~fastgen.kernels.launch_configs.NoFittingConfig` where no config fits this head dim
    and dtype on this GPU (``fastgen.ops.attention`` routes those calls to SDPA).
    """
    check_launch_device("q", q)
    out, launches = plan_attention(q, k, v, arch=launch_arch(q.device), mask=mask, causal=causal, scale=scale,
                                   out=out, block_m=block_m, block_n=block_n, autotune=autotune, tma=tma)
    run_launches(launches)
    return out
