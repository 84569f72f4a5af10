"""transformers attention through :func:`fastgen.ops.attention`, registered as the ``"fastgen"`` implementation.

transformers (>= 4.48) looks up each attention layer's function in ``ALL_ATTENTION_FUNCTIONS`` (an
``AttentionInterface`` since 4.50) by ``config._attn_implementation``; :func:`fastgen_attention_forward` is
registered there as ``"fastgen"``
(and, where transformers has ``AttentionMaskInterface``, SDPA's mask builder under the same name, so
the model builds exactly the masks it builds for ``sdpa``). The config is shared by all layers of a model,
so each layer's own settings live on the layer: ``module._fastgen_attention`` (:class:`LayerState`) holds
its policy (backend, strict; None for an excluded layer, which runs its original implementation) and the
implementation to restore (``sdpa`` or ``eager``).

Per call, the 4-d mask transformers passes (boolean or additive, or None with ``is_causal``) becomes a
key-padding mask + causal flag when that is exact (checked on the values, see
:func:`~fastgen.ops.optimize.key_padding_from_mask`); otherwise, and for features the fused kernel does
not have (dropout while training, grouped KV heads, ALiBi/position bias, soft-capping, sliding windows,
sinks, paged caches), the call runs transformers' SDPA function. While tracing for export every layer
runs its original implementation.
"""

from __future__ import annotations

import functools
import inspect
import sys
from dataclasses import dataclass
from typing import Any

import torch
import transformers
from torch import nn
from transformers import modeling_utils

from fastgen.ops.optimize import AttentionPolicy, is_exporting, key_padding_from_mask

__all__ = ["IMPLEMENTATION", "STATE_ATTR", "LayerState", "apply", "classify", "fastgen_attention_forward", "notes",
           "register"]

IMPLEMENTATION = "fastgen"
STATE_ATTR = "_fastgen_attention"
#: Implementations a layer may start from (their math is what fastgen reproduces).
REPLACEABLE = ("sdpa", "eager")
_UNSERVED_KWARGS = ("position_bias", "softcap", "sliding_window", "s_aux", "sinks", "cache", "head_mask")
# transformers 4.48/4.49 hold a plain dict here, 4.50+ an AttentionInterface; older versions have neither.
_FUNCTIONS = getattr(modeling_utils, "ALL_ATTENTION_FUNCTIONS", None)
_HAS_INTERFACE = _FUNCTIONS is not None
_PreTrainedConfig = getattr(transformers, "PreTrainedConfig", None) or transformers.PretrainedConfig
_MISSING = object()


@dataclass
class LayerState:
    """What ``optimize`` stored on one attention layer."""

    policy: AttentionPolicy | None
    """Backend, strict flag and name; None for an excluded layer (runs ``original``)."""
    original: str | None
    """The config's ``_attn_implementation`` before optimize (restored on ``attention=None``)."""


@functools.cache
def register() -> None:
    """Register ``"fastgen"`` with transformers' attention (and mask) interfaces; idempotent."""
    if hasattr(transformers, "AttentionInterface"):
        transformers.AttentionInterface.register(IMPLEMENTATION, fastgen_attention_forward)
    else:
        _FUNCTIONS[IMPLEMENTATION] = fastgen_attention_forward
    try:
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    except ImportError:  # < 4.53: models build their masks themselves (additive for unknown implementations)
        return
    AttentionMaskInterface.register(IMPLEMENTATION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


# --- running ---------------------------------------------------------------------------------------------------

def _sdpa(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: Any,
          scaling: float | None, dropout: float, **kwargs: Any) -> tuple[torch.Tensor, Any]:
    fn = _FUNCTIONS["sdpa"]
    return fn(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)


def _causal(module: nn.Module, kwargs: dict[str, Any]) -> bool:
    # transformers' SDPA rule: the is_causal kwarg, else the module's flag (default True).
    flag = kwargs.get("is_causal")
    return bool(flag if flag is not None else getattr(module, "is_causal", True))


def _eager(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: Any,
           scaling: float | None, dropout: float, **kwargs: Any) -> tuple[torch.Tensor, Any]:
    """The model file's own eager function, with the SDPA-style mask turned into eager's additive one."""
    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if fn is None:
        return _sdpa(module, query, key, value, mask, scaling, dropout, **kwargs)
    sq, sk = query.shape[2], key.shape[2]
    if mask is None and sq > 1 and _causal(module, kwargs):  # SDPA skipped materialising a causal mask
        i = torch.arange(sq, device=query.device)[:, None]
        j = torch.arange(sk, device=query.device)[None, :]
        mask = (j <= i + (sk - sq))[None, None]
    if isinstance(mask, torch.Tensor) and mask.dtype == torch.bool:
        bias = torch.zeros(mask.shape, dtype=query.dtype, device=query.device)
        mask = bias.masked_fill(~mask, torch.finfo(query.dtype).min)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    return fn(module, query, key, value, mask, scaling=scaling, dropout=dropout, **kwargs)


def _original(state: LayerState | None, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, Any]:
    impl = state.original if state is not None else "sdpa"
    return _eager(*args, **kwargs) if impl in (None, "eager") else _sdpa(*args, **kwargs)


def _unserved(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: Any,
              dropout: float, kwargs: dict[str, Any]) -> str | None:
    """A feature of this call that the fused attention does not have, or None."""
    if dropout:
        return f"attention dropout {dropout} (training mode)"
    if key.shape[1] != query.shape[1] or getattr(module, "num_key_value_groups", 1) != 1:
        return "grouped key/value heads"
    if value.shape[-1] != query.shape[-1] or key.shape[-1] != query.shape[-1]:
        return "different q/k/v head dims"
    if value.shape[2] != key.shape[2]:
        return "different key and value lengths"
    for name in _UNSERVED_KWARGS:
        if kwargs.get(name) is not None:
            return f"{name!r}"
    if mask is not None and not isinstance(mask, torch.Tensor):
        return f"mask type {type(mask).__name__}"
    return None


def fastgen_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                              attention_mask: torch.Tensor | None, scaling: float | None = None,
                              dropout: float = 0.0, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention function: q/k/v ``(batch, heads, seq, head_dim)``; returns ``(batch, seq, heads, head_dim)``.

    A layer without fastgen state (a model loaded with ``attn_implementation="fastgen"``) uses the
    automatic backend choice of :func:`fastgen.ops.attention`.
    """
    state = getattr(module, STATE_ATTR, None)
    args = (module, query, key, value, attention_mask, scaling, dropout)
    if (state is not None and state.policy is None) or is_exporting():
        return _original(state, *args, **kwargs)
    if state is None:
        state = LayerState(AttentionPolicy(type(module).__name__, "auto"), "sdpa")
        setattr(module, STATE_ATTR, state)
    policy = state.policy
    reason = _unserved(module, query, key, value, attention_mask, dropout, kwargs)
    batch, _, sq, _ = query.shape
    sk = key.shape[2]
    if reason is None:
        if attention_mask is None:
            key_padding, causal = None, sq > 1 and _causal(module, kwargs)
            if causal and sq != sk:  # SDPA's is_causal aligns to the top-left, fastgen's to the end
                reason = f"causal attention with seq_q {sq} != seq_k {sk} and no mask"
        else:
            found = key_padding_from_mask(attention_mask, batch, sq, sk, allow_causal=True)
            if isinstance(found, str):
                reason = found
            else:
                key_padding, causal = found
    if reason is not None:
        policy.fallback(reason)
        return _sdpa(*args, **kwargs)
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # (batch, seq, heads, head_dim) views
    out = policy.attend(q, k, v, mask=key_padding, causal=causal, scale=scaling)
    return out, None


# --- installing ------------------------------------------------------------------------------------------------

@functools.cache
def _routes_through_interface(cls: type) -> bool:
    """Whether ``cls.forward`` picks its attention function from ``ALL_ATTENTION_FUNCTIONS``."""
    try:
        return "ALL_ATTENTION_FUNCTIONS" in inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False


def _impl(config: Any) -> str | None:
    return getattr(config, "_attn_implementation_internal", getattr(config, "_attn_implementation", None))


def _set_impl(config: Any, value: str | None) -> None:
    # Set the config's own value only (the public setter also rewrites sub-configs).
    if hasattr(config, "_attn_implementation_internal"):
        config._attn_implementation_internal = value
    else:
        config._attn_implementation = value


def classify(module: nn.Module) -> str | None:
    """``"ok"`` for an attention layer served through ``AttentionInterface``, a reason to keep one, else None."""
    if not _HAS_INTERFACE or isinstance(module, transformers.PreTrainedModel):
        return None
    config = getattr(module, "config", None)
    if not isinstance(config, _PreTrainedConfig) or not _routes_through_interface(type(module)):
        return None
    state = getattr(module, STATE_ATTR, None)
    impl = state.original if state is not None and _impl(config) == IMPLEMENTATION else _impl(config)
    if impl not in (*REPLACEABLE, None):
        return f"attn_implementation {impl!r} is kept (fastgen replaces {' and '.join(REPLACEABLE)})"
    return "ok"


def notes(targets: Any) -> list[tuple[str, str]]:
    """Models left alone because this transformers has no attention-function registry (< 4.48)."""
    if _HAS_INTERFACE:
        return []
    found = []
    for prefix, root in targets:
        for name, module in root.named_modules():
            if isinstance(module, transformers.PreTrainedModel):
                full = f"{prefix}.{name}" if prefix and name else prefix or name or type(module).__name__
                found.append((full, f"transformers {transformers.__version__} has no attention-function "
                                    "registry (fastgen needs >= 4.48)"))
                break
    return found


def apply(entries: list[tuple[str, nn.Module, str | None]], backend: str | None, strict: bool) -> dict[str, Any]:
    """Install or restore, one config at a time (a config's layers share its ``_attn_implementation``)."""
    layers: dict[str, str] = {}
    skipped: dict[str, str] = {}
    restored: list[str] = []
    groups: dict[int, list[tuple[str, nn.Module, str | None]]] = {}
    for entry in entries:
        groups.setdefault(id(entry[1].config), []).append(entry)
    for group in groups.values():
        config = group[0][1].config
        states = [getattr(m, STATE_ATTR, None) for _, m, _ in group]
        current = _impl(config)
        original = next((s.original for s in states if s is not None), _MISSING) \
            if current == IMPLEMENTATION else current
        if original is _MISSING:  # loaded as "fastgen" by the user: the SDPA masks it builds suit sdpa
            original = "sdpa"
        if backend is not None:
            for name, _, reason in group:
                if reason is not None:
                    skipped[name] = reason
        serve = backend is not None and any(reason is None for _, _, reason in group)
        if serve:
            register()
            for (name, module, reason), state in zip(group, states):
                policy = AttentionPolicy(name, backend, strict) if reason is None else None
                if policy is not None:
                    layers[name] = backend
                elif state is not None and state.policy is not None:  # newly excluded: back to the original
                    restored.append(name)
                setattr(module, STATE_ATTR, LayerState(policy, original))
            _set_impl(config, IMPLEMENTATION)
            continue
        for (name, module, _), state in zip(group, states):
            if state is not None:
                if state.policy is not None:
                    restored.append(name)
                delattr(module, STATE_ATTR)
        if current == IMPLEMENTATION:
            _set_impl(config, original)
    return {"layers": layers, "skipped": skipped, "restored": restored}

