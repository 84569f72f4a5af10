"""``fastgen.quantize_``: swap a module's linear layers for quantized ones, in place (torchao-style).

Rules, in the order they apply to each ``nn.Linear`` / 1x1 ``nn.Conv2d`` under ``module``:

1. ``filter_fn(layer, name)`` (when given) must return True;
2. the name must not match the config's skip patterns (``DEFAULT_SKIP`` unless ``skip`` is given);
3. int4: a layer whose ``in_features`` the group size does not divide stays in float (logged at
   INFO level): models mix sizes (CLIP's 37-wide tiny MLP), and one odd layer should not make a
   whole model unquantizable;
4. SmoothQuant / static configs: the layer must have ``fastgen.calibrate`` statistics, else
   :class:`InvalidArgumentError` names the first layer without them;
5. the layer's weight and bias must be finite, else :class:`InvalidArgumentError` names the layer: an
   int8 / int4 code has no NaN, so quantizing would hide a broken weight as finite garbage.

Idempotence: a layer already quantized with the same config (skip list aside) is left as it is, so
calling ``quantize_`` twice is a no-op; one quantized with a different config raises
:class:`InvalidArgumentError` (dequantize it first). Nothing is modified unless every check passes,
and a call that matches no layer at all raises :class:`InvalidArgumentError`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from fastgen.errors import InvalidArgumentError
from fastgen.quant.calibration import AMAX_ATTR
from fastgen.quant.config import QuantConfig, check_config
from fastgen.quant.modules import QuantConv1x1, QuantLinear, quantized_module_for

logger = logging.getLogger(__name__)

FilterFn = Callable[[nn.Module, str], bool]


@dataclasses.dataclass
class _Plan:
    """What one ``quantize_`` call will do (decided completely before anything is changed)."""

    swap: dict[int, tuple[str, nn.Module, type[QuantLinear]]] = dataclasses.field(default_factory=dict)
    already: list[str] = dataclasses.field(default_factory=list)
    skipped: list[str] = dataclasses.field(default_factory=list)
    indivisible: list[str] = dataclasses.field(default_factory=list)
    uncalibrated: list[str] = dataclasses.field(default_factory=list)


def _with_skip(config: QuantConfig, skip: Iterable[str] | None) -> QuantConfig:
    if skip is None:
        return config
    if isinstance(skip, str):
        skip = (skip,)
    return dataclasses.replace(config, skip=tuple(skip))


def _plan(module: nn.Module, config: QuantConfig, filter_fn: FilterFn | None) -> _Plan:
    plan = _Plan()
    for name, layer in module.named_modules():
        quantized = isinstance(layer, QuantLinear)
        cls = None if quantized else quantized_module_for(layer)
        if not quantized and cls is None:
            continue
        if filter_fn is not None and not filter_fn(layer, name):
            continue
        if config.skips(name):
            plan.skipped.append(name)
            continue
        if quantized:
            if not layer.config.same_math(config):
                raise InvalidArgumentError(
                    "config", config.describe(),
                    reason=f"layer {name!r} is already quantized with {layer.config.describe()}; "
                           "dequantize it first (fastgen.quant.dequantize_) or quantize a fresh module")
            plan.already.append(name)
            continue
        k = layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels
        if config.group_size is not None and (k % config.group_size or k % 2):
            plan.indivisible.append(name)
            continue
        if config.needs_calibration and layer.__dict__.get(AMAX_ATTR) is None:
            plan.uncalibrated.append(name)
            continue
        if name == "":
            raise InvalidArgumentError("module", type(module).__name__,
                                       reason="quantize_ replaces child layers; wrap the layer in a container "
                                              "or use QuantLinear.from_float")
        _check_finite(module, name, layer)
        plan.swap[id(layer)] = (name, layer, cls)  # type: ignore[assignment]
    return plan


def _check_finite(module: nn.Module, name: str, layer: nn.Module) -> None:
    """Refuse a layer whose weight or bias holds a NaN or an infinity (one line naming it)."""
    for what in ("weight", "bias"):
        param = getattr(layer, what, None)
        if (isinstance(param, torch.Tensor) and param.device.type != "meta"  # meta: shapes only, no values
                and not bool(torch.isfinite(param.detach()).all())):
            count = int((~torch.isfinite(param.detach())).sum())
            raise InvalidArgumentError(
                "module", type(module).__name__,
                reason=f"layer {name!r} has {count} non-finite {what} value(s) (NaN or inf), which quantization "
                       "would hide (an int8 code has no NaN): fix the weights, or keep the layer in float "
                       "(skip=, filter_fn=)")


def _replace_all(module: nn.Module, new: dict[int, nn.Module]) -> None:
    """Point every parent of each old layer (shared layers have several) at its replacement."""
    for parent in module.modules():
        for attr, child in list(parent._modules.items()):
            if child is not None and id(child) in new:
                setattr(parent, attr, new[id(child)])


def quantize_(module: nn.Module, config: QuantConfig | dict[str, Any], filter_fn: FilterFn | None = None, *,
              skip: Iterable[str] | None = None) -> nn.Module:
    """Quantize ``module``'s ``nn.Linear`` and 1x1 ``nn.Conv2d`` layers in place; returns ``module``.

    ``config``: an ``Int8WeightOnlyConfig``, ``Int4WeightOnlyConfig``, ``Int8DynamicConfig``,
    ``Int8StaticConfig`` or ``Fp8DynamicConfig`` (or its ``to_dict()``). ``filter_fn(layer, name)``
    selects layers (names are relative to ``module``). ``skip``: fnmatch patterns of layer names kept
    in float, replacing the config's list (``DEFAULT_SKIP`` when neither gives one; ``()`` for none).
    See the module docstring for the rules and errors.
    """
    config = _with_skip(check_config(config), skip)
    if not isinstance(module, nn.Module):
        raise InvalidArgumentError("module", type(module).__name__, "a torch.nn.Module")
    plan = _plan(module, config, filter_fn)
    if plan.uncalibrated:
        raise InvalidArgumentError(
            "config", config.describe(),
            reason=f"needs activation statistics, none for {len(plan.uncalibrated)} layer(s) (first "
                   f"{plan.uncalibrated[0]!r}): run fastgen.calibrate(module, forward_loop) first")
    if not plan.swap and not plan.already:
        what = "filter_fn and skip list" if filter_fn is not None else "skip list"
        detail = (f"{len(plan.indivisible)} layer(s) with in_features not divisible by group_size="
                  f"{config.group_size}" if plan.indivisible else f"{len(plan.skipped)} skipped by name")
        raise InvalidArgumentError(
            "filter_fn" if filter_fn is not None else "module", type(module).__name__,
            reason=f"no nn.Linear or 1x1 nn.Conv2d layer matched the {what} ({detail})")

    new = {key: cls.from_float(layer, config, act_amax=layer.__dict__.get(AMAX_ATTR)).train(layer.training)
           for key, (name, layer, cls) in plan.swap.items()}
    _replace_all(module, new)
    convs = sum(isinstance(m, QuantConv1x1) for m in new.values())
    logger.info("quantize_ %s: %d layers quantized (%d 1x1 convs), %d already quantized, %d skipped by name, "
                "%d left in float (in_features not divisible by group size)", config.describe(), len(new), convs,
                len(plan.already), len(plan.skipped), len(plan.indivisible))
    for name in plan.indivisible:
        logger.info("quantize_: %s stays in float: in_features not divisible by group_size=%s", name,
                    config.group_size)
    return module


def quantized_layers(module: nn.Module) -> dict[str, QuantLinear]:
    """``{name: layer}`` of the quantized layers under ``module``."""
    return {name: m for name, m in module.named_modules() if isinstance(m, QuantLinear)}


def dequantize_(module: nn.Module, filter_fn: FilterFn | None = None) -> nn.Module:
    """Swap quantized layers back for float ones (with the dequantized weights), in place."""
    layers = {id(m): m for name, m in quantized_layers(module).items() if filter_fn is None or filter_fn(m, name)}
    if "" in quantized_layers(module):
        raise InvalidArgumentError("module", type(module).__name__, reason="the root is a quantized layer: "
                                   "call its .dequantize()")
    _replace_all(module, {key: m.dequantize() for key, m in layers.items()})
    return module


def quantization_recipe(module: nn.Module) -> dict[str, dict[str, Any]]:
    """JSON description of where and how ``module`` is quantized: ``{layer name: {"kind", "config",
    ...}}``. With the state dict it rebuilds the module (:func:`apply_quantization_recipe`); an
    engine cache key must include it (Int8WeightOnly and Int8Dynamic layers have identical buffers)."""
    recipe: dict[str, dict[str, Any]] = {}
    for name, layer in quantized_layers(module).items():
        entry: dict[str, Any] = {"kind": "conv1x1" if isinstance(layer, QuantConv1x1) else "linear",
                                 "config": layer.config.to_dict()}
        if isinstance(layer, QuantConv1x1):
            entry["stride"] = list(layer.stride)
        recipe[name] = entry
    return recipe


def apply_quantization_recipe(module: nn.Module, recipe: dict[str, dict[str, Any]]) -> nn.Module:
    """Replace the float layers a :func:`quantization_recipe` names with empty quantized layers of
    the same shapes, in place, ready for ``load_state_dict`` of the quantized module's state."""
    from fastgen.quant.config import config_from_dict

    new: dict[int, nn.Module] = {}
    for name, entry in recipe.items():
        try:
            layer = module.get_submodule(name)
        except AttributeError:
            raise InvalidArgumentError("recipe layer", name, reason="no such submodule") from None
        config = config_from_dict(entry["config"])
        if isinstance(layer, QuantLinear):
            if not layer.config.same_math(config):
                raise InvalidArgumentError("recipe", name, reason=f"already quantized with {layer.config.describe()}")
            continue
        cls = quantized_module_for(layer)
        if cls is None or (entry.get("kind") == "conv1x1") != (cls is QuantConv1x1):
            raise InvalidArgumentError("recipe layer", name, reason=f"{type(layer).__name__} does not match "
                                       f"kind {entry.get('kind')!r}")
        w = layer.weight
        if cls is QuantConv1x1:
            q = QuantConv1x1(layer.in_channels, layer.out_channels, config, stride=tuple(layer.stride),
                             bias=layer.bias is not None, device=w.device, dtype=w.dtype)
        else:
            q = QuantLinear(layer.in_features, layer.out_features, config, bias=layer.bias is not None,
                            device=w.device, dtype=w.dtype)
        new[id(layer)] = q.train(layer.training)
    _replace_all(module, new)
    return module
