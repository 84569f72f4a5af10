"""``fastgen.calibrate``: record per-channel activation maxima of the layers ``quantize_`` can replace.

SmoothQuant and static (per-tensor) activation scales need to know how large each input channel
of each layer gets on representative data. ``calibrate`` hooks every eligible layer (``nn.Linear``
and 1x1 ``nn.Conv2d``), runs the caller's forward loop, and leaves the running maximum of
``|input|`` per input channel on each layer (``fastgen_act_amax``, fp32 ``(in_features,)``), where
``quantize_`` finds it, even after the layer was moved to another parent.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from fastgen.errors import InvalidArgumentError, VerificationError

logger = logging.getLogger(__name__)

#: Attribute holding a layer's per-input-channel activation maxima (fp32 ``(in_features,)``).
AMAX_ATTR = "fastgen_act_amax"
#: Attribute counting the forward calls a layer's statistics come from.
CALLS_ATTR = "fastgen_act_calls"

ForwardLoop = Callable[[nn.Module], Any] | Iterable[Any]


def calibration_layers(module: nn.Module, filter_fn: Callable[[nn.Module, str], bool] | None = None
                       ) -> list[tuple[str, nn.Module]]:
    """``(name, layer)`` of every float layer ``quantize_`` could replace, that ``filter_fn`` accepts."""
    from fastgen.quant.modules import quantized_module_for

    return [(name, m) for name, m in module.named_modules()
            if quantized_module_for(m) is not None and (filter_fn is None or filter_fn(m, name))]


def _channel_amax(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """max |x| per input channel of ``layer`` (fp32, ``(in_features,)``)."""
    x = x.detach()
    if isinstance(layer, nn.Conv2d):  # (batch, C, H, W); a strided 1x1 conv reads every s-th pixel only
        sh, sw = layer.stride
        x = x[:, :, ::sh, ::sw].transpose(0, 1).reshape(x.shape[1], -1)  # (C, pixels)
        return x.abs().amax(dim=1).float()
    return x.reshape(-1, x.shape[-1]).abs().amax(dim=0).float()  # (K,)


def _run_loop(module: nn.Module, forward_loop: ForwardLoop) -> None:
    if callable(forward_loop):
        forward_loop(module)
        return
    try:
        batches = iter(forward_loop)
    except TypeError:
        raise InvalidArgumentError("forward_loop", type(forward_loop).__name__,
                                   "a callable taking the module, or an iterable of inputs") from None
    for batch in batches:
        if isinstance(batch, dict):
            module(**batch)
        elif isinstance(batch, (tuple, list)):
            module(*batch)
        else:
            module(batch)


def calibrate(module: nn.Module, forward_loop: ForwardLoop, *,
              filter_fn: Callable[[nn.Module, str], bool] | None = None, reset: bool = True) -> dict[str, torch.Tensor]:
    """Record activation statistics for :func:`fastgen.quantize_` (SmoothQuant, static scales).

    ``forward_loop``: a callable run as ``forward_loop(module)`` (it feeds representative inputs, e.g.
    a few denoising loops), or an iterable of inputs (a tuple is passed positionally, a dict as
    keyword arguments, anything else as the single argument). ``filter_fn(layer, name)`` limits
    which layers are observed. ``reset=False`` keeps maxima from an earlier call and extends them.
    Runs without autograd; the module is otherwise untouched (hooks are removed, even on error).
    Returns ``{layer name: amax (in_features,)}``.
    """
    if not isinstance(module, nn.Module):
        raise InvalidArgumentError("module", type(module).__name__, "a torch.nn.Module")
    layers = calibration_layers(module, filter_fn)
    if not layers:
        raise InvalidArgumentError("filter_fn" if filter_fn is not None else "module", type(module).__name__,
                                   reason="no nn.Linear or 1x1 nn.Conv2d layer to calibrate")
    if reset:
        for _, layer in layers:
            for attr in (AMAX_ATTR, CALLS_ATTR):
                if attr in layer.__dict__:
                    delattr(layer, attr)

    def hook(layer: nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else next(iter(kwargs.values()), None)
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            return
        amax = _channel_amax(layer, x)
        old = layer.__dict__.get(AMAX_ATTR)
        layer.__dict__[AMAX_ATTR] = amax if old is None else torch.maximum(old, amax)
        layer.__dict__[CALLS_ATTR] = layer.__dict__.get(CALLS_ATTR, 0) + 1

    handles = [layer.register_forward_pre_hook(hook, with_kwargs=True) for _, layer in layers]
    try:
        with torch.no_grad():
            _run_loop(module, forward_loop)
    finally:
        for h in handles:
            h.remove()

    stats = {name: layer.__dict__[AMAX_ATTR] for name, layer in layers if AMAX_ATTR in layer.__dict__}
    bad = [name for name, amax in stats.items() if not bool(torch.isfinite(amax).all())]
    if bad:
        raise VerificationError(f"calibration saw non-finite activations in {len(bad)} layer(s), first {bad[0]!r}")
    unseen = [name for name, _ in layers if name not in stats]
    if unseen:
        logger.warning("calibration: %d of %d layers never ran (first %r); quantize_ configs that need "
                       "statistics will refuse them", len(unseen), len(layers), unseen[0])
    logger.info("calibrated %d layers", len(stats))
    return stats


def activation_amax(layer: nn.Module) -> torch.Tensor | None:
    """The per-channel maxima ``calibrate`` left on ``layer`` (None if it was never observed)."""
    return layer.__dict__.get(AMAX_ATTR)
