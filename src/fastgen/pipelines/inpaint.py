"""Inpainting: regenerate the white part of a mask, keep the black part, as diffusers' inpaint pipelines.

Two kinds of UNet, told apart by their ``sample`` input's channels (C: the VAE's latent channels):

- an inpainting UNet (``2 * C + 1`` channels, SD's and SDXL's inpainting checkpoints): each step's
  UNet input is ``[scaled latents, mask, masked-image latents]`` along the channels
  (``StableDiffusionInpaintPipeline`` / ``StableDiffusionXLInpaintPipeline`` with a 9-channel UNet);
- a regular UNet (C channels): after each scheduler step the unmasked part of the latents is put
  back to the input image's latents noised to the next timestep (the same pipelines' 4-channel path).

The mask is read as diffusers' mask processor reads it: grayscale, optionally blurred first
(``mask_blur``, as ``mask_processor.blur``), resized with Lanczos, scaled to [0, 1] and binarized
at 0.5; the masked image is the input image with the mask's part set to 0 (mid-grey in [-1, 1]).
``padding_mask_crop``: only the mask's bounding box (grown by the padding, then to the output's
aspect ratio) is generated, and the result is pasted back into the input image through the mask.

Randomness matches diffusers called with one input image and mask per generated image (so each
image depends on its own seed only): each image's generator draws, in order, the posterior sample
of the input image's latents (regular UNet, or strength < 1), its initial noise, then the posterior
sample of the masked image's latents; a regular UNet does not use the latter, which is drawn
(not encoded) so that the seeds give the same images as diffusers, which encodes it anyway.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fastgen.errors import InvalidArgumentError, NumericalError
from fastgen.pipelines import vae_images
from fastgen.pipelines.config import GenerateConfig
from fastgen.pipelines.engine_calls import run_chunked
from fastgen.pipelines.sampling import per_sample_noise

logger = logging.getLogger(__name__)

MASK_KINDS = ("a PIL image, a path to an image file, or a uint8 (height, width) or (height, width, 1|3|4) "
              "array; white: regenerate, black: keep")
#: The two ways a UNet takes a mask (see the module docstring).
CONCAT, BLEND = "concat", "blend"


def unet_mode(generator: Any) -> str:
    """``concat`` for an inpainting UNet (``2 * C + 1`` input channels), ``blend`` for a regular one."""
    channels, latent = _channels(generator)
    if channels == 2 * latent + 1:
        return CONCAT
    if channels == latent:
        return BLEND
    raise InvalidArgumentError("mask_image", "a mask", reason=f"the UNet takes {channels} input channels: "
                               f"inpainting needs {latent} (a regular UNet) or {2 * latent + 1} (an inpainting UNet)")


def _channels(generator: Any) -> tuple[int, int]:
    """(UNet input channels, latent channels); a generator-like object that records only the latter
    has a regular UNet."""
    latent = int(generator.latent_channels)
    return int(getattr(generator, "unet_in_channels", latent)), latent


def check_without_mask(generator: Any) -> None:
    """An inpainting UNet (``2 * C + 1`` input channels) cannot run text-to-image or image-to-image."""
    channels, latent = _channels(generator)
    if channels != latent:
        raise InvalidArgumentError("mask_image", None, reason=f"this generator's UNet is an inpainting UNet "
                                   f"({channels} input channels): pass image and mask_image")


def check_options(config: GenerateConfig) -> None:
    """The inpainting options of ``config`` without a mask: a one-line error naming the option."""
    if config.padding_mask_crop is not None:
        raise InvalidArgumentError("padding-mask-crop", config.padding_mask_crop, reason="only for inpainting "
                                   "(pass a mask)")
    if config.mask_blur:
        raise InvalidArgumentError("mask-blur", config.mask_blur, reason="only for inpainting (pass a mask)")


# --- reading and processing the mask ---------------------------------------------------------------

def load_mask(item: Any):
    """A mask as a grayscale ("L") PIL image: colour images by their luminance, as diffusers reads them."""
    return vae_images.read_input(item, "mask_image", MASK_KINDS, channels=(None, 1, 3, 4)).convert("L")


def crop_region(mask: Any, width: int, height: int, pad: int) -> tuple[int, int, int, int]:
    """(x1, y1, x2, y2): the box around the mask's non-black pixels grown by ``pad`` on each side,
    then grown (within the image) to the aspect ratio of the ``width`` x ``height`` output, as
    diffusers' ``VaeImageProcessor.get_crop_region`` computes it."""
    pixels = np.asarray(mask)
    columns, rows = np.flatnonzero(pixels.any(axis=0)), np.flatnonzero(pixels.any(axis=1))
    if not len(columns):
        raise InvalidArgumentError("mask_image", "an all-black mask", reason="padding_mask_crop crops to the mask's "
                                   "white part, and this mask has none")
    full_h, full_w = pixels.shape
    x1, x2 = max(int(columns[0]) - pad, 0), min(int(columns[-1]) + 1 + pad, full_w)
    y1, y2 = max(int(rows[0]) - pad, 0), min(int(rows[-1]) + 1 + pad, full_h)
    # The same float expressions as diffusers, so that the rounding agrees to the pixel.
    target = width / height
    if (x2 - x1) / (y2 - y1) > target:
        y1, y2 = _grow(y1, y2, int((x2 - x1) / target - (y2 - y1)), full_h)
    else:
        x1, x2 = _grow(x1, x2, int((y2 - y1) * target - (x2 - x1)), full_w)
    return x1, y1, x2, y2


def _grow(low: int, high: int, by: int, size: int) -> tuple[int, int]:
    """[low, high) grown by ``by`` (half each side), then shifted back inside [0, size)."""
    low, high = low - by // 2, high + by - by // 2
    if high >= size:
        low, high = low - (high - size), size
    if low < 0:
        low, high = 0, high - low
    return low, min(high, size)


def _lanczos():
    from PIL import Image

    return getattr(Image, "Resampling", Image).LANCZOS


def _fit_fill(image: Any, width: int, height: int):
    """``image`` resized into width x height keeping its aspect ratio, centred, the bands left over
    filled by stretching its edge rows or columns (diffusers' ``resize_mode="fill"``); RGB out."""
    from PIL import Image

    ratio, source = width / height, image.width / image.height
    new_w = width if ratio < source else image.width * height // image.height
    new_h = height if ratio >= source else image.height * width // image.width
    resized = image.resize((new_w, new_h), resample=_lanczos())
    out = Image.new("RGB", (width, height))
    out.paste(resized, box=(width // 2 - new_w // 2, height // 2 - new_h // 2))
    if ratio < source:  # bands above and below
        band = height // 2 - new_h // 2
        if band > 0:
            out.paste(resized.resize((width, band), box=(0, 0, width, 0)), box=(0, 0))
            out.paste(resized.resize((width, band), box=(0, new_h, width, new_h)), box=(0, band + new_h))
    elif ratio > source:  # bands left and right
        band = width // 2 - new_w // 2
        if band > 0:
            out.paste(resized.resize((band, height), box=(0, 0, 0, height)), box=(0, 0))
            out.paste(resized.resize((band, height), box=(new_w, 0, new_w, height)), box=(band + new_w, 0))
    return out


def _fit_crop(image: Any, width: int, height: int):
    """``image`` resized to cover width x height keeping its aspect ratio, centred, the excess cut
    (diffusers' ``resize_mode="crop"``); RGB out."""
    from PIL import Image

    ratio, source = width / height, image.width / image.height
    new_w = width if ratio > source else image.width * height // image.height
    new_h = height if ratio <= source else image.height * width // image.width
    out = Image.new("RGB", (width, height))
    out.paste(image.resize((new_w, new_h), resample=_lanczos()), box=(width // 2 - new_w // 2, height // 2 - new_h // 2))
    return out


def _fit(image: Any, width: int, height: int, crop: tuple[int, int, int, int] | None):
    """The image as the pipeline sees it: cropped to ``crop`` and fitted ("fill"), else resized."""
    if crop is not None:
        return _fit_fill(image.crop(crop), width, height)
    if image.size == (width, height):
        return image
    return image.resize((width, height), resample=_lanczos())


@dataclass(frozen=True, eq=False)
class InpaintSource:
    """One (input image, mask) pair processed for one output size; shared by every request using it."""

    image: Any
    """The input image as the pipeline sees it (RGB PIL, height x width): cropped when cropping."""
    pixels: torch.Tensor
    """(1, 3, height, width) float32 in [-1, 1]: ``image``, as the VAE encoder takes it."""
    mask: torch.Tensor
    """(1, 1, height, width) float32 of 0 (keep) and 1 (regenerate)."""
    original: Any
    """The input image as given (RGB PIL), for the paste-back."""
    original_mask: Any
    """The mask as given, blurred (L PIL, the input image's size), for the paste-back."""
    crop: tuple[int, int, int, int] | None
    """padding_mask_crop's box (x1, y1, x2, y2) in the input image; None: the whole image."""

    @property
    def masked_pixels(self) -> torch.Tensor:
        """(1, 3, height, width): the input image with the part to regenerate set to 0."""
        return self.pixels * (self.mask < 0.5)


def prepare_source(image: Any, mask: Any, height: int, width: int, config: GenerateConfig) -> InpaintSource:
    """Process an RGB PIL ``image`` and a mask (anything :func:`load_mask` reads) for a height x width output."""
    from PIL import ImageFilter

    mask = load_mask(mask)
    if mask.size != image.size:
        raise InvalidArgumentError("mask_image", f"{mask.width}x{mask.height} pixels",
                                   f"the input image's size ({image.width}x{image.height} pixels)")
    if config.mask_blur:
        mask = mask.filter(ImageFilter.GaussianBlur(config.mask_blur))
    crop = crop_region(mask, width, height, config.padding_mask_crop) if config.padding_mask_crop is not None else None
    seen = _fit(image, width, height, crop)
    # The mask goes the image's way (an RGB fill comes back to grayscale), then is binarized at 0.5.
    mask_seen = _fit(mask, width, height, crop).convert("L")
    values = torch.from_numpy(np.asarray(mask_seen, dtype=np.float32) / 255.0)  # (height, width)
    binary = (values >= 0.5).to(torch.float32)[None, None]
    return InpaintSource(image=seen, pixels=vae_images.to_pixels([seen], height, width), mask=binary,
                         original=image, original_mask=mask, crop=crop)


def load_masks(mask_image: Any, num_prompts: int) -> list:
    """One mask for every prompt, or one per prompt, as grayscale PIL images (all read before any work)."""
    return vae_images.per_prompt(mask_image, num_prompts, "mask_image", "mask", load_mask)


def prepare_sources(images: list, masks: list, height: int, width: int, cfg: GenerateConfig) -> list:
    """One processed (image, mask) pair per prompt, each distinct pair processed (and encoded) once."""
    done: dict[tuple[int, int], Any] = {}
    for image, mask in zip(images, masks):
        if (id(image), id(mask)) not in done:
            done[(id(image), id(mask))] = prepare_source(image, mask, height, width, cfg)
    return [done[(id(i), id(m))] for i, m in zip(images, masks)]


# --- per request ----------------------------------------------------------------------------------

@dataclass(eq=False)
class InpaintState:
    """What one request (a :class:`~fastgen.pipelines.stepping.SampleState`) inpaints, and its tensors."""

    source: InpaintSource
    mode: str
    """``concat`` or ``blend`` (:func:`unet_mode`)."""
    mask_latent: torch.Tensor | None = None
    """(1, 1, h, w): the mask at the latents' size (nearest), once :func:`init_latents` ran."""
    masked_latents: torch.Tensor | None = None
    """concat: (images, C, h, w) latents of the masked image."""
    image_latents: torch.Tensor | None = None
    """blend: (images, C, h, w) latents of the input image."""
    noise: torch.Tensor | None = None
    """blend: (images, C, h, w) the initial noise, re-added to the input image's latents at each step."""


def _needs_image_latents(state: Any) -> bool:
    # diffusers encodes the input image for the blend, or to start from it below strength 1.
    return state.inpaint.mode == BLEND or state.config.strength < 1.0


def init_latents(generator: Any, states: Sequence[Any], device: torch.device) -> None:
    """Initial latents of inpainting states, with ONE VAE-encoder call for every input image and
    masked image they need (each distinct source encoded once)."""
    start = time.perf_counter()
    sizes = {(s.height, s.width) for s in states}
    if len(sizes) != 1:
        raise InvalidArgumentError("states", sorted(sizes), reason="one VAE-encoder call takes one image size")
    height, width = sizes.pop()
    slots: dict[tuple[int, str], int] = {}
    batch: list[torch.Tensor] = []

    def slot(source: InpaintSource, what: str) -> None:
        if (id(source), what) not in slots:
            slots[(id(source), what)] = len(batch)
            batch.append(source.pixels if what == "image" else source.masked_pixels)

    for s in states:
        if _needs_image_latents(s):
            slot(s.inpaint.source, "image")
        if s.inpaint.mode == CONCAT:
            slot(s.inpaint.source, "masked")
    out = run_chunked(generator.vae_encoder, {"image": torch.cat(batch)}) if batch else {}

    def posterior(s: Any, what: str) -> torch.Tensor:
        """The image's posterior sample from each of the state's generators, as diffusers draws it."""
        noise = per_sample_noise((s.images, generator.latent_channels, height // generator.latent_factor,
                                  width // generator.latent_factor), s.generators, device)
        key = (id(s.inpaint.source), what)
        if key not in slots:  # blend: diffusers encodes the masked image and discards it; draw only
            return noise
        index = torch.full((s.images,), slots[key], device=out["latent_mean"].device)
        mean, logvar = out["latent_mean"][index].to(device), out["latent_logvar"][index].to(device)
        return generator.scaling_factor * (mean + torch.exp(0.5 * logvar) * noise)

    for s in states:
        inp = s.inpaint
        shape = (s.images, generator.latent_channels, height // generator.latent_factor,
                 width // generator.latent_factor)
        image_latents = posterior(s, "image") if _needs_image_latents(s) else None
        noise = per_sample_noise(shape, s.generators, device)
        masked = posterior(s, "masked")
        if s.config.strength == 1.0:
            s.latents = noise * s.scheduler.init_noise_sigma
        elif len(s.timesteps):
            s.latents = s.scheduler.add_noise(image_latents, noise, s.timesteps[:1].repeat(s.images))
        else:  # strength 0 (or too few steps to run one): the encoded image as it is
            s.latents = image_latents
        inp.mask_latent = torch.nn.functional.interpolate(inp.source.mask, size=shape[2:]).to(device)
        if inp.mode == CONCAT:
            inp.masked_latents = masked
        else:
            inp.image_latents, inp.noise = image_latents, noise
    bad = vae_images.nonfinite_rows(torch.cat([s.latents for s in states]))
    if bad:
        ends = torch.tensor([s.images for s in states]).cumsum(0).tolist()
        which = sorted({next(i for i, end in enumerate(ends) if row < end) for row in bad})
        raise NumericalError("the VAE encoder returned non-finite latents (NaN or inf) for the input image of "
                             f"prompt(s) {', '.join(map(str, which))}")
    ms = (time.perf_counter() - start) * 1e3
    for s in states:
        s.vae_encode_ms = ms


def unet_input(state: Any, scaled: torch.Tensor) -> torch.Tensor:
    """concat: the state's UNet rows ``scaled`` (rows, C, h, w) with its mask and masked-image latents
    appended along the channels: (rows, 2 * C + 1, h, w). blend: ``scaled`` as it is."""
    inp = state.inpaint
    if inp.mode != CONCAT:
        return scaled
    rows = scaled.shape[0]
    masked = inp.masked_latents.repeat(rows // state.images, 1, 1, 1)  # both halves of guidance alike
    return torch.cat([scaled, inp.mask_latent.expand(rows, -1, -1, -1), masked], dim=1)


def blend(state: Any, latents: torch.Tensor, step: int) -> torch.Tensor:
    """blend: after step ``step`` (0-based) the unmasked part of ``latents`` becomes the input image's
    latents noised to the next timestep (un-noised after the last step); concat: ``latents``."""
    inp = state.inpaint
    if inp.mode != BLEND:
        return latents
    known = inp.image_latents
    if step + 1 < len(state.timesteps):
        known = state.scheduler.add_noise(known, inp.noise, state.timesteps[step + 1:step + 2])
    return (1 - inp.mask_latent) * known + inp.mask_latent * latents


# --- output ----------------------------------------------------------------------------------------

def paste_back(source: InpaintSource, generated: Any):
    """padding_mask_crop: the generated RGB PIL image fitted into the crop box of the input image,
    the input image kept outside the (blurred) mask, as diffusers' ``apply_overlay``."""
    from PIL import Image, ImageOps

    width, height = source.original.size
    # The input image's pixels where the mask is black, transparent where it is white.
    keep = Image.new("RGBa", (width, height))
    keep.paste(source.original.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(source.original_mask))
    keep = keep.convert("RGBA")
    x1, y1, x2, y2 = source.crop  # type: ignore[misc]
    canvas = Image.new("RGBA", (width, height))
    canvas.paste(_fit_crop(generated, x2 - x1, y2 - y1), (x1, y1))
    out = canvas.convert("RGB").convert("RGBA")
    out.alpha_composite(keep)
    return out.convert("RGB")


def row_sources(states: Sequence[Any]) -> list[InpaintSource | None]:
    """The inpainting source of each image (row) of ``states``, None for the rows of other requests."""
    return [s.inpaint.source if s.inpaint is not None else None for s in states for _ in range(s.images)]


def to_output(decoded: torch.Tensor, sources: Sequence[InpaintSource | None], output_type: str) -> Any:
    """Decoded images (N, 3, H, W) as ``output_type``; row i pasted back into its input image when
    ``sources[i]`` cropped (padding_mask_crop; through PIL, as diffusers)."""
    if not any(s is not None and s.crop is not None for s in sources):
        return vae_images.to_output(decoded, output_type)
    pil = [paste_back(s, image) if s is not None and s.crop is not None else image
           for s, image in zip(sources, vae_images.to_output(decoded, "pil"))]
    if output_type == "pil":
        return pil
    sizes = {image.size for image in pil}
    if len(sizes) != 1:
        raise InvalidArgumentError("output-type", output_type, ("pil",), reason="padding_mask_crop pastes back into "
                                   "input images of different sizes: only PIL images can hold them")
    pixels = np.stack([np.asarray(image, dtype=np.uint8) for image in pil])  # (N, H, W, 3)
    if output_type == "uint8":
        return pixels
    return pixels.astype(np.float32) / 255.0


__all__ = ["BLEND", "CONCAT", "InpaintSource", "InpaintState", "blend", "check_options", "check_without_mask",
           "crop_region", "init_latents", "load_mask", "load_masks", "paste_back", "prepare_source", "prepare_sources",
           "row_sources", "to_output", "unet_input", "unet_mode"]
