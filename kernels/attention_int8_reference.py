"""Quantized attention (SageAttention style): the plain PyTorch simulation of the Triton kernel.

:func:`attention_int8_reference` performs, in fp32 PyTorch, exactly the arithmetic of the Triton
kernel :mod:`fastgen.kernels.attention_int8` (same quantization blocks, same rounding, the same blockwise
online softmax), so it is both the CPU fallback of the ``triton-int8`` backend and a tight test oracle
for the kernel. Semantics (layout, mask, causal, empty rows, scale) are those of
:func:`fastgen.kernels.attention_reference.attention_reference`; only the precision differs:

1. **K smoothing**: K's mean over the sequence, per (batch, head), is subtracted (:func:`k_mean`).
   ``q . (k_j - mean)`` differs from ``q . k_j`` by a per-query constant, which softmax ignores; the
   smoothed K has no large channel offset, so int8 resolves its variation (real UNet / DiT keys share
   a big per-channel bias).
2. **int8 Q and K** with one fp32 scale per block of rows per (batch, head) (:func:`quantize_blocks`):
   ``BLOCK_M`` query rows, ``BLOCK_N`` key rows. ``scale = amax / 127``; values are ``x * (127/amax)``
   rounded half away from zero. ``sm_scale * log2(e)`` is folded into Q's scale so scores come out in
   log2 units and softmax uses ``exp2``.
3. Scores ``int32(q8 @ k8^T) * (q_scale * k_scale)`` in fp32; online softmax in fp32 (running max,
   running sum, accumulator rescaled per key block, as in flash-attention).
4. ``P @ V`` with fp32 accumulation, either ``pv="fp16"``: P rounded to fp16, V to fp16 (bf16/fp32 V
   saturated at +-65504 first), or ``pv="fp8"``: P scaled by 448 into float8 e4m3, V divided by a
   per-(batch, head, channel) scale ``amax_over_seq / 448`` into e4m3 (:func:`fp8_v_scales`), both
   undone at the end (SageAttention2's scheme; Hopper / Ada run fp8 MMA at twice the fp16 rate).

Everything but the int8/fp8 rounding is exact: int8 products summed over <= 256 dims stay below
2**24, so the fp32 score matmul is exact in any order; fp16 x fp16 and e4m3 x e4m3 products are exact
in fp32, so P @ V differs from the kernel only by fp32 summation order.

Inputs fp16, bf16 or fp32 (fp32 is quantized from fp32 and computed like fp16 for ``P @ V``); the
output has q's dtype. Nothing here imports triton.
"""

from __future__ import annotations

import math

import torch

from fastgen.errors import InvalidArgumentError
from fastgen.kernels.attention_reference import check_attention_args, visible_keys

__all__ = ["DTYPES", "FP8_MAX", "LOG2E", "PV_MODES", "attention_int8_reference", "check_blocks",
           "default_blocks", "fp8_v_scales", "k_mean", "quantize_blocks", "resolve_pv"]

LOG2E = 1.4426950408889634
FP8_MAX = 448.0  # largest finite float8 e4m3fn
FP16_MAX = 65504.0
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
PV_MODES = ("fp16", "fp8")


def default_blocks(head_dim: int) -> tuple[int, int]:
    """``(block_m, block_n)`` the GPU kernel uses by default; they are also the quantization blocks.

    128 query rows x 64 keys is SageAttention's choice (one Q scale per 128 rows, one K scale per 64
    keys); above head dim 128 the fp32 accumulator of 128 rows no longer fits registers, so 64 rows.
    """
    return (128, 64) if head_dim <= 128 else (64, 64)


def int8_shape_class(head_dim: int, pv: str) -> str:
    """Launch-config class: P.V's type and the head dim's range, ``"fp8-d64"`` (up to 64), ``"fp8-d128"``
    (65..128), ``"fp8-d256"`` (129..256); each class's config must fit its widest member."""
    return f"{pv}-d{64 if head_dim <= 64 else 128 if head_dim <= 128 else 256}"


def check_blocks(block_m: int, block_n: int) -> None:
    """Powers of two, ``block_m >= 16`` (tl.dot's M) and ``block_n >= 32`` (K of the fp8 P @ V dot)."""
    for name, blk, lo in (("block_m", block_m, 16), ("block_n", block_n, 32)):
        if not isinstance(blk, int) or blk < lo or blk & (blk - 1):
            raise InvalidArgumentError(name, blk, f"a power of two >= {lo}")


def resolve_pv(pv: str | None, device: torch.device) -> str:
    """``pv`` as given, or the default: ``"fp8"`` on CUDA devices of compute capability >= 8.9."""
    if pv is None:
        if device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9):
            return "fp8"
        return "fp16"
    if pv not in PV_MODES:
        raise InvalidArgumentError("pv", pv, (*PV_MODES, None))
    return pv


def k_mean(k: torch.Tensor) -> torch.Tensor:
    """K's mean over the sequence in fp32, ``(batch, heads, head_dim)`` contiguous (the smoothing shift).

    Masked keys are included: any per-(batch, head) vector is a valid shift, the mean of all keys is
    simply the one that centres them.
    """
    return k.mean(dim=1, dtype=torch.float32).contiguous()  # (batch, heads, head_dim)


def quantize_blocks(x: torch.Tensor, block: int, *, shift: torch.Tensor | None = None,
                    mult: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block symmetric int8 quantization of ``x`` ``(batch, seq, heads, dim)``.

    ``shift``: optional fp32 ``(batch, heads, dim)`` subtracted first (K smoothing).
    Returns ``(x8, scales)``: int8 ``(batch, heads, seq, dim)`` and fp32 ``(batch, heads, cdiv(seq, block))``
    with ``x - shift ~= x8 * scale / mult`` row-block-wise; ``mult`` is folded into the stored scales
    (Q's ``sm_scale * log2(e)``). An all-zero block gets scale 0 and zeros.
    """
    b, s, h, d = x.shape
    xf = x.to(torch.float32)
    if shift is not None:
        xf = xf - shift[:, None]  # (batch, seq, heads, dim)
    nb = -(-s // block)
    xf = xf.transpose(1, 2)  # (batch, heads, seq, dim)
    xf = torch.nn.functional.pad(xf, (0, 0, 0, nb * block - s))  # zero rows pad the last block
    blocks = xf.reshape(b, h, nb, block, d)
    amax = blocks.abs().amax(dim=(-1, -2))  # (batch, heads, nb), exact
    scale = amax / 127.0
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    t = blocks * inv[..., None, None]
    # Round half away from zero as the kernel does: add +-0.5, then truncate toward zero.
    half = torch.tensor(0.5, dtype=torch.float32, device=x.device)
    t = (t + torch.where(t >= 0, half, -half)).clamp(-127.0, 127.0)
    x8 = t.to(torch.int8).reshape(b, h, nb * block, d)[:, :, :s]
    return x8, scale * torch.tensor(mult, dtype=torch.float32, device=x.device)


def fp8_v_scales(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(batch, head, channel) fp8 scaling of V: ``(v_inv, o_mult)``, fp32 ``(batch, heads, head_dim)``.

    V is stored as e4m3 ``v * v_inv`` (its largest magnitude per channel maps to 448); the P @ V
    accumulator is multiplied back by ``o_mult = amax / 448 / 448`` (one 448 for V, one for P's
    ``p * 448``). A channel of zeros gets 0 for both.
    """
    amax = torch.linalg.vector_norm(v, float("inf"), dim=1, dtype=torch.float32).contiguous()
    v_inv = torch.where(amax > 0, FP8_MAX / amax, torch.zeros_like(amax))
    return v_inv, amax / FP8_MAX / FP8_MAX


def _fp8(x: torch.Tensor) -> torch.Tensor:
    """Round fp32 to the nearest e4m3 value (ties to even), back as fp32."""
    return x.to(torch.float8_e4m3fn).to(torch.float32)


def attention_int8_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                             mask: torch.Tensor | None = None, causal: bool = False,
                             scale: float | None = None, block_m: int | None = None,
                             block_n: int | None = None, pv: str | None = "fp16") -> torch.Tensor:
    """The int8 kernel's arithmetic in PyTorch; q ``(batch, seq_q, heads, head_dim)``, k/v ``(batch, seq_k, ...)``.

    ``block_m``/``block_n``: the quantization (and softmax) blocks, default :func:`default_blocks`;
    pass the kernel's blocks to reproduce it. ``pv``: ``"fp16"`` or ``"fp8"`` (None: the kernel's
    default for q's device). Returns a tensor shaped like q, in q's dtype.
    """
    check_attention_args(q, k, v, mask, scale)
    if q.dtype not in DTYPES:
        raise InvalidArgumentError("q.dtype", q.dtype, "float16, bfloat16, float32")
    pv = resolve_pv(pv, q.device)
    batch, seq_q, heads, head_dim = q.shape
    seq_k = k.shape[1]
    dm, dn = default_blocks(head_dim)
    bm, bn = block_m or dm, block_n or dn
    check_blocks(bm, bn)
    sm_scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)

    q8, qs = quantize_blocks(q, bm, mult=sm_scale * LOG2E)  # (b, h, seq_q, d), (b, h, nbm)
    k8, ks = quantize_blocks(k, bn, shift=k_mean(k))  # (b, h, seq_k, d), (b, h, nbn)
    qf = q8.to(torch.float32)
    q_scale = qs.repeat_interleave(bm, dim=-1)[..., :seq_q, None]  # (b, h, seq_q, 1): each row's scale
    vf = v.to(torch.float32).transpose(1, 2)  # (b, h, seq_k, d)
    if pv == "fp16":
        if v.dtype != torch.float16:
            vf = vf.clamp(-FP16_MAX, FP16_MAX)
        vf = vf.to(torch.float16).to(torch.float32)
    else:
        v_inv, o_mult = fp8_v_scales(v)
        vf = _fp8((vf * v_inv[:, :, None, :]).clamp(-FP8_MAX, FP8_MAX))

    allowed = visible_keys(q, k, mask, causal)  # (b or 1, 1, seq_q, seq_k) or None
    m_i = torch.full((batch, heads, seq_q, 1), float("-inf"), device=q.device)
    l_i = torch.zeros((batch, heads, seq_q, 1), device=q.device)
    acc = torch.zeros((batch, heads, seq_q, head_dim), device=q.device)
    # Every row visits every key block; the kernel skips blocks wholly above a query block's causal
    # horizon, but a block whose scores are all -inf leaves (m, l, acc) exactly unchanged.
    for j, start in enumerate(range(0, seq_k, bn)):
        stop = min(start + bn, seq_k)
        s_int = torch.matmul(qf, k8[:, :, start:stop].to(torch.float32).transpose(-1, -2))  # exact
        s = s_int * (q_scale * ks[:, :, j, None, None])  # (b, h, seq_q, n), log2 units
        if allowed is not None:
            s = s.masked_fill(~allowed[..., start:stop], float("-inf"))
        m_new = torch.maximum(m_i, s.amax(dim=-1, keepdim=True))
        m_sub = torch.where(m_new == float("-inf"), torch.zeros_like(m_new), m_new)
        p = torch.exp2(s - m_sub)
        alpha = torch.exp2(m_i - m_sub)
        l_i = l_i * alpha + p.sum(dim=-1, keepdim=True)
        m_i = m_new
        if pv == "fp16":
            p_in = p.to(torch.float16).to(torch.float32)
        else:
            p_in = _fp8(p * FP8_MAX)
        acc = acc * alpha + torch.matmul(p_in, vf[:, :, start:stop])
    inv_l = 1.0 / torch.where(l_i == 0.0, torch.ones_like(l_i), l_i)
    o = acc * inv_l
    if pv == "fp8":
        o = o * o_mult[:, :, None, :]
    return o.transpose(1, 2).to(q.dtype)
