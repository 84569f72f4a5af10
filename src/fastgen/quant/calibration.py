"""``fastgen.calibrate``: record per-channel activation maxima of the layers ``quantize_`` can replace.

SmoothQuant and static (per-tensor) activation scales need to know how large each input channel
of each layer gets on representative data. ``calibrate`` hooks every eligible layer (``nn.Linear``
and 1x1 ``nn.Conv2d``), runs the caller's forward loop, and leaves the running maximum of
``|input|`` per input channel on each layer (``fastgen_act_amax``, fp32 ``(in_features,)``), where
``quantize_`` finds it, even after the layer was moved to another parent.

:func:`check_calibration` validates a list of input batches against a component's spec before any
work (a build loads, copies and calibrates the model before the first malformed batch would fail).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from fastgen.errors import InvalidArgumentError, VerificationError
from fastgen.models.spec import parse_dim

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


_LOOP_KINDS = "a forward loop fn(module), or a non-empty list of input batches"


def check_calibration(calibration: Any, spec: Any = None, argument: str = "calibration") -> ForwardLoop:
    """``calibration`` checked before any work, one line naming the first bad batch (``calibration[i]``).

    A callable (a forward loop) is returned as it is. Anything else must be a non-empty iterable of
    batches, returned as a list (a one-shot iterator is read here, once). With ``spec`` (the
    component's :class:`~fastgen.models.spec.ExportSpec`; its module takes the inputs positionally,
    in order) every batch must be the inputs: a tuple / list of them, a dict by input name, or one
    tensor for a one-input component; each a ``torch.Tensor`` of the spec's rank, float where the spec
    is float (and finite) and integer where it is not, its static dims equal and its symbolic dims
    consistent across the inputs (one batch size, one image size).
    """
    if callable(calibration):
        return calibration
    if isinstance(calibration, (str, bytes, Mapping)) or not isinstance(calibration, Iterable):
        raise InvalidArgumentError(argument, type(calibration).__name__, _LOOP_KINDS)
    batches = list(calibration)
    if not batches:
        raise InvalidArgumentError(argument, "an empty list", _LOOP_KINDS)
    if spec is not None:
        for i, batch in enumerate(batches):
            _check_batch(batch, spec, f"{argument}[{i}]")
    return batches


def _check_batch(batch: Any, spec: Any, where: str) -> None:
    names = list(spec.input_names)
    expected = ", ".join(f"{t.name} {t.dtype} {tuple(t.shape)}" for t in spec.inputs)
    allowed = f"the {spec.component} inputs ({expected}): a tuple, a dict by name" + (
        ", or one tensor" if len(names) == 1 else "")
    if isinstance(batch, Mapping):
        if sorted(map(str, batch)) != sorted(names):
            raise InvalidArgumentError(where, f"a dict of {sorted(map(str, batch))}", allowed)
        values = [batch[n] for n in names]
    elif isinstance(batch, (tuple, list)):
        if len(batch) != len(names):
            raise InvalidArgumentError(where, f"{len(batch)} inputs", allowed)
        values = list(batch)
    elif isinstance(batch, torch.Tensor) and len(names) == 1:
        values = [batch]
    else:
        raise InvalidArgumentError(where, type(batch).__name__, allowed)
    roots: dict[str, int] = {}
    for t, value in zip(spec.inputs, values):
        if not isinstance(value, torch.Tensor):
            raise InvalidArgumentError(where, f"{t.name}: {type(value).__name__}", allowed)
        is_float = t.dtype.startswith(("float", "bfloat"))
        shape = tuple(value.shape)
        if value.is_floating_point() != is_float or value.dim() != len(t.shape):
            raise InvalidArgumentError(where, f"{t.name}: {value.dtype} {shape}", allowed)
        for entry, size in zip(t.shape, shape):
            parsed = parse_dim(entry)
            root = size if parsed is None else size * parsed[1]
            if (parsed is None and size != entry) or (parsed is not None and roots.setdefault(parsed[0], root) != root):
                raise InvalidArgumentError(where, f"{t.name}: {value.dtype} {shape}", allowed,
                                           reason="a static dim differs, or dims of one symbol disagree")
        if is_float and not bool(torch.isfinite(value).all()):
            raise InvalidArgumentError(where, f"{t.name}: {value.dtype} {shape}",
                                       reason="holds NaN or inf: statistics from it would be meaningless")


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
