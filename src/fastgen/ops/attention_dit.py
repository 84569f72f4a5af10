"""Diffusion-transformer attention through :func:`fastgen.ops.attention`: SD3 / SD3.5 and FLUX processors.

- :class:`FastgenJointAttnProcessor` replaces diffusers' ``JointAttnProcessor2_0`` (SD3 / SD3.5 MMDiT: joint
  attention over image and text tokens, the self-only ``attn2`` of SD3.5's dual-attention layers, q/k
  ``rms_norm``, ``context_pre_only`` in the last block). diffusers attends with SDPA on (batch, heads, seq,
  head_dim) transposes; fastgen attends on the projections' (batch, seq, heads, head_dim) views.
- :class:`FastgenFluxAttnProcessor` replaces ``FluxAttnProcessor`` (what ``FluxAttnProcessor2_0`` builds
  too): FLUX's double-stream (text + image, separate projections) and single-stream (``pre_only``) blocks,
  rotary embeddings applied to q and k before attention, fused or separate projections. diffusers
  attends through ``dispatch_attention_fn`` on (batch, seq, heads, head_dim), fastgen's own layout.

The math around the attention call follows the diffusers processors step by step; only the attention itself
changes. Both keep the processor they replace (``.original``): it runs while exporting (so the exported
graph is unchanged), for masks that are not key-padding, and goes back on restore (the same object).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from diffusers.models.embeddings import apply_rotary_emb
from torch import nn

from fastgen.ops.optimize import AttentionPolicy, is_exporting, key_padding_from_mask

__all__ = ["DIT_PROCESSORS", "FastgenFluxAttnProcessor", "FastgenJointAttnProcessor", "classify_dit", "replacement_for"]


class FastgenJointAttnProcessor:
    """``JointAttnProcessor2_0`` attending with :func:`fastgen.ops.attention`.

    ``original``: the processor it replaces. ``policy``: backend, strict flag, layer name. Like the
    original, it ignores ``attention_mask`` (SD3 attends over every image and text token).
    """

    def __init__(self, original: Any, policy: AttentionPolicy) -> None:
        self.original = original
        self.policy = policy

    def __repr__(self) -> str:
        return f"FastgenJointAttnProcessor(backend={self.policy.backend!r}, original={type(self.original).__name__})"

    # The signature mirrors JointAttnProcessor2_0's: Attention.forward filters its kwargs by it.
    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, *args: Any, **kwargs: Any) -> Any:
        if is_exporting():
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        batch, seq_img = hidden_states.shape[0], hidden_states.shape[1]
        heads = attn.heads
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = key.shape[-1] // heads
        q = query.view(batch, -1, heads, head_dim)  # (batch, seq_img, heads, head_dim), a view
        k = key.view(batch, -1, heads, head_dim)
        v = value.view(batch, -1, heads, head_dim)
        # The norms act on head_dim (the last axis): the same values as on diffusers' transposes.
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        if encoder_hidden_states is not None:
            cq = attn.add_q_proj(encoder_hidden_states).view(batch, -1, heads, head_dim)  # (batch, seq_txt, ...)
            ck = attn.add_k_proj(encoder_hidden_states).view(batch, -1, heads, head_dim)
            cv = attn.add_v_proj(encoder_hidden_states).view(batch, -1, heads, head_dim)
            if attn.norm_added_q is not None:
                cq = attn.norm_added_q(cq)
            if attn.norm_added_k is not None:
                ck = attn.norm_added_k(ck)
            # Image tokens first, then text: the order of diffusers' concatenation (outputs split the same way).
            q, k, v = torch.cat([q, cq], dim=1), torch.cat([k, ck], dim=1), torch.cat([v, cv], dim=1)

        out = self.policy.attend(q, k, v, mask=None, causal=False, scale=None)  # (batch, seq, heads, head_dim)
        out = out.reshape(batch, -1, heads * head_dim).to(q.dtype)
        if encoder_hidden_states is not None:
            out, context = out[:, :seq_img], out[:, seq_img:]
            if not attn.context_pre_only:
                context = attn.to_add_out(context)
        out = attn.to_out[0](out)  # linear projection
        out = attn.to_out[1](out)  # dropout
        if encoder_hidden_states is not None:
            return out, context
        return out


def _flux_projections(attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None
                      ) -> tuple[torch.Tensor, ...]:
    """(q, k, v, text q, text k, text v), each (batch, seq, heads * head_dim); text ones None if absent."""
    if attn.fused_projections:  # fuse_qkv_projections(): one linear per stream
        q, k, v = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        if encoder_hidden_states is not None and hasattr(attn, "to_added_qkv"):
            return (q, k, v, *attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1))
        return q, k, v, None, None, None
    q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
    if encoder_hidden_states is not None and attn.added_kv_proj_dim is not None:
        return (q, k, v, attn.add_q_proj(encoder_hidden_states), attn.add_k_proj(encoder_hidden_states),
                attn.add_v_proj(encoder_hidden_states))
    return q, k, v, None, None, None


class FastgenFluxAttnProcessor:
    """``FluxAttnProcessor`` attending with :func:`fastgen.ops.attention` instead of ``dispatch_attention_fn``.

    ``original``: the processor it replaces. ``policy``: backend, strict flag, layer name. An
    ``attention_mask`` (key-padding, boolean or additive, ``(batch, seq)`` or 4-d) becomes fastgen's
    key-padding mask; any other mask runs the original for that call.
    """

    def __init__(self, original: Any, policy: AttentionPolicy) -> None:
        self.original = original
        self.policy = policy

    def __repr__(self) -> str:
        return f"FastgenFluxAttnProcessor(backend={self.policy.backend!r}, original={type(self.original).__name__})"

    # The signature mirrors FluxAttnProcessor's: FluxAttention.forward filters its kwargs by it.
    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb: Any = None) -> Any:
        args = (attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        if is_exporting():
            return self.original(*args)
        key_padding = None
        if attention_mask is not None:
            joint = encoder_hidden_states is not None and attn.added_kv_proj_dim is not None
            seq = hidden_states.shape[1] + (encoder_hidden_states.shape[1] if joint else 0)
            found = self._key_padding(attention_mask, hidden_states.shape[0], seq, seq)
            if isinstance(found, str):
                self.policy.fallback(found)
                return self.original(*args)
            key_padding = found
        q, k, v, cq, ck, cv = _flux_projections(attn, hidden_states, encoder_hidden_states)
        hd = attn.head_dim
        # (batch, seq, heads, head_dim): dispatch_attention_fn's layout and fastgen's
        q, k, v = q.unflatten(-1, (-1, hd)), k.unflatten(-1, (-1, hd)), v.unflatten(-1, (-1, hd))
        q, k = attn.norm_q(q), attn.norm_k(k)
        if attn.added_kv_proj_dim is not None:
            cq, ck, cv = cq.unflatten(-1, (-1, hd)), ck.unflatten(-1, (-1, hd)), cv.unflatten(-1, (-1, hd))
            cq, ck = attn.norm_added_q(cq), attn.norm_added_k(ck)
            # Text tokens first, then image: FLUX's order (its rotary table is laid out the same way).
            q, k, v = torch.cat([cq, q], dim=1), torch.cat([ck, k], dim=1), torch.cat([cv, v], dim=1)

        if image_rotary_emb is not None:
            q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
            k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)

        out = self.policy.attend(q, k, v, mask=key_padding, causal=False, scale=None)  # (batch, seq, heads, hd)
        out = out.flatten(2, 3).to(q.dtype)
        if encoder_hidden_states is None:
            return out  # single-stream block (pre_only): its block projects attention and MLP together
        seq_txt = encoder_hidden_states.shape[1]
        context, out = out.split_with_sizes([seq_txt, out.shape[1] - seq_txt], dim=1)
        out = attn.to_out[1](attn.to_out[0](out.contiguous()))  # linear projection, dropout
        return out, attn.to_add_out(context.contiguous())

    @staticmethod
    def _key_padding(mask: torch.Tensor, batch: int, seq_q: int, seq_k: int) -> torch.Tensor | None | str:
        # dispatch_attention_fn's native backend reads a (batch, seq_k) mask as (batch, 1, 1, seq_k); other
        # shapes go to SDPA as they are, which aligns them to (batch, heads, seq_q, seq_k) from the right.
        if mask.dim() == 2 and tuple(mask.shape) == (batch, seq_k):
            mask = mask[:, None, None, :]
        elif mask.dim() < 4:
            mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
        found = key_padding_from_mask(mask, batch, seq_q, seq_k, allow_causal=False)
        return found if isinstance(found, str) else found[0]


@functools.cache
def _replacements() -> dict[type, type]:
    """Original processor class -> the fastgen processor that reproduces it (looked up by exact type)."""
    from diffusers.models.attention_processor import JointAttnProcessor2_0
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    return {JointAttnProcessor2_0: FastgenJointAttnProcessor, FluxAttnProcessor: FastgenFluxAttnProcessor}


DIT_PROCESSORS = (FastgenJointAttnProcessor, FastgenFluxAttnProcessor)


def replacement_for(processor: Any) -> type | None:
    """The fastgen processor class for ``processor`` (exact type), or None."""
    return _replacements().get(type(processor))


def classify_dit(module: nn.Module, base: Any) -> str | None:
    """``"ok"`` or why not, for a module whose (original) processor ``base`` is a DiT processor; None if not."""
    cls = replacement_for(base)
    if cls is None:
        return None
    # A diffusers attention backend or context parallelism chosen on the processor: the user's choice stands.
    if getattr(base, "_attention_backend", None) is not None or getattr(base, "_parallel_config", None) is not None:
        return (f"processor {type(base).__name__} has a diffusers attention backend or parallel config set "
                "(set_attention_backend / enable_parallelism): kept")
    if cls is FastgenJointAttnProcessor:
        if getattr(module, "to_q", None) is None or getattr(module, "to_k", None) is None:
            return "no separate q/k/v projections"
        if getattr(module, "to_out", None) is None:
            return "no output projection (pre_only attention)"
    return "ok"
