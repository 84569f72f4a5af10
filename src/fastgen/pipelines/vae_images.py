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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastgen.errors import InvalidArgumentError, NumericalError
from fastgen.ops import normalize_nchw, to_uint8_nhwc

IMAGE_KINDS = "a PIL image, a path to an image file, or a uint8 (height, width, 3) array"
# diffusers' VaeImageProcessor resizes with Lanczos by default.
RESAMPLE = "LANCZOS"


#: PIL mode of a uint8 array by its channels (None: a 2-D array).
_ARRAY_MODES = {None: "L", 1: "L", 3: "RGB", 4: "RGBA"}


def read_input(item: Any, argument: str, kinds: str, channels: Sequence[int | None] = (3,)):
    """One input image (a path, a PIL image, or a uint8 array of one of ``channels``: None for 2-D)
    as a PIL image in its stored mode, read as the classifier reads images
    (:func:`~fastgen.pipelines.classifier_images.open_image` / ``standard_mode``); callers convert.
    Anything else: a one-line error naming ``argument``, allowed ``kinds``."""
    from PIL import Image

    from fastgen.pipelines.classifier_images import open_image, standard_mode

    if isinstance(item, (str, os.PathLike)):
        return open_image(Path(item).expanduser(), argument)
    if isinstance(item, Image.Image):
        return standard_mode(item, argument)
    if isinstance(item, np.ndarray):
        shape = None if item.ndim == 2 else item.shape[2] if item.ndim == 3 else -1
        if item.dtype != np.uint8 or shape not in channels or 0 in item.shape:
            raise InvalidArgumentError(argument, f"array of shape {item.shape} and dtype {item.dtype}", kinds)
        array = np.ascontiguousarray(item[..., 0] if shape == 1 else item)
        return Image.fromarray(array, _ARRAY_MODES[shape])
    raise InvalidArgumentError(argument, type(item).__name__, kinds)


def per_prompt(value: Any, num_prompts: int, argument: str, noun: str, load: Callable[[Any], Any]) -> list:
    """``value``: one item for every prompt, or a list of one (or one per prompt), each read by
    ``load`` before any work; one per prompt."""
    if isinstance(value, (list, tuple)):
        if len(value) not in (1, num_prompts):
            raise InvalidArgumentError(argument, f"{len(value)} {noun}s", f"1 {noun} or one per prompt ({num_prompts})")
        items = [load(v) for v in value]
    else:
        items = [load(value)]
    return items * num_prompts if len(items) == 1 else items


def load_image(item: Any):
    """One input image as an RGB PIL image."""
    return read_input(item, "image", IMAGE_KINDS).convert("RGB")


def load_images(image: Any, num_prompts: int) -> list:
    """One image for every prompt, or one per prompt, as RGB PIL images (all read before any work)."""
    return per_prompt(image, num_prompts, "image", "image", load_image)


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
