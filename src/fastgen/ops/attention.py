"""Scaled dot-product attention with pluggable backends: ``triton``, ``triton-int8``, ``sdpa``, ``reference``.

Layout (all backends): q ``(batch, seq_q, heads, head_dim)``, k and v ``(batch, seq_k, heads, head_dim)``
with any strides; the output is shaped like q. Semantics shared by every backend:

- ``mask``: optional boolean key-padding mask ``(batch, seq_k)``, True = attend.
- ``causal``: query ``i`` sees key ``j`` iff ``j <= i + (seq_k - seq_q)`` (aligned to the end, as in
  flash-attention; for ``seq_q == seq_k`` this is PyTorch SDPA's ``is_causal``). With ``seq_q > seq_k``
  the first ``seq_q - seq_k`` queries see no key.
- A query row with no visible key (all keys masked) outputs zeros, not NaN.
- ``scale``: softmax scale, default ``1 / sqrt(head_dim)``.

Backends declare their constraints as data (:data:`BACKENDS`). ``backend=None`` picks the first that
fits in the order ``triton`` (CUDA tensors only), ``sdpa``, ``reference`` (``triton-int8`` is lossy,
so only ever used when named: SageAttention-style int8 Q/K with fp16 or fp8 P.V); naming a backend whose
constraints the call violates raises :class:`UnsupportedError` naming the backend and the constraint.
On CUDA, a Triton backend also declines a head dim and dtype for which its kernel has no launch config
that fits the GPU (``kernels/configs/<arch>.json`` says null: it would spill or exceed shared memory),
so ``backend=None`` routes such calls to SDPA instead of failing at launch.
``triton`` also runs on CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1``; slow, for
tests only, so never picked automatically there). Triton is imported only when its backend runs.
:func:`attention_reference` and :func:`check_attention_args` live next to the kernels, in
:mod:`fastgen.kernels.attention_reference` (re-exported here).

The Triton paths are registered as the custom ops ``torch.ops.fastgen.attention`` and
``torch.ops.fastgen.attention_int8`` (torch >= 2.4) with fake implementations, so torch.compile and
torch.export can trace through them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastgen.core.lazy import callable_module
from fastgen.errors import InvalidArgumentError, UnsupportedError
from fastgen.kernels.attention_reference import (
    attention_reference,
    attention_shape_class,
    check_attention_args,
    visible_keys,
)
from fastgen.kernels.device import interpreting

__all__ = ["BACKENDS", "BackendConstraints", "attention", "attention_reference", "check_attention_args",
           "select_backend"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class BackendConstraints:
    """What one attention backend can serve; checked before it runs."""

    name: str
    """Backend name as passed to :func:`attention`."""
    devices: tuple[str, ...]
    """Tensor device types served (``"cpu"``, ``"cuda"``)."""
    dtypes: tuple[torch.dtype, ...]
    """Input dtypes served (q, k, v share one)."""
    head_dim: tuple[int, int]
    """Inclusive range of head dims served."""
    masks: tuple[str, ...]
    """Mask kinds served: ``"none"``, ``"key_padding"``."""
    causal: bool
    """Whether ``causal=True`` is served."""

    def violation(self, q: torch.Tensor, mask: torch.Tensor | None, causal: bool) -> str | None:
        """The first constraint the call violates, as a phrase, or None if it fits."""
        device = q.device.type
        triton_kernel = self.name.startswith("triton")
        if device not in self.devices and not (triton_kernel and device == "cpu" and interpreting()):
            extra = " (cpu only with TRITON_INTERPRET=1)" if triton_kernel else ""
            return f"device {device!r} (allowed: {', '.join(self.devices)}{extra})"
        if q.dtype not in self.dtypes:
            return f"dtype {q.dtype} (allowed: {', '.join(str(d) for d in self.dtypes)})"
        lo, hi = self.head_dim
        if not lo <= q.shape[-1] <= hi:
            return f"head_dim {q.shape[-1]} (allowed: {lo}..{hi})"
        kind = "none" if mask is None else "key_padding"
        if kind not in self.masks:
            return f"mask kind {kind!r} (allowed: {', '.join(self.masks)})"
        if causal and not self.causal:
            return "causal=True"
        if triton_kernel and device == "cuda":
            return _no_fitting_config(self.name, q)
        return None


def _no_fitting_config(backend: str, q: torch.Tensor) -> str | None:
    """Why a Triton backend cannot serve this call on this GPU: no launch config of its kernel fits the
    head dim and dtype there (the architecture's default table says null: it would spill or exceed
    shared memory), or the GPU is older than the kernels' sm80 floor. None if it can."""
    from fastgen.errors import UnsupportedError as _Unsupported
    from fastgen.kernels.attention_int8_reference import int8_shape_class
    from fastgen.kernels.launch import arch_capability
    from fastgen.kernels.launch_configs import device_arch, has_fitting_config, table_for

    arch = device_arch(q.device)
    try:
        table_for(arch)
    except _Unsupported:
        return f"GPU architecture {arch} (allowed: sm80 and newer)"
    hd = q.shape[-1]
    if backend == "triton":
        kernel, cls = "attention", attention_shape_class(hd, q.dtype)
    else:
        pv = "fp8" if arch_capability(arch) >= (8, 9) else "fp16"  # the kernel's own default
        kernel, cls = "attention_int8", int8_shape_class(hd, pv)
    if not has_fitting_config(kernel, arch, cls):
        return f"head_dim {hd} in {q.dtype} on {arch} (no launch config of its kernel fits this GPU)"
    return None


BACKENDS: dict[str, BackendConstraints] = {
    # Head dims 16..256: the kernel splits the head dim into power-of-two chunks of at least 16
    # (tl.dot's minimum), and 256 is the largest that fits registers/shared memory.
    "triton": BackendConstraints("triton", ("cuda",), _FLOAT_DTYPES, (16, 256), ("none", "key_padding"), True),
    # SageAttention-style: int8 Q.K^T (K smoothed, per-block scales), fp16 (or fp8 on sm_89+) P.V.
    # Lossy, so never picked by backend=None. Head dims below 32 are zero-padded to int8 tl.dot's 32.
    "triton-int8": BackendConstraints("triton-int8", ("cuda",), _FLOAT_DTYPES, (1, 256),
                                      ("none", "key_padding"), True),
    "sdpa": BackendConstraints("sdpa", ("cpu", "cuda"), _FLOAT_DTYPES + (torch.float64,), (1, 1 << 16),
                               ("none", "key_padding"), True),
    "reference": BackendConstraints("reference", ("cpu", "cuda"), _FLOAT_DTYPES + (torch.float64,),
                                    (1, 1 << 16), ("none", "key_padding"), True),
}
_AUTO_ORDER = ("triton", "sdpa", "reference")


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool,
          scale: float | None) -> torch.Tensor:
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # (batch, heads, seq, head_dim) views
    sq, sk = q.shape[1], k.shape[1]
    if mask is None and (not causal or sq == sk):
        out = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, scale=scale)
        return out.transpose(1, 2)
    allowed = visible_keys(q, k, mask, causal)  # SDPA's bool attn_mask: True = attend
    out = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, attn_mask=allowed, scale=scale)
    # SDPA gives NaN (or, depending on version and kernel, zeros) for rows without a visible key.
    dead = ~allowed.any(dim=-1, keepdim=True)  # (batch, 1, seq_q, 1)
    return out.masked_fill(dead, 0.0).transpose(1, 2)


def _triton(q, k, v, mask, causal, scale):
    from fastgen.kernels.attention import attention_fwd  # lazy: imports triton

    return attention_fwd(q, k, v, mask=mask, causal=causal, scale=scale)


def _triton_int8(q, k, v, mask, causal, scale):
    from fastgen.kernels.attention_int8 import attention_int8_fwd  # lazy: imports triton

    return attention_int8_fwd(q, k, v, mask=mask, causal=causal, scale=scale)


_HAS_CUSTOM_OP = hasattr(torch.library, "custom_op") and hasattr(torch.library, "register_fake")
if _HAS_CUSTOM_OP:
    try:
        @torch.library.custom_op(
            "fastgen::attention", mutates_args=(),
            schema="(Tensor q, Tensor k, Tensor v, Tensor? mask, bool causal, float? scale) -> Tensor")
        def _attention_op(q, k, v, mask, causal, scale):
            return _triton(q, k, v, mask, causal, scale)

        @torch.library.custom_op(
            "fastgen::attention_int8", mutates_args=(),
            schema="(Tensor q, Tensor k, Tensor v, Tensor? mask, bool causal, float? scale) -> Tensor")
        def _attention_int8_op(q, k, v, mask, causal, scale):
            return _triton_int8(q, k, v, mask, causal, scale)

        @_attention_op.register_fake
        def _(q, k, v, mask, causal, scale):
            return torch.empty_like(q, memory_format=torch.contiguous_format)

        @_attention_int8_op.register_fake
        def _(q, k, v, mask, causal, scale):
            return torch.empty_like(q, memory_format=torch.contiguous_format)
    except RuntimeError:  # already registered (module imported twice under another name)
        _HAS_CUSTOM_OP = hasattr(torch.ops.fastgen, "attention") and hasattr(torch.ops.fastgen, "attention_int8")


def select_backend(q: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = False) -> str:
    """The first backend in preference order that serves this call (triton only for CUDA tensors)."""
    for name in _AUTO_ORDER:
        if name == "triton" and q.device.type != "cuda":
            continue
        if name == "triton":
            try:
                import triton  # noqa: F401
            except ImportError:
                continue
        if BACKENDS[name].violation(q, mask, causal) is None:
            return name
    raise UnsupportedError(f"no attention backend serves dtype {q.dtype} on {q.device.type} "
                           f"with head_dim {q.shape[-1]}")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: torch.Tensor | None = None,
              causal: bool = False, scale: float | None = None, backend: str | None = None) -> torch.Tensor:
    """Attention over q ``(batch, seq_q, heads, head_dim)``, k/v ``(batch, seq_k, heads, head_dim)``.

    Returns a tensor shaped like q, in q's dtype. See the module docstring for mask, causal and scale
    semantics and backend selection.
    """
    check_attention_args(q, k, v, mask, scale)
    causal = bool(causal)
    scale = None if scale is None else float(scale)
    if backend is None:
        backend = select_backend(q, mask, causal)
    elif backend not in BACKENDS:
        raise InvalidArgumentError("backend", backend, (*BACKENDS, None))
    else:
        reason = BACKENDS[backend].violation(q, mask, causal)
        if reason is not None:
            raise UnsupportedError(f"attention backend {backend!r} does not support {reason}")
    if backend == "triton":
        if _HAS_CUSTOM_OP:
            return torch.ops.fastgen.attention(q, k, v, mask, causal, scale)
        return _triton(q, k, v, mask, causal, scale)
    if backend == "triton-int8":
        if _HAS_CUSTOM_OP:
            return torch.ops.fastgen.attention_int8(q, k, v, mask, causal, scale)
        return _triton_int8(q, k, v, mask, causal, scale)
    if backend == "sdpa":
        return _sdpa(q, k, v, mask, causal, scale)
    return attention_reference(q, k, v, mask=mask, causal=causal, scale=scale)


# `fastgen.ops.attention(...)` stays the op even once this module has been imported (which sets the
# module as the package attribute of the same name).
callable_module(__name__, lambda: attention)
