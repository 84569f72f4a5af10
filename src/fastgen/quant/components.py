"""Quantizing a whole model component (what ``fastgen.build(..., quantization=...)`` does).

A quantized component keeps its rebuild recipe: ``component.source["quantization"]`` is the
:func:`~fastgen.quant.api.quantization_recipe` of ``component.model``, so a saved torch engine
rebuilds the quantized layers before it loads their int8 / fp8 / packed int4 tensors (no pickle).
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch

from fastgen.core import plugins
from fastgen.quant.api import quantization_recipe, quantize_, quantized_layers
from fastgen.quant.calibration import AMAX_ATTR, ForwardLoop, calibrate, check_calibration
from fastgen.quant.config import QuantConfig

logger = logging.getLogger(__name__)

#: Seeds of the synthetic calibration batches (never the seeds verification or tests draw from).
SYNTHETIC_SEEDS = (9001, 9002, 9003, 9004)


def synthetic_calibration(component: Any) -> list[tuple[torch.Tensor, ...]]:
    """Calibration batches from the component's own spec: random inputs at the profile's opt shape.

    What a build falls back to when no ``calibration`` is given and no registered calibration source
    knows the component (:func:`default_calibration`). These are not the user's data: static scales
    calibrated on them are a starting point, not a tuned model.
    """
    return [tuple(component.spec.sample_inputs("opt", seed=s).values()) for s in SYNTHETIC_SEEDS]


def default_calibration(component: Any) -> ForwardLoop:
    """The calibration of ``component`` when the caller gives none: the first registered calibration
    source (``fastgen.core.plugins`` group ``calibration``: ``source(component) -> forward loop or
    None``) that knows the component, else :func:`synthetic_calibration`.

    The pipelines register one for SD UNets and diffusion transformers (``fastgen.pipelines.calibration``): short denoising
    loops, which reach the activation ranges of real sampling far better than random latents do.
    """
    for name, target in plugins.entries("calibration").items():
        loop = plugins.load(target)(component)
        if loop is not None:
            logger.info("%s: default calibration from the %r source", component.name, name)
            return loop
    return synthetic_calibration(component)


def quantize_component(component: Any, config: QuantConfig, *, calibration: ForwardLoop | None = None,
                       inplace: bool = False) -> Any:
    """``component`` with its model quantized by ``config`` (``DEFAULT_SKIP`` unless the config says
    otherwise); a deep copy unless ``inplace``. Calibrates first when the config needs statistics:
    on ``calibration`` (a forward loop or an iterable of input batches for ``component.module``),
    else on :func:`default_calibration` (logged as a warning). Input batches are checked against the
    component's spec first, before the model is copied or run (:func:`check_calibration`)."""
    if calibration is not None and config.needs_calibration:
        calibration = check_calibration(calibration, component.spec)
    comp = component if inplace else copy.deepcopy(component)
    seen = None
    if config.needs_calibration:
        if calibration is None:
            logger.warning("%s: %s calibrates on its default inputs (denoising loops over random prompt "
                           "embeddings for UNets and DiTs, random batches otherwise); pass calibration= (your own "
                           "batches or a forward loop) for scales that fit real data", comp.name, config.describe())
            calibration = default_calibration(comp)
        calibrate(comp.module, calibration)

        def seen(layer: torch.nn.Module, name: str) -> bool:
            # A model can hold layers this component never runs (a VAE decoder's AutoencoderKL has
            # the encoder too): they have no statistics, and quantizing them would gain nothing.
            return AMAX_ATTR in layer.__dict__
    # Layers are quantized under comp.model (the library model the torch engine saves and rebuilds),
    # so every quantized layer is in the recipe; the wrapper around it holds no weights of its own.
    quantize_(comp.model, config, seen)
    comp.source = {**comp.source, "quantization": quantization_recipe(comp.model)} if comp.source else comp.source
    logger.info("%s: %d layers quantized with %s", comp.name, len(quantized_layers(comp.model)), config.describe())
    return comp


def component_recipe(component: Any) -> dict[str, Any] | None:
    """The quantization recipe of ``component.model`` (None when nothing is quantized)."""
    return quantization_recipe(component.model) or None
