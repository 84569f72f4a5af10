"""Turn library models into :class:`Component` s: a positional-in, tuple-out wrapper plus an export spec.

:func:`adapt` picks the adapter from the model's class:

- diffusers ``UNet2DConditionModel``: ``unet`` (SD 1.x/2.x; SDXL when ``addition_embed_type`` is
  ``text_time``, with ``text_embeds`` and ``time_ids`` inputs);
- diffusers ``UNet2DModel``: ``unet`` in pixel space (latent factor 1);
- diffusers ``AutoencoderKL``: ``vae-decoder`` (the default) or ``vae-encoder``;
- diffusers ``ControlNetModel``: ``controlnet`` (residuals out); a ``UNet2DConditionModel`` also offers
  ``unet-controlled``, which takes them in (see ``models.adapters_controlnet``);
- transformers ``CLIPTextModel`` / ``CLIPTextModelWithProjection``: ``text-encoder`` or ``text-encoder-2``;
- transformers ``*ForSequenceClassification``: ``text-classifier`` (alias ``classifier``);
- transformers ``*ForImageClassification``: ``classifier``;
- other transformers text models (BERT, T5 encoder...): ``text-encoder`` with an attention mask;
- any other ``nn.Module`` (torchvision, timm, your own): ``classifier``, NCHW images to logits.

Wrappers take the spec's inputs positionally and return a tuple, so they trace with the TorchScript
ONNX exporter with the spec's dynamic axes; nothing shape-dependent is computed in Python.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from fastgen.errors import InvalidArgumentError, UnsupportedError
from fastgen.models.component import Component
from fastgen.models.spec import DimRange, ExportSpec, ShapeProfile, TensorSpec

logger = logging.getLogger(__name__)

#: Every component name fastgen knows, in pipeline order.
COMPONENT_NAMES = ("unet", "vae-decoder", "vae-encoder", "text-encoder", "text-encoder-2",
                   "classifier", "text-classifier", "controlnet", "unet-controlled", "transformer", "text-encoder-3")

# Builder: (model, component or None, latent_factor, image_size) -> (name, wrapper, spec)
Builder = Callable[[nn.Module, str | None, int, int | None], tuple[str, nn.Module, ExportSpec]]


# --- helpers shared by the adapters --------------------------------------------------------------

def scaled(symbol: str, factor: int) -> str:
    """The shape entry of a root symbol divided by ``factor`` (``height``, ``height/8``)."""
    return symbol if factor == 1 else f"{symbol}/{factor}"


def image_range(opt: int, unit: int) -> DimRange:
    """min/opt/max of an image side around a nominal size, all multiples of ``unit``.

    Half to double the nominal size, the max capped at +512 px so SDXL-sized models stay at
    512:1024:1536 (sd15: 256:512:1024; tiny: 32:64:128).
    """
    opt = max(unit, round(opt / unit) * unit)
    lo = max(unit, (opt // 2) // unit * unit)
    hi = max(opt, min(2 * opt, opt + 512) // unit * unit)
    return DimRange(lo, opt, hi)


def config_value(config: Any, name: str, default: Any = None) -> Any:
    """``config.name`` for both diffusers (FrozenDict with attributes) and transformers configs."""
    value = getattr(config, name, None)
    if value is None and isinstance(config, dict):
        value = config.get(name)
    return default if value is None else value


def first_output(out: Any) -> torch.Tensor:
    """The logits of a classifier's output: a tensor, an object with ``.logits``, or a tuple's first item."""
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise UnsupportedError(f"classifier output of type {type(out).__name__} is not a tensor, "
                           "a tuple starting with one, or an object with .logits")


def choose(component: str | None, allowed: tuple[str, ...], aliases: dict[str, str] | None = None) -> str:
    """Resolve a requested component name against what a model offers (first is the default)."""
    if component is None:
        return allowed[0]
    component = (aliases or {}).get(component, component)
    if component not in allowed:
        raise InvalidArgumentError("component", component, allowed)
    return component


# --- custom image classifiers --------------------------------------------------------------------

class ImageClassifierWrapper(nn.Module):
    """``pixel_values`` (batch, C, H, W) -> ``(logits,)`` (batch, num_labels) for any module."""

    def __init__(self, model: nn.Module, hf: bool = False) -> None:
        super().__init__()
        self.model = model
        self.hf = hf

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor]:
        out = self.model(pixel_values=pixel_values) if self.hf else self.model(pixel_values)
        return (first_output(out),)


def image_classifier_spec(model_type: str, channels: int, num_labels: int,
                          height: int, width: int) -> ExportSpec:
    """Spec of an NCHW image classifier; height/width are symbolic but pinned (min = opt = max)."""
    return ExportSpec(
        component="classifier",
        inputs=(TensorSpec("pixel_values", "float32", ("batch", channels, "height", "width")),),
        outputs=(TensorSpec("logits", "float32", ("batch", num_labels)),),
        profile=ShapeProfile({"batch": DimRange(1, 8, 32), "height": DimRange(height, height, height),
                              "width": DimRange(width, width, width)}),
        model_type=model_type,
    )


def _module_device_dtype(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    for p in module.parameters():
        if p.is_floating_point():
            return p.device, p.dtype
    return torch.device("cpu"), torch.float32


def adapt_custom_classifier(model: nn.Module, component: str | None, latent_factor: int,
                            image_size: int | None) -> tuple[str, nn.Module, ExportSpec]:
    """Any module from NCHW images to logits; the label count comes from one probe forward."""
    name = choose(component, ("classifier",))
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    channels = conv.in_channels if conv is not None else 3
    size = image_size or 224
    wrapper = ImageClassifierWrapper(model).eval()
    device, dtype = _module_device_dtype(model)
    if device.type == "meta":
        raise UnsupportedError("cannot adapt a custom classifier on the meta device (its label count "
                               "is read from a probe forward)")
    with torch.inference_mode():
        (logits,) = wrapper(torch.zeros(1, channels, size, size, device=device, dtype=dtype))
    if logits.dim() != 2 or logits.shape[0] != 1:
        raise UnsupportedError(f"{type(model).__name__} returned logits of shape {tuple(logits.shape)} for "
                               f"one image; the classifier adapter needs (batch, num_labels)")
    return name, wrapper, image_classifier_spec(type(model).__name__, channels, logits.shape[1], size, size)


# --- dispatch ------------------------------------------------------------------------------------

def _library(model: nn.Module) -> str | None:
    """``diffusers`` / ``transformers`` for their model classes, else None (no import of either)."""
    module = type(model).__module__
    if module.startswith("diffusers."):
        import diffusers

        return "diffusers" if isinstance(model, diffusers.ModelMixin) else None
    if module.startswith("transformers."):
        import transformers

        return "transformers" if isinstance(model, transformers.PreTrainedModel) else None
    return None


def _builder(model: nn.Module) -> Builder:
    library = _library(model)
    if library == "diffusers":
        from fastgen.models import adapters_diffusers

        return adapters_diffusers.builder_for(model)
    if library == "transformers":
        from fastgen.models import adapters_transformers

        return adapters_transformers.builder_for(model)
    return adapt_custom_classifier


def source_recipe(model: nn.Module, adapter: dict[str, Any]) -> dict[str, Any]:
    """The JSON recipe to rebuild ``model`` (see :func:`fastgen.models.rebuild_component`).

    Empty unless the model's class is exactly a public diffusers / transformers model class (a
    user subclass of one could not be rebuilt by name).
    """
    library = _library(model)
    if library is None:
        return {}
    lib = __import__(library)
    cls_name = type(model).__name__
    if getattr(lib, cls_name, None) is not type(model):
        return {}
    if library == "diffusers":
        config = json.loads(model.to_json_string())  # type: ignore[operator]
        # Private keys (_class_name, _name_or_path...) are provenance, not architecture.
        config = {k: v for k, v in config.items() if not k.startswith("_")}
    else:
        config = json.loads(model.config.to_json_string(use_diff=False))  # type: ignore[union-attr]
        for key in ("_name_or_path", "transformers_version", "_commit_hash"):
            config.pop(key, None)
    return {"library": library, "class": cls_name, "config": config, "adapter": adapter}


def adapt(module: nn.Module, component: str | None = None, *, latent_factor: int = 8,
          image_size: int | None = None, profile: ShapeProfile | str | None = None) -> Component:
    """Wrap a diffusers / transformers / plain PyTorch model as a :class:`Component`.

    ``component`` chooses among what the model offers (``vae-encoder`` for an ``AutoencoderKL``;
    None picks the default, ``vae-decoder`` there). ``latent_factor`` is the VAE downsampling the
    UNet's latents live at; ``image_size`` the nominal image side in pixels (the profile's opt;
    classifiers: the fixed input size when the config names none, else 224). ``profile`` overrides
    ranges of the default profile, e.g. ``"batch=1:4:16"``.
    """
    if not isinstance(module, nn.Module):
        raise InvalidArgumentError("model", type(module).__name__, "a torch.nn.Module, a preset name or a local path")
    if not isinstance(latent_factor, int) or latent_factor < 1 or latent_factor & (latent_factor - 1):
        raise InvalidArgumentError("latent-factor", latent_factor, "a power of two (1, 2, 4, 8...)")
    if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
        raise InvalidArgumentError("image-size", image_size, "a positive integer")
    if isinstance(profile, str):
        profile = ShapeProfile.parse(profile)
    module.eval()
    name, wrapper, spec = _builder(module)(module, component, latent_factor, image_size)
    spec = spec.with_profile(profile)
    adapter = {"component": name, "latent_factor": latent_factor, "image_size": image_size,
               "profile": spec.profile.to_dict()}
    return Component(name=name, module=wrapper.eval(), spec=spec, model=module,
                     source=source_recipe(module, adapter), origin=f"<module {type(module).__name__}>")
