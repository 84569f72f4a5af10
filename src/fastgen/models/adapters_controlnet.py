"""ControlNet as components: the ControlNet (residuals out) and the UNet that takes them in.

Two component kinds, both from diffusers models (SD 1.x/2.x and SDXL, ``text_time``):

- ``controlnet`` (a ``ControlNetModel``): the UNet's inputs plus ``controlnet_cond``, the condition image
  in pixels (batch, 3, height, width) in [0, 1], and ``conditioning_scale`` (batch,), one scale per row
  so requests with different scales batch together. Outputs ``down_block_res_0..N-1`` (one per down
  block sample the UNet keeps for its skip connections, in order) and ``mid_block_res``, already
  multiplied by the row's scale.
- ``unet-controlled`` (a ``UNet2DConditionModel``): the plain UNet's inputs followed by those same
  residuals as inputs, so the ControlNet's outputs feed it by name; the plain ``unet`` engine is
  unchanged. Zero residuals give exactly the plain UNet's prediction.

Several ControlNets are run one by one and their residuals summed on the host
(:func:`sum_residuals`, as diffusers' ``MultiControlNetModel`` does); per-net guidance start/end
(:class:`ControlGuidance`) and guess mode (:func:`guess_mode_weights`) are host-side too.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from fastgen.core.config import ConfigMixin
from fastgen.errors import InvalidArgumentError, UnsupportedError
from fastgen.models.adapters import choose, config_value, image_range, scaled
from fastgen.models.adapters_diffusers import SDXL_TIME_IDS
from fastgen.models.spec import DimRange, ExportSpec, ShapeProfile, TensorSpec

CONTROLNET = "controlnet"
CONTROLLED_UNET = "unet-controlled"
MID_RESIDUAL = "mid_block_res"
DOWN_RESIDUAL_PREFIX = "down_block_res_"


def down_residual_name(index: int) -> str:
    """Name of the ``index``-th down-block residual (``down_block_res_0``...)."""
    return f"{DOWN_RESIDUAL_PREFIX}{index}"


def residual_layout(config, latent_factor: int) -> list[tuple[str, int, int]]:
    """``(name, channels, pixel divisor)`` of every residual a UNet-shaped config exchanges with a ControlNet.

    The UNet keeps, for its skip connections: conv_in's output, then per down block each resnet's
    output and (all blocks but the last) the downsampler's; the mid block's output comes last. The
    divisor turns the image side in pixels into the residual's side (latent factor * 2**block).
    """
    channels = list(config_value(config, "block_out_channels"))
    layers = config_value(config, "layers_per_block", 2)
    per_block = list(layers) if isinstance(layers, (list, tuple)) else [int(layers)] * len(channels)
    out = [(channels[0], latent_factor)]
    for i, (ch, n) in enumerate(zip(channels, per_block)):
        out += [(ch, latent_factor * 2 ** i)] * int(n)
        if i < len(channels) - 1:
            out.append((ch, latent_factor * 2 ** (i + 1)))
    named = [(down_residual_name(i), ch, div) for i, (ch, div) in enumerate(out)]
    named.append((MID_RESIDUAL, channels[-1], latent_factor * 2 ** (len(channels) - 1)))
    return named


def residual_specs(config, latent_factor: int) -> tuple[TensorSpec, ...]:
    """The residual tensors as specs: (batch, channels, height/div, width/div) each."""
    return tuple(TensorSpec(name, "float32", ("batch", ch, scaled("height", div), scaled("width", div)))
                 for name, ch, div in residual_layout(config, latent_factor))


def residual_names(spec: ExportSpec) -> list[str]:
    """Names of the residuals a ``controlnet`` spec outputs or a ``unet-controlled`` spec takes, in order."""
    tensors = spec.outputs if spec.component == CONTROLNET else spec.inputs
    return [t.name for t in tensors if t.name.startswith(DOWN_RESIDUAL_PREFIX) or t.name == MID_RESIDUAL]


# --- wrappers ------------------------------------------------------------------------------------

def _row_scale(conditioning_scale: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    # (batch,) -> (batch, 1, 1, 1): diffusers multiplies every residual by its (float) scale; a
    # tensor broadcast per row does the same multiplication, row by row.
    return conditioning_scale.to(like.dtype).reshape(-1, 1, 1, 1)


class ControlNetWrapper(nn.Module):
    """``sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale`` -> residuals (SD 1.x/2.x).

    sample (batch, 4, h, w) latents; timestep (batch,) float; encoder_hidden_states (batch, seq, cross);
    controlnet_cond (batch, 3, 8h, 8w) pixels in [0, 1]; conditioning_scale (batch,). Returns the
    down-block residuals then the mid-block residual, each times its row's scale.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def _run(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
             controlnet_cond: torch.Tensor, conditioning_scale: torch.Tensor,
             added: dict[str, torch.Tensor] | None) -> tuple[torch.Tensor, ...]:
        down, mid = self.model(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                               controlnet_cond=controlnet_cond,
                               conditioning_scale=_row_scale(conditioning_scale, sample),
                               added_cond_kwargs=added, guess_mode=False, return_dict=False)
        return (*down, mid)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                controlnet_cond: torch.Tensor, conditioning_scale: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self._run(sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale, None)


class SDXLControlNetWrapper(ControlNetWrapper):
    """SDXL: also ``text_embeds`` (batch, pooled_dim) and ``time_ids`` (batch, 6), before the condition image."""

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                text_embeds: torch.Tensor, time_ids: torch.Tensor, controlnet_cond: torch.Tensor,
                conditioning_scale: torch.Tensor) -> tuple[torch.Tensor, ...]:
        added = {"text_embeds": text_embeds, "time_ids": time_ids}
        return self._run(sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale, added)


class ControlledUNetWrapper(nn.Module):
    """``sample, timestep, encoder_hidden_states, *residuals`` -> ``(noise_pred,)``: the UNet with ControlNet residuals.

    residuals: the down-block residuals in order, then the mid-block one (shapes: :func:`residual_layout`).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def _run(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
             residuals: tuple[torch.Tensor, ...], added: dict[str, torch.Tensor] | None) -> tuple[torch.Tensor]:
        return (self.model(sample, timestep, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added,
                           down_block_additional_residuals=tuple(residuals[:-1]),
                           mid_block_additional_residual=residuals[-1], return_dict=False)[0],)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                *residuals: torch.Tensor) -> tuple[torch.Tensor]:
        return self._run(sample, timestep, encoder_hidden_states, residuals, None)


class SDXLControlledUNetWrapper(ControlledUNetWrapper):
    """SDXL: ``text_embeds`` and ``time_ids`` after ``encoder_hidden_states``, then the residuals."""

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                text_embeds: torch.Tensor, time_ids: torch.Tensor, *residuals: torch.Tensor) -> tuple[torch.Tensor]:
        added = {"text_embeds": text_embeds, "time_ids": time_ids}
        return self._run(sample, timestep, encoder_hidden_states, residuals, added)


# --- adapters ------------------------------------------------------------------------------------

def _check_conditioning(cfg, what: str) -> str | None:
    """The config's addition_embed_type (None or SDXL's text_time); anything else is refused."""
    for key in ("time_cond_proj_dim", "encoder_hid_dim_type", "class_embed_type", "num_class_embeds"):
        if config_value(cfg, key) is not None:
            raise UnsupportedError(f"{what} with {key}={config_value(cfg, key)!r} is not supported "
                                   "(SD 1.x/2.x and SDXL ones are)")
    addition = config_value(cfg, "addition_embed_type")
    if addition not in (None, "text_time"):
        raise UnsupportedError(f"{what} addition_embed_type {addition!r} is not supported (only SDXL's 'text_time')")
    return addition


def adapt_controlnet(model: nn.Module, component: str | None, latent_factor: int,
                     image_size: int | None) -> tuple[str, nn.Module, ExportSpec]:
    """A diffusers ``ControlNetModel`` as the ``controlnet`` component (see the module docstring)."""
    name = choose(component, (CONTROLNET,))
    cfg = model.config
    addition = _check_conditioning(cfg, "ControlNetModel")
    if config_value(cfg, "global_pool_conditions"):
        # Its residuals are pooled to 1x1 (and diffusers forces guess mode): shapes the controlled UNet's
        # full-size residual inputs do not take.
        raise UnsupportedError("ControlNetModel with global_pool_conditions=True is not supported")
    stride2 = len(config_value(cfg, "conditioning_embedding_out_channels", (16, 32, 96, 256))) - 1
    if 2 ** stride2 != latent_factor:
        raise UnsupportedError(f"this ControlNet's condition embedding downsamples by {2 ** stride2}, "
                               f"but the latents are {latent_factor}x smaller than the images")
    f = latent_factor
    cross = config_value(cfg, "cross_attention_dim")
    if isinstance(cross, (list, tuple)):
        cross = cross[0]
    inputs = [
        TensorSpec("sample", "float32", ("batch", cfg.in_channels, scaled("height", f), scaled("width", f))),
        TensorSpec("timestep", "float32", ("batch",), low=0, high=1000),
        TensorSpec("encoder_hidden_states", "float32", ("batch", "seq", int(cross))),
    ]
    if addition == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - SDXL_TIME_IDS * cfg.addition_time_embed_dim
        inputs += [TensorSpec("text_embeds", "float32", ("batch", pooled)),
                   TensorSpec("time_ids", "float32", ("batch", SDXL_TIME_IDS), low=0, high=1024)]
    inputs += [
        TensorSpec("controlnet_cond", "float32", ("batch", int(config_value(cfg, "conditioning_channels", 3)),
                                                  "height", "width"), low=0, high=1),
        TensorSpec("conditioning_scale", "float32", ("batch",), low=0, high=2),
    ]
    # Sides must survive every down block, as for the UNet this ControlNet feeds.
    unit = f * 2 ** (len(cfg.block_out_channels) - 1)
    side = image_range(image_size or 64 * f, unit)
    spec = ExportSpec(
        component=name,
        inputs=tuple(inputs),
        outputs=residual_specs(cfg, f),
        profile=ShapeProfile({"batch": DimRange(1, 2, 8), "seq": DimRange(77, 77, 154),
                              "height": side, "width": side}),
        model_type=type(model).__name__,
        multiples={"height": unit, "width": unit},
    )
    wrapper = SDXLControlNetWrapper(model) if addition == "text_time" else ControlNetWrapper(model)
    return name, wrapper, spec


def controlled_unet(model: nn.Module, plain: ExportSpec, latent_factor: int) -> tuple[str, nn.Module, ExportSpec]:
    """The ``unet-controlled`` component from a UNet and its plain ``unet`` spec: the residuals appended as inputs."""
    cfg = model.config
    addition = _check_conditioning(cfg, "a controlled UNet")
    spec = ExportSpec(component=CONTROLLED_UNET, inputs=plain.inputs + residual_specs(cfg, latent_factor),
                      outputs=plain.outputs, profile=plain.profile, model_type=plain.model_type,
                      multiples=plain.multiples)
    wrapper_cls = SDXLControlledUNetWrapper if addition == "text_time" else ControlledUNetWrapper
    return CONTROLLED_UNET, _named_inputs(wrapper_cls, spec.input_names)(model), spec


def _named_inputs(cls: type[nn.Module], names: list[str]) -> type[nn.Module]:
    """``cls`` with a ``forward`` whose signature names every input: the residuals' count depends on the
    UNet, so the class takes them as ``*residuals``, but torch.export maps dynamic axes to inputs by the
    signature's parameter names (the TorchScript exporter does not care)."""
    base = cls.forward

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor]:
        return base(self, *inputs)

    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    forward.__signature__ = inspect.Signature([inspect.Parameter(n, kind) for n in ["self", *names]])  # type: ignore[attr-defined]
    return type(cls.__name__, (cls,), {"forward": forward, "__doc__": cls.__doc__, "__module__": cls.__module__})


# --- host side: several ControlNets, guidance windows, guess mode ---------------------------------

@dataclass(frozen=True)
class ControlGuidance(ConfigMixin):
    """How strongly, and over which part of the schedule, one ControlNet steers (diffusers' semantics)."""

    scale: float = 1.0
    """``controlnet_conditioning_scale``: the residuals are multiplied by it (0 turns the net off)."""
    start: float = 0.0
    """``control_guidance_start``: fraction of the steps before which the net is off."""
    end: float = 1.0
    """``control_guidance_end``: fraction of the steps after which the net is off."""

    def __post_init__(self) -> None:
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)) or not math.isfinite(self.scale):
            raise InvalidArgumentError("controlnet-scale", self.scale, "a finite number")
        for arg, value in (("control-guidance-start", self.start), ("control-guidance-end", self.end)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise InvalidArgumentError(arg, value, "a number from 0 to 1")
        if self.start >= self.end:
            raise InvalidArgumentError("control-guidance-start", self.start,
                                       f"less than control-guidance-end ({self.end})")

    def keep(self, step: int, num_steps: int) -> float:
        """1.0 when the net acts at denoising step ``step`` (0-based) of ``num_steps``, else 0.0.

        diffusers' ``controlnet_keep``: off where ``step / n < start`` or ``(step + 1) / n > end``.
        """
        return 1.0 - float(step / num_steps < self.start or (step + 1) / num_steps > self.end)

    def scale_at(self, step: int, num_steps: int) -> float:
        """The conditioning scale to feed at ``step``: ``scale * keep`` (diffusers' ``cond_scale``)."""
        return self.scale * self.keep(step, num_steps)


def sum_residuals(outputs: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Residuals of several ControlNets summed name by name, in order (``MultiControlNetModel``).

    Each item is one ControlNet engine's output dict (extra keys are ignored); every item must have the
    same residual names. One net's outputs are returned as they are.
    """
    if not outputs:
        raise InvalidArgumentError("controlnet outputs", "none", "at least one ControlNet's residuals")
    names = [n for n in outputs[0] if n.startswith(DOWN_RESIDUAL_PREFIX) or n == MID_RESIDUAL]
    total = {n: outputs[0][n] for n in names}
    for i, out in enumerate(outputs[1:], start=1):
        if sorted(n for n in out if n.startswith(DOWN_RESIDUAL_PREFIX) or n == MID_RESIDUAL) != sorted(names):
            raise InvalidArgumentError("controlnet outputs", f"net {i} with residuals {sorted(out)}",
                                       f"the residuals of net 0: {sorted(names)}")
        total = {n: total[n] + out[n] for n in names}
    return total


def zero_residuals(spec: ExportSpec, dims: Mapping[str, int], *, device: torch.device | str = "cpu",
                   dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Zero residuals for a ``unet-controlled`` (or ``controlnet``) spec at root sizes ``dims``
    (``batch``, ``height``, ``width`` in pixels): rows without a ControlNet in a mixed batch, or
    guess mode's unconditional half."""
    by_name = {t.name: t for t in spec.inputs + spec.outputs}
    full = spec.shape_at(dims)
    return {n: torch.zeros(by_name[n].resolve(full), device=device, dtype=dtype) for n in residual_names(spec)}


def guess_mode_weights(num_residuals: int) -> list[float]:
    """Guess mode's per-residual weights: ``logspace(-1, 0, num_residuals)``, 0.1 for the first
    down-block residual up to 1.0 for the mid-block one (diffusers' ControlNet in guess mode).

    Multiply residual ``i`` of a ControlNet run at the request's scale by weight ``i`` on the host; the
    result equals diffusers' (which multiplies once by ``weight * scale``) up to float rounding.
    """
    if not isinstance(num_residuals, int) or num_residuals < 2:
        raise InvalidArgumentError("num_residuals", num_residuals, "an integer >= 2")
    return torch.logspace(-1, 0, num_residuals).tolist()
