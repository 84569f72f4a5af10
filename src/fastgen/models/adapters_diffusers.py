"""Adapters for diffusers models: UNets (SD 1.x/2.x, SDXL, unconditional) and the KL VAE."""

from __future__ import annotations

import torch
from torch import nn

from fastgen.errors import UnsupportedError
from fastgen.models.adapters import Builder, choose, config_value, image_range, scaled
from fastgen.models.spec import DimRange, ExportSpec, ShapeProfile, TensorSpec

# SDXL's time_ids: original size (h, w), crop top-left (y, x), target size (h, w).
SDXL_TIME_IDS = 6


class UNetConditionWrapper(nn.Module):
    """``sample, timestep, encoder_hidden_states`` -> ``(noise_pred,)`` (SD 1.x/2.x).

    sample (batch, in_ch, h, w); timestep (batch,) float, one per sample; encoder_hidden_states
    (batch, seq, cross_dim); noise_pred (batch, out_ch, h, w). Each wrapper variant has explicit
    positional parameters (no ``*args``) so torch.export's ``dynamic_shapes`` map one to one.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor,
                encoder_hidden_states: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.model(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0],)


class SDXLUNetWrapper(UNetConditionWrapper):
    """SDXL: also ``text_embeds`` (batch, pooled_dim) and ``time_ids`` (batch, 6), as added_cond_kwargs."""

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                text_embeds: torch.Tensor, time_ids: torch.Tensor) -> tuple[torch.Tensor]:
        added = {"text_embeds": text_embeds, "time_ids": time_ids}
        return (self.model(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                           added_cond_kwargs=added, return_dict=False)[0],)


class ClassUNetConditionWrapper(UNetConditionWrapper):
    """A class-conditioned UNet2DConditionModel (e.g. the x4 upscaler's noise level): ``class_labels`` (batch,)."""

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                class_labels: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.model(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                           class_labels=class_labels, return_dict=False)[0],)


class UNet2DWrapper(nn.Module):
    """``sample, timestep`` -> ``(noise_pred,)`` for an unconditional pixel-space UNet2DModel."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.model(sample, timestep, return_dict=False)[0],)


class ClassUNet2DWrapper(UNet2DWrapper):
    """A class-conditional UNet2DModel: also ``class_labels`` (batch,)."""

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.model(sample, timestep, class_labels=class_labels, return_dict=False)[0],)


class VAEDecoderWrapper(nn.Module):
    """``latent`` (batch, C, h, w) -> ``(image,)`` (batch, 3, h*F, w*F): raw ``vae.decode``, unscaled."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, latent: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.model.decode(latent, return_dict=False)[0],)


class VAEEncoderWrapper(nn.Module):
    """``image`` (batch, 3, H, W) in [-1, 1] -> ``(latent_mean, latent_logvar)`` (batch, C, H/F, W/F).

    Returns the posterior's parameters rather than a sample, so the graph is deterministic and
    the pipeline samples (or takes the mode) with its own generator.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dist = self.model.encode(image, return_dict=False)[0]
        return dist.mean, dist.logvar


def _sample_size(config, name: str = "sample_size", default: int = 64) -> int:
    size = config_value(config, name, default)
    return int(size[0] if isinstance(size, (list, tuple)) else size)


def _class_label_input(config) -> TensorSpec | None:
    """The ``class_labels`` input of a UNet with class conditioning, or None."""
    embed_type = config_value(config, "class_embed_type")
    num = config_value(config, "num_class_embeds")
    if embed_type is None and num is not None:
        return TensorSpec("class_labels", "int64", ("batch",), low=0, high=int(num))
    if embed_type == "timestep":
        return TensorSpec("class_labels", "float32", ("batch",), low=0, high=1000)
    if embed_type is None:
        return None
    raise UnsupportedError(f"UNet class_embed_type {embed_type!r} is not supported (only an embedding or 'timestep')")


def adapt_unet_condition(model: nn.Module, component: str | None, latent_factor: int,
                         image_size: int | None) -> tuple[str, nn.Module, ExportSpec]:
    # "unet-controlled": the same UNet taking ControlNet residuals as extra inputs (adapters_controlnet).
    name = choose(component, ("unet", "unet-controlled"))
    cfg = model.config
    for key in ("time_cond_proj_dim", "encoder_hid_dim_type"):
        if config_value(cfg, key) is not None:
            raise UnsupportedError(f"UNet2DConditionModel with {key}={config_value(cfg, key)!r} is not supported "
                                   "(SD 1.x/2.x and SDXL UNets are)")
    addition = config_value(cfg, "addition_embed_type")
    if addition not in (None, "text_time"):
        raise UnsupportedError(f"UNet addition_embed_type {addition!r} is not supported (only SDXL's 'text_time')")
    f = latent_factor
    h, w = scaled("height", f), scaled("width", f)
    cross = config_value(cfg, "cross_attention_dim")
    if isinstance(cross, (list, tuple)):
        cross = cross[0]
    inputs = [
        TensorSpec("sample", "float32", ("batch", cfg.in_channels, h, w)),
        TensorSpec("timestep", "float32", ("batch",), low=0, high=1000),
        TensorSpec("encoder_hidden_states", "float32", ("batch", "seq", int(cross))),
    ]
    if addition == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - SDXL_TIME_IDS * cfg.addition_time_embed_dim
        inputs += [TensorSpec("text_embeds", "float32", ("batch", pooled)),
                   TensorSpec("time_ids", "float32", ("batch", SDXL_TIME_IDS), low=0, high=1024)]
    labels = _class_label_input(cfg)
    if labels is not None:
        if addition == "text_time":
            raise UnsupportedError("a UNet with both SDXL text_time and class conditioning is not supported")
        inputs.append(labels)
    # Latent sides must survive every down/up block: multiples of F * 2**(blocks - 1) pixels.
    unit = f * 2 ** (len(cfg.block_out_channels) - 1)
    side = image_range(image_size or _sample_size(cfg) * f, unit)
    spec = ExportSpec(
        component=name,
        inputs=tuple(inputs),
        outputs=(TensorSpec("noise_pred", "float32", ("batch", cfg.out_channels, h, w)),),
        profile=ShapeProfile({"batch": DimRange(1, 2, 8), "seq": DimRange(77, 77, 154),
                              "height": side, "width": side}),
        model_type=type(model).__name__,
        multiples={"height": unit, "width": unit},
    )
    if name == "unet-controlled":
        from fastgen.models.adapters_controlnet import controlled_unet

        return controlled_unet(model, spec, f)
    wrapper_cls = (SDXLUNetWrapper if addition == "text_time" else
                   ClassUNetConditionWrapper if labels is not None else UNetConditionWrapper)
    return name, wrapper_cls(model), spec


def adapt_unet_2d(model: nn.Module, component: str | None, latent_factor: int,
                  image_size: int | None) -> tuple[str, nn.Module, ExportSpec]:
    """Unconditional (or class-conditional) pixel-space UNet: the latent factor is 1 whatever is asked."""
    name = choose(component, ("unet",))
    cfg = model.config
    inputs = [TensorSpec("sample", "float32", ("batch", cfg.in_channels, "height", "width")),
              TensorSpec("timestep", "float32", ("batch",), low=0, high=1000)]
    labels = _class_label_input(cfg)
    if labels is not None:
        inputs.append(labels)
    unit = 2 ** (len(cfg.block_out_channels) - 1)
    side = image_range(image_size or _sample_size(cfg), unit)
    spec = ExportSpec(
        component=name,
        inputs=tuple(inputs),
        outputs=(TensorSpec("noise_pred", "float32", ("batch", cfg.out_channels, "height", "width")),),
        profile=ShapeProfile({"batch": DimRange(1, 2, 8), "height": side, "width": side}),
        model_type=type(model).__name__,
        multiples={"height": unit, "width": unit},
    )
    return name, (ClassUNet2DWrapper if labels is not None else UNet2DWrapper)(model), spec


def vae_latent_factor(config) -> int:
    """Spatial downsampling of a KL VAE: one factor 2 per block but the last."""
    return 2 ** (len(config_value(config, "block_out_channels")) - 1)


def adapt_vae(model: nn.Module, component: str | None, latent_factor: int,
              image_size: int | None) -> tuple[str, nn.Module, ExportSpec]:
    """KL VAE; its own latent factor (from the config) wins over ``latent_factor``."""
    name = choose(component, ("vae-decoder", "vae-encoder"))
    cfg = model.config
    f = vae_latent_factor(cfg)
    latent = ("batch", cfg.latent_channels, scaled("height", f), scaled("width", f))
    side = image_range(image_size or _sample_size(cfg, default=512), f)
    profile = ShapeProfile({"batch": DimRange(1, 1, 4), "height": side, "width": side})
    if name == "vae-decoder":
        inputs = (TensorSpec("latent", "float32", latent),)
        outputs = (TensorSpec("image", "float32", ("batch", cfg.out_channels, "height", "width")),)
        wrapper: nn.Module = VAEDecoderWrapper(model)
    else:
        inputs = (TensorSpec("image", "float32", ("batch", cfg.in_channels, "height", "width"), low=-1, high=1),)
        outputs = (TensorSpec("latent_mean", "float32", latent), TensorSpec("latent_logvar", "float32", latent))
        wrapper = VAEEncoderWrapper(model)
    spec = ExportSpec(component=name, inputs=inputs, outputs=outputs, profile=profile,
                      model_type=type(model).__name__)
    return name, wrapper, spec


def builder_for(model: nn.Module) -> Builder:
    import diffusers

    if isinstance(model, diffusers.UNet2DConditionModel):
        return adapt_unet_condition
    if isinstance(model, diffusers.UNet2DModel):
        return adapt_unet_2d
    if isinstance(model, diffusers.AutoencoderKL):
        return adapt_vae
    if isinstance(model, diffusers.ControlNetModel):
        from fastgen.models.adapters_controlnet import adapt_controlnet

        return adapt_controlnet
    from fastgen.models.adapters_dit import DIT_BUILDERS

    for cls_name, builder in DIT_BUILDERS.items():  # SD3 / FLUX / PixArt transformers
        if isinstance(model, getattr(diffusers, cls_name)):
            return builder
    raise UnsupportedError(f"no fastgen adapter for diffusers {type(model).__name__} "
                           "(supported: UNet2DConditionModel, UNet2DModel, AutoencoderKL, ControlNetModel, "
                           f"{', '.join(DIT_BUILDERS)})")
