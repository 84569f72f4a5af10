"""diffusers attention through :func:`fastgen.ops.attention`: a processor equivalent to ``AttnProcessor2_0``.

:class:`FastgenAttnProcessor` does what ``AttnProcessor2_0`` (and the older ``AttnProcessor``) do - spatial
norm, 4-d ``(batch, channels, height, width)`` input, group norm, ``norm_cross``, q/k norms, output
projection, residual connection and ``rescale_output_factor`` - but attends on the projections' views in
fastgen's ``(batch, seq, heads, head_dim)`` layout, with no transposes or copies. ``attention_mask`` (the
additive ``-10000`` bias diffusers builds from ``encoder_attention_mask``, or a boolean mask) becomes a
key-padding mask when it is one exactly; any other mask runs the original processor (SDPA) for that call.

Diffusion transformers' processors (SD3's ``JointAttnProcessor2_0``, FLUX's ``FluxAttnProcessor`` on
``FluxAttention``, which dispatches through ``dispatch_attention_fn``) get their own fastgen processors
(:mod:`fastgen.ops.attention_dit`); classification and install / restore for all of them live here.

The original processor object is kept on the new one (``.original``), so restoring puts the very same
object back; while tracing for export, the original processor runs, so the exported graph is unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
from torch import nn

from fastgen.ops.attention_dit import DIT_PROCESSORS, classify_dit, replacement_for
from fastgen.ops.optimize import AttentionPolicy, is_exporting, key_padding_from_mask

__all__ = ["FASTGEN_PROCESSORS", "REPLACEABLE", "FastgenAttnProcessor", "apply", "classify", "notes"]

#: Processor classes whose math :class:`FastgenAttnProcessor` reproduces (exact types, not subclasses).
REPLACEABLE = (AttnProcessor2_0, AttnProcessor)


class FastgenAttnProcessor:
    """A diffusers attention processor that attends with :func:`fastgen.ops.attention`.

    ``original``: the ``AttnProcessor2_0`` / ``AttnProcessor`` it replaces (run while exporting, for masks
    that are not key-padding, and put back on restore). ``policy``: backend, strict flag, layer name.
    """

    def __init__(self, original: Any, policy: AttentionPolicy) -> None:
        self.original = original
        self.policy = policy
        # AttnProcessor2_0 lets SDPA use its default scale 1/sqrt(head_dim) (diffusers ignores attn.scale
        # there); AttnProcessor uses attn.scale. Keep whichever the original used.
        self._use_attn_scale = type(original) is AttnProcessor
        self._qk_norm = type(original) is AttnProcessor2_0  # AttnProcessor never applies norm_q / norm_k

    def __repr__(self) -> str:
        return f"FastgenAttnProcessor(backend={self.policy.backend!r}, original={type(self.original).__name__})"

    # The signature mirrors AttnProcessor2_0's: Attention.forward filters cross_attention_kwargs by it.
    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args: Any,
                 **kwargs: Any) -> torch.Tensor:
        if is_exporting():
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch_size = context.shape[0]
        # (batch, channels, h, w) inputs attend over h*w positions
        seq_k = context.shape[1] if context.ndim == 3 else context.shape[2] * context.shape[3]
        key_padding = None
        if attention_mask is not None:
            prepared = attn.prepare_attention_mask(attention_mask, seq_k, batch_size)
            # (batch, heads, 1 or seq_q, seq_k), as AttnProcessor2_0 hands it to SDPA
            prepared = prepared.view(batch_size, attn.heads, -1, prepared.shape[-1])
            seq_q = hidden_states.shape[1] if hidden_states.ndim == 3 else hidden_states.shape[2] * hidden_states.shape[3]
            found = key_padding_from_mask(prepared, batch_size, seq_q, seq_k, allow_causal=False)
            if isinstance(found, str):
                self.policy.fallback(found)
                return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
            key_padding = found[0]

        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        head_dim = key.shape[-1] // attn.heads
        q = query.view(batch_size, -1, attn.heads, head_dim)  # (batch, seq_q, heads, head_dim), a view
        k = key.view(batch_size, -1, attn.heads, head_dim)  # (batch, seq_k, heads, head_dim)
        v = value.view(batch_size, -1, attn.heads, head_dim)
        # q/k norms act on the last (head_dim) axis, so they give the same values in either layout.
        if self._qk_norm and attn.norm_q is not None:
            q = attn.norm_q(q)
        if self._qk_norm and attn.norm_k is not None:
            k = attn.norm_k(k)

        scale = attn.scale if self._use_attn_scale else None
        out = self.policy.attend(q, k, v, mask=key_padding, causal=False, scale=scale)  # (batch, seq_q, heads, head_dim)
        hidden_states = out.reshape(batch_size, -1, attn.heads * head_dim).to(q.dtype)

        hidden_states = attn.to_out[0](hidden_states)  # linear projection
        hidden_states = attn.to_out[1](hidden_states)  # dropout
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


#: Every fastgen processor class (each keeps the processor it replaced as ``.original``).
FASTGEN_PROCESSORS = (FastgenAttnProcessor, *DIT_PROCESSORS)


def _base_processor(module: nn.Module) -> Any:
    processor = getattr(module, "processor", None)
    return processor.original if isinstance(processor, FASTGEN_PROCESSORS) else processor


def classify(module: nn.Module) -> str | None:
    """``"ok"`` for an attention layer this processor serves, a reason for one it does not, None otherwise."""
    if isinstance(module, Attention):
        base = _base_processor(module)
        dit = classify_dit(module, base)  # SD3's JointAttnProcessor2_0
        if dit is not None:
            return dit
        if type(base) not in REPLACEABLE:
            return (f"processor {type(base).__name__} is kept (fastgen replaces "
                    f"{', '.join(c.__name__ for c in REPLACEABLE)} and JointAttnProcessor2_0)")
        if getattr(module, "to_k", None) is None or getattr(module, "to_q", None) is None:
            return "no separate q/k/v projections"
        if getattr(module, "inner_kv_dim", module.inner_dim) != module.inner_dim:
            return "grouped key/value heads (kv_heads != heads)"
        if getattr(module, "to_out", None) is None:
            return "no output projection (pre_only attention)"
        return "ok"
    if hasattr(module, "processor") and hasattr(module, "set_processor"):  # AttentionModuleMixin models (Flux...)
        base = _base_processor(module)
        dit = classify_dit(module, base)  # FLUX's FluxAttnProcessor
        if dit is not None:
            return dit
        return (f"{type(module).__name__} with {type(base).__name__} is not supported (fastgen replaces "
                "FluxAttnProcessor on these)")
    return None


def notes(targets: Any) -> list[tuple[str, str]]:
    """Nothing to say beyond the per-layer verdicts."""
    return []


def _set(module: nn.Module, processor: Any) -> None:
    # set_processor is the public API; a bare attribute for modules that lack it.
    if hasattr(module, "set_processor"):
        module.set_processor(processor)
    else:
        module.processor = processor


def apply(entries: list[tuple[str, nn.Module, str | None]], backend: str | None, strict: bool) -> dict[str, Any]:
    """Install (reason None and a backend) or restore the processor of each ``(name, module, reason)``."""
    layers: dict[str, str] = {}
    skipped: dict[str, str] = {}
    restored: list[str] = []
    for name, module, reason in entries:
        current = getattr(module, "processor", None)
        if backend is not None and reason is None:
            base = _base_processor(module)
            cls = replacement_for(base) or FastgenAttnProcessor
            _set(module, cls(base, AttentionPolicy(name, backend, strict)))
            layers[name] = backend
            continue
        if isinstance(current, FASTGEN_PROCESSORS):
            _set(module, current.original)
            restored.append(name)
        if backend is not None and reason is not None:
            skipped[name] = reason
    return {"layers": layers, "skipped": skipped, "restored": restored}
