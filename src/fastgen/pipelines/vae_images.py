"""Images in and out of the generation pipeline: input images to VAE pixels, decoder output to what was asked.

(The classifier's image loading and resizing is :mod:`fastgen.pipelines.classifier_images`.)

Input: a PIL image, a path to an image file, or a uint8 (H, W, 3) array; files and PIL images are
read as the classifier reads them (regular files only, the pixel limit, 16-bit and float modes
scaled by their range, EXIF orientation: :func:`~fastgen.pipelines.classifier_images.standard_mode`);
pixels become ``2 * x / 255 - 1`` in NCHW float32, as diffusers' ``VaeImageProcessor`` does (through
:func:`fastgen.ops.normalize_nchw`). Output: the decoder's (N, 3, H, W) in [-1, 1] becomes PIL images,
diffusers-style float arrays in [0, 1], or uint8 arrays (via :func:`fastgen.ops.to_uint8_nhwc`); a
decoder output with a NaN or an infinity is a :class:`~fastgen.errors.NumericalError`, never an image.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastgen.errors import InvalidArgumentError, NumericalError
from fastgen.ops import normalize_nchw, to_uint8_nhwc

IMAGE_KINDS = "a PIL image, a path to an image file, or a uint8 (height, width, 3) array"
# diffusers' VaeImageProcessor resizes with Lanczos by default.
RESAMPLE = "LANCZOS"


def _open(path: str | os.PathLike):
    from fastgen.pipelines.classifier_images import open_image

    return open_image(Path(path).expanduser(), "image").convert("RGB")


def load_image(item: Any):
    """One input image as an RGB PIL image."""
    from PIL import Image

    from fastgen.pipelines.classifier_images import standard_mode

    if isinstance(item, (str, os.PathLike)):
        return _open(item)
    if isinstance(item, Image.Image):
        return standard_mode(item, "image").convert("RGB")
    if isinstance(item, np.ndarray):
        if item.dtype != np.uint8 or item.ndim != 3 or item.shape[2] != 3 or 0 in item.shape:
            raise InvalidArgumentError("image", f"array of shape {item.shape} and dtype {item.dtype}", IMAGE_KINDS)
        return Image.fromarray(np.ascontiguousarray(item), "RGB")
    raise InvalidArgumentError("image", type(item).__name__, IMAGE_KINDS)


def load_images(image: Any, num_prompts: int) -> list:
    """One image for every prompt, or one per prompt, as RGB PIL images (all read before any work)."""
    if isinstance(image, (list, tuple)):
        if len(image) not in (1, num_prompts):
            raise InvalidArgumentError("image", f"{len(image)} images", f"1 image or one per prompt ({num_prompts})")
        images = [load_image(i) for i in image]
    else:
        images = [load_image(image)]
    return images * num_prompts if len(images) == 1 else images


def round_down(size: int, multiple: int) -> int:
    return size // multiple * multiple


def to_pixels(images: Sequence, height: int, width: int) -> torch.Tensor:
    """RGB PIL images -> (N, 3, height, width) float32 in [-1, 1], resized (Lanczos) where sizes differ."""
    from PIL import Image

    arrays = []
    for img in images:
        if img.size != (width, height):
            img = img.resize((width, height), resample=getattr(getattr(Image, "Resampling", Image), RESAMPLE))
        arrays.append(np.asarray(img, dtype=np.uint8))
    batch = torch.from_numpy(np.stack(arrays))  # (N, H, W, 3) uint8
    return normalize_nchw(batch, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # (N, 3, H, W): (x/255 - 0.5) / 0.5


def nonfinite_rows(t: torch.Tensor) -> list[int]:
    """Indices of the rows (dim 0) of ``t`` holding a NaN or an infinity; empty when all are finite.

    One reduction and one host sync, whatever the batch: a batched caller (``fastgen.Runtime``) fails
    just the requests whose rows these are."""
    if t.numel() == 0:
        return []
    return torch.nonzero(~torch.isfinite(t.reshape(t.shape[0], -1)).all(dim=1)).flatten().tolist()


def to_output(decoded: torch.Tensor, output_type: str) -> Any:
    """Decoder output (N, 3, H, W) in [-1, 1] as ``pil`` / ``np`` / ``uint8`` (see :class:`GenerateConfig`).

    A NaN or an infinity raises :class:`NumericalError` (clamping would turn it into a plausible
    black or white image)."""
    bad = nonfinite_rows(decoded)
    if bad:
        raise NumericalError(f"the VAE decoder returned non-finite pixels (NaN or inf) for image(s) "
                             f"{', '.join(map(str, bad))} of {decoded.shape[0]}")
    if output_type == "np":
        # diffusers' postprocess: denormalise, clamp, NHWC float32 on the host.
        return (decoded.float() * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    pixels = to_uint8_nhwc(decoded).cpu().numpy()  # (N, H, W, 3) uint8
    if output_type == "uint8":
        return pixels
    if output_type == "pil":
        return to_pil(pixels)
    raise InvalidArgumentError("output-type", output_type, ("pil", "np", "uint8"))


def to_pil(pixels: np.ndarray) -> list:
    """(N, H, W, 3) uint8 -> N RGB PIL images."""
    from PIL import Image

    return [Image.fromarray(p, "RGB") for p in pixels]
