"""Adapters for diffusion transformers: SD3/3.5 (MMDiT), FLUX.1 and PixArt-Sigma.

One interface for the three families (component ``transformer``): ``sample`` latents in the unpacked
(batch, C, h, w) layout and a ``timestep`` in [0, 1000] in, ``noise_pred`` in the layout of ``sample``
out, plus each family's conditioning. Whatever the diffusers pipeline does around the model call
(FLUX's 2x2 patch packing, position ids and timestep / 1000; PixArt's learned-sigma split) happens
inside the wrapper, so it is part of the exported graph and engines of all three look alike.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from fastgen.models.adapters import choose, config_value, image_range, scaled
from fastgen.models.spec import DimRange, ExportSpec, ShapeProfile, TensorSpec

#: Nominal image side when a config names no sample size (FLUX's).
DEFAULT_IMAGE_SIZE = 1024
#: CLIP's token count: SD3's joint sequence is these 77 CLIP positions followed by T5's.
CLIP_TOKENS = 77
#: Text sequence ranges (min, opt, max) of each family, as the diffusers pipelines pad prompts: SD3
#: 77 + max_sequence_length (256 by default, up to 512); FLUX max_sequence_length (512, all padding
#: kept); PixArt-Sigma 300 tokens by default with its attention mask, up to T5's 512.
SEQ_RANGES = {
    "sd3": DimRange(CLIP_TOKENS, CLIP_TOKENS + 256, CLIP_TOKENS + 512),
    "flux": DimRange(1, 512, 512),
    "pixart": DimRange(1, 300, 512),
}


class SD3TransformerWrapper(nn.Module):
    """``sample, timestep, encoder_hidden_states, pooled_projections`` -> ``(noise_pred,)``.

    sample (batch, C, h, w); timestep (batch,) in [0, 1000]; encoder_hidden_states (batch, 77 + T5 seq,
    joint_dim); pooled_projections (batch, pooled_dim): StableDiffusion3Pipeline's call, unchanged.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                pooled_projections: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.model(hidden_states=sample, timestep=timestep, encoder_hidden_states=encoder_hidden_states,
                           pooled_projections=pooled_projections, return_dict=False)[0],)


def pack_latents(sample: torch.Tensor) -> torch.Tensor:
    """(batch, C, h, w) -> (batch, (h/2)*(w/2), 4C): FLUX's 2x2 patches, channels fastest within a patch."""
    b, c, h, w = sample.shape
    x = sample.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(packed: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(batch, (h/2)*(w/2), 4C) -> (batch, C, h, w): the inverse of :func:`pack_latents`."""
    b, _, c4 = packed.shape
    x = packed.reshape(b, height // 2, width // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, height, width)


def image_ids(height: int, width: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """((h/2)*(w/2), 3) position ids of the packed latent grid: (0, row, column), as FluxPipeline builds them."""
    rows = torch.arange(height // 2, dtype=dtype, device=device)
    cols = torch.arange(width // 2, dtype=dtype, device=device)
    grid_r = rows[:, None].expand(height // 2, width // 2)
    grid_c = cols[None, :].expand(height // 2, width // 2)
    ids = torch.stack([torch.zeros_like(grid_r), grid_r, grid_c], dim=-1)
    return ids.reshape(-1, 3)


def rotate_pairs(x: torch.Tensor, freqs: tuple[torch.Tensor, torch.Tensor], use_real: bool = True,
                 use_real_unbind_dim: int = -1, sequence_dim: int = 2) -> torch.Tensor:
    """FLUX's rotary embedding on (batch, seq, heads, head_dim) (``sequence_dim`` 1) or (batch, heads, seq,
    head_dim) queries / keys, with cos and sin (seq, head_dim): each channel pair (a, b) becomes
    (a cos - b sin, b cos + a sin), computed in float32.

    Same maths as diffusers' ``apply_rotary_emb`` for FLUX's layout, written with ``unflatten`` so the
    TorchScript tracer keeps batch and sequence symbolic (diffusers reshapes to ``*x.shape[:-1]``, which
    the tracer records as constants: the graph then only runs at the traced size).
    """
    cos, sin = freqs
    cos, sin = (cos[None, :, None, :], sin[None, :, None, :]) if sequence_dim == 1 else (cos[None, None], sin[None, None])
    real, imag = x.unflatten(-1, (-1, 2)).unbind(-1)  # (..., head_dim / 2) each
    rotated = torch.stack([-imag, real], dim=-1).flatten(-2)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


@contextmanager
def _traceable_rotary() -> Iterator[None]:
    """While tracing, route diffusers' FLUX attention through :func:`rotate_pairs` (eager calls untouched)."""
    if not torch.jit.is_tracing():
        yield
        return
    from diffusers.models.transformers import transformer_flux

    original = transformer_flux.apply_rotary_emb

    def rotary(x, freqs_cis, use_real=True, use_real_unbind_dim=-1, sequence_dim=2):
        if not use_real or use_real_unbind_dim != -1:  # not FLUX's layout: diffusers' own
            return original(x, freqs_cis, use_real, use_real_unbind_dim, sequence_dim)
        return rotate_pairs(x, freqs_cis, sequence_dim=sequence_dim)

    transformer_flux.apply_rotary_emb = rotary
    try:
        yield
    finally:
        transformer_flux.apply_rotary_emb = original


class FluxTransformerWrapper(nn.Module):
    """``sample, timestep, encoder_hidden_states, pooled_projections[, guidance]`` -> ``(noise_pred,)``.

    sample (batch, C, h, w) is packed into 2x2 patches (batch, (h/2)*(w/2), 4C); img_ids ((h/2)*(w/2), 3)
    and txt_ids (seq, 3) zeros are built from the shapes; the timestep goes in / 1000 (FluxPipeline's
    call; the model multiplies by 1000 again); guidance (batch,) is the raw distilled scale. The output
    is unpacked back to (batch, C, h, w).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def _run(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
             pooled_projections: torch.Tensor, guidance: torch.Tensor | None) -> tuple[torch.Tensor]:
        height, width = sample.shape[2], sample.shape[3]
        img_ids = image_ids(height, width, sample.dtype, sample.device)
        txt_ids = encoder_hidden_states.new_zeros(encoder_hidden_states.shape[1], 3)
        with _traceable_rotary():
            out = self.model(hidden_states=pack_latents(sample), timestep=timestep / 1000, guidance=guidance,
                             pooled_projections=pooled_projections, encoder_hidden_states=encoder_hidden_states,
                             txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
        return (unpack_latents(out, height, width),)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                pooled_projections: torch.Tensor) -> tuple[torch.Tensor]:
        return self._run(sample, timestep, encoder_hidden_states, pooled_projections, None)


class FluxGuidanceTransformerWrapper(FluxTransformerWrapper):
    """A guidance-distilled FLUX (``guidance_embeds``, FLUX.1-dev): also ``guidance`` (batch,)."""

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                pooled_projections: torch.Tensor, guidance: torch.Tensor) -> tuple[torch.Tensor]:
        return self._run(sample, timestep, encoder_hidden_states, pooled_projections, guidance)


@contextmanager
def _positions_from_shape(model: nn.Module) -> Iterator[None]:
    """While tracing or compiling, make PixArt's patch embedding compute its sin-cos table from the input.

    diffusers' PatchEmbed (no ``pos_embed_max_size``) takes its stored table when the patch grid equals
    the config's sample size and recomputes one otherwise: a Python branch on the shape, which a trace
    would bake in at the traced size. Marking the stored grid as unknown sends every size down the
    recomputing path, which yields the same table at the stored size; eager calls are left alone.
    """
    embed = getattr(model, "pos_embed", None)
    tracing = torch.jit.is_tracing() or torch.compiler.is_compiling()
    if not tracing or embed is None or getattr(embed, "pos_embed_max_size", None) or not hasattr(embed, "height"):
        yield
        return
    saved = embed.height, embed.width
    embed.height = embed.width = -1
    try:
        yield
    finally:
        embed.height, embed.width = saved


class PixArtTransformerWrapper(nn.Module):
    """``sample, timestep, encoder_hidden_states, encoder_attention_mask`` -> ``(noise_pred,)``.

    encoder_attention_mask (batch, seq) int64, 1 for tokens; PixArtSigmaPipeline's call (no resolution
    or aspect-ratio conditioning). With a learned sigma (out_channels = 2C) only the first C channels,
    the epsilon prediction, are returned, as the pipeline keeps after guidance.
    """

    def __init__(self, model: nn.Module, channels: int) -> None:
        super().__init__()
        self.model = model
        self.channels = channels

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                encoder_attention_mask: torch.Tensor) -> tuple[torch.Tensor]:
        with _positions_from_shape(self.model):
            out = self.model(sample, encoder_hidden_states=encoder_hidden_states,
                             encoder_attention_mask=encoder_attention_mask, timestep=timestep,
                             added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]
        return (out[:, :self.channels],)


def _image_side(cfg, latent_factor: int, image_size: int | None, unit: int) -> DimRange:
    size = config_value(cfg, "sample_size")
    nominal = image_size or (int(size) * latent_factor if size else DEFAULT_IMAGE_SIZE)
    return image_range(nominal, unit)


def _spec(model: nn.Module, family: str, inputs: list[TensorSpec], channels: int, latent_factor: int,
          image_size: int | None, patch: int) -> ExportSpec:
    f = latent_factor
    # Latent sides must split into whole patches (FLUX: its 2x2 packing): multiples of F * patch pixels.
    unit = f * patch
    side = _image_side(model.config, f, image_size, unit)
    h, w = scaled("height", f), scaled("width", f)
    return ExportSpec(
        component="transformer",
        inputs=(TensorSpec("sample", "float32", ("batch", channels, h, w)),
                TensorSpec("timestep", "float32", ("batch",), low=0, high=1000), *inputs),
        outputs=(TensorSpec("noise_pred", "float32", ("batch", channels, h, w)),),
        profile=ShapeProfile({"batch": DimRange(1, 2, 8), "seq": SEQ_RANGES[family],
                              "height": side, "width": side}),
        model_type=type(model).__name__,
        multiples={"height": unit, "width": unit},
    )


def adapt_sd3_transformer(model: nn.Module, component: str | None, latent_factor: int,
                          image_size: int | None) -> tuple[str, nn.Module, ExportSpec]:
    name = choose(component, ("transformer",))
    cfg = model.config
    inputs = [TensorSpec("encoder_hidden_states", "float32", ("batch", "seq", int(cfg.joint_attention_dim))),
              TensorSpec("pooled_projections", "float32", ("batch", int(cfg.pooled_projection_dim)))]
    spec = _spec(model, "sd3", inputs, int(cfg.in_channels), latent_factor, image_size, int(cfg.patch_size))
    return name, SD3TransformerWrapper(model), spec


def adapt_flux_transformer(model: nn.Module, component: str | None, latent_factor: int,
                           image_size: int | None) -> tuple[str, nn.Module, ExportSpec]:
    name = choose(component, ("transformer",))
    cfg = model.config
    inputs = [TensorSpec("encoder_hidden_states", "float32", ("batch", "seq", int(cfg.joint_attention_dim))),
              TensorSpec("pooled_projections", "float32", ("batch", int(cfg.pooled_projection_dim)))]
    guidance = bool(config_value(cfg, "guidance_embeds", False))
    if guidance:
        inputs.append(TensorSpec("guidance", "float32", ("batch",), low=1, high=10))
    # in_channels counts the packed 2x2 patch: the latents have a quarter of them.
    channels = int(cfg.in_channels) // 4
    spec = _spec(model, "flux", inputs, channels, latent_factor, image_size, 2 * int(cfg.patch_size))
    wrapper = FluxGuidanceTransformerWrapper(model) if guidance else FluxTransformerWrapper(model)
    return name, wrapper, spec


def adapt_pixart_transformer(model: nn.Module, component: str | None, latent_factor: int,
                             image_size: int | None) -> tuple[str, nn.Module, ExportSpec]:
    name = choose(component, ("transformer",))
    cfg = model.config
    channels = int(cfg.in_channels)
    inputs = [TensorSpec("encoder_hidden_states", "float32", ("batch", "seq", int(cfg.caption_channels))),
              TensorSpec("encoder_attention_mask", "int64", ("batch", "seq"), kind="mask")]
    spec = _spec(model, "pixart", inputs, channels, latent_factor, image_size, int(cfg.patch_size))
    return name, PixArtTransformerWrapper(model, channels), spec


#: diffusers transformer class -> its adapter.
DIT_BUILDERS = {
    "SD3Transformer2DModel": adapt_sd3_transformer,
    "FluxTransformer2DModel": adapt_flux_transformer,
    "PixArtTransformer2DModel": adapt_pixart_transformer,
}
