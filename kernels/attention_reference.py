"""Attention in plain PyTorch: the argument check shared by every backend and the reference.

:func:`attention_reference` is the CPU fallback of ``fastgen.ops.attention`` and the test oracle of the
Triton kernel :mod:`fastgen.kernels.attention`. Layout: q ``(batch, seq_q, heads, head_dim)``, k and v
``(batch, seq_k, heads, head_dim)``, any strides; the output is shaped like q. Semantics:

- ``mask``: optional boolean key-padding mask ``(batch, seq_k)``, True = attend.
- ``causal``: query ``i`` sees key ``j`` iff ``j <= i + (seq_k - seq_q)`` (aligned to the end, as in
  flash-attention; for ``seq_q == seq_k`` this is PyTorch SDPA's ``is_causal``).
- A query row with no visible key (all keys masked) outputs zeros, not NaN.
- ``scale``: softmax scale, default ``1 / sqrt(head_dim)``.

Nothing here imports triton.
"""

from __future__ import annotations

import math

import torch

from fastgen.errors import InvalidArgumentError

__all__ = ["attention_reference", "attention_shape_class", "check_attention_args", "head_dim_chunks",
           "visible_keys"]


def check_attention_args(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                         scale: float | None) -> None:
    """Raise :class:`InvalidArgumentError` naming the first bad argument (shapes, dtypes, devices)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise InvalidArgumentError(name, getattr(t, "shape", t), "a 4-d tensor (batch, seq, heads, head_dim)")
        if not t.dtype.is_floating_point:
            raise InvalidArgumentError(f"{name}.dtype", t.dtype, "float16, bfloat16, float32, float64")
        if t.dtype != q.dtype:
            raise InvalidArgumentError(f"{name}.dtype", t.dtype, f"q's dtype {q.dtype}")
        if t.device != q.device:
            raise InvalidArgumentError(f"{name}.device", t.device, f"q's device {q.device}")
    b, _, h, d = q.shape
    if k.shape[0] != b or k.shape[2] != h or k.shape[3] != d:
        raise InvalidArgumentError("k", tuple(k.shape), f"(batch={b}, seq_k, heads={h}, head_dim={d})")
    if v.shape != k.shape:
        raise InvalidArgumentError("v", tuple(v.shape), f"k's shape {tuple(k.shape)}")
    if q.shape[1] < 1 or k.shape[1] < 1 or b < 1 or h < 1 or d < 1:
        raise InvalidArgumentError("q", tuple(q.shape), "non-empty batch, seq, heads, head_dim and seq_k")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise InvalidArgumentError("mask", getattr(mask, "dtype", mask), "a torch.bool tensor (batch, seq_k)")
        if tuple(mask.shape) != (b, k.shape[1]):
            raise InvalidArgumentError("mask", tuple(mask.shape), f"(batch={b}, seq_k={k.shape[1]})")
        if mask.device != q.device:
            raise InvalidArgumentError("mask.device", mask.device, f"q's device {q.device}")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise InvalidArgumentError("scale", scale, "a positive finite float or None")


def visible_keys(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, causal: bool) -> torch.Tensor | None:
    """Boolean (batch, 1, seq_q, seq_k) of which keys each query sees, or None if it sees all."""
    sq, sk = q.shape[1], k.shape[1]
    allowed = None
    if mask is not None:
        allowed = mask[:, None, None, :]  # (batch, 1, 1, seq_k)
    if causal:
        i = torch.arange(sq, device=q.device)[:, None]
        j = torch.arange(sk, device=q.device)[None, :]
        tri = (j <= i + (sk - sq))[None, None]  # (1, 1, seq_q, seq_k), aligned to the end
        allowed = tri if allowed is None else allowed & tri
    return allowed


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: torch.Tensor | None = None,
                        causal: bool = False, scale: float | None = None) -> torch.Tensor:
    """Plain PyTorch attention in fp32 (fp64 stays fp64), cast back to q's dtype; the test oracle."""
    check_attention_args(q, k, v, mask, scale)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    qf, kf, vf = (t.to(acc).transpose(1, 2) for t in (q, k, v))  # (batch, heads, seq, head_dim)
    s = torch.matmul(qf, kf.transpose(-1, -2)) * scale  # (batch, heads, seq_q, seq_k)
    allowed = visible_keys(q, k, mask, causal)
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    # A row with no visible key: max is -inf; subtract 0 instead so exp gives 0s and the sum is 0.
    m = s.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)
    denom = p.sum(dim=-1, keepdim=True)
    o = torch.matmul(p, vf) / torch.where(denom > 0, denom, torch.ones_like(denom))
    return o.transpose(1, 2).to(q.dtype)


def head_dim_chunks(head_dim: int, minimum: int = 16) -> tuple[int, int]:
    """``(D0, D1)``: power-of-two chunks, each >= ``minimum``, covering head_dim (D1 = 0 when one suffices).

    D0 is the largest power of two <= head_dim, D1 the next power of two >= the remainder: 40 = 32 + 16,
    80 = 64 + 16, 96 = 64 + 32, 160 = 128 + 32 (see :mod:`fastgen.kernels.attention`).
    """
    d0 = max(1 << (head_dim.bit_length() - 1), minimum)
    rem = head_dim - d0
    if rem <= 0:
        return d0, 0
    return d0, max(minimum, 1 << (rem - 1).bit_length())


def attention_shape_class(head_dim: int, dtype: torch.dtype) -> str:
    """The launch-config class of an attention call, what the per-architecture default tables are keyed
    by: registers and shared memory follow the padded head-dim width (``head_dim_chunks``) and the
    element size. fp16/bf16: ``"f16-d32"`` (widths 16, 32), ``"f16-d48"`` (33..48, e.g. SD's 40),
    ``f16-d64``, ``f16-d80``, ``f16-d96``, ``f16-d128``, ``"f16-d160"`` (129..160), ``"f16-d256"``
    (161..256); fp32: ``"f32-d64"`` (up to 64) and ``"f32-d256"``. Each class's config must fit its
    widest member."""
    d0, d1 = head_dim_chunks(head_dim)
    width = d0 + d1
    if dtype == torch.float32:
        return "f32-d64" if width <= 64 else "f32-d256"
    for top in (32, 48, 64, 80, 96, 128, 160):
        if width <= top:
            return f"f16-d{top}"
    return "f16-d256"
