"""Condition images for ControlNets, made without a model: Canny edges, and maps given as images.

- :func:`canny` / :func:`canny_image`: OpenCV's Canny edge detector (``cv2.Canny`` with its defaults:
  3x3 Sobel, L1 gradient magnitude) in numpy, used whether or not OpenCV is installed so edges never
  depend on the environment: Sobel gradients with replicated borders, the colour channel with the
  strongest gradient per pixel, non-maximum suppression along the gradient's direction (quantised to
  0/45/90/135 degrees with OpenCV's integer tangent test), a double threshold and hysteresis
  (8-connected). :func:`canny_image` gives the three-channel white-on-black edge image diffusers'
  ControlNet examples feed (``np.concatenate([edges[:, :, None]] * 3, axis=2)``).
- Depth, pose, segmentation... maps already rendered as images are loaded by :func:`load_map` (paths,
  PIL images, uint8 grayscale or RGB arrays; EXIF orientation applied, 16-bit depth PNGs scaled by
  their range where diffusers' ``convert("RGB")`` would clip them at 255) and turned into ControlNet input by
  :func:`control_pixels`, as diffusers' ControlNet pipelines do (``prepare_image`` through a
  ``VaeImageProcessor(do_convert_rgb=True, do_normalize=False)``): RGB, sides rounded down to a multiple
  of the VAE factor, Lanczos resize, values ``x / 255`` in [0, 1], NOT mapped to [-1, 1].
- :func:`control_batch` repeats them over a batch and for classifier-free guidance. In guess mode the
  ControlNet sees only the conditional half: the image is not doubled, and the unconditional half's
  residuals are zeros (:func:`fastgen.models.adapters_controlnet.zero_residuals`).

Model-based annotators (depth estimators, pose detectors, HED...) are out of scope: run them yourself
and pass their output maps.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import torch

from fastgen.errors import InvalidArgumentError
from fastgen.pipelines.vae_images import RESAMPLE, load_image, read_input, round_down

logger = logging.getLogger(__name__)

# OpenCV's fixed-point tangent of 22.5 degrees: round(tan(22.5 deg) * 2**15); 67.5 degrees is tested
# as tan(22.5) + 2 (tan 67.5 = tan 22.5 + 2 exactly), as cv2.Canny does.
_SHIFT = 15
_TG22 = int(0.4142135623730950488016887242097 * (1 << _SHIFT) + 0.5)
# diffusers' ControlNet examples use 100 / 200.
DEFAULT_LOW_THRESHOLD = 100.0
DEFAULT_HIGH_THRESHOLD = 200.0


def _sobel(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """3x3 Sobel derivatives of (H, W, C) pixels with replicated borders -> dx, dy (H, W, C) int32."""
    p = np.pad(pixels.astype(np.int32), ((1, 1), (1, 1), (0, 0)), mode="edge")
    left, right = p[:, :-2], p[:, 2:]  # (H+2, W, C)
    dx = (right[:-2] - left[:-2]) + 2 * (right[1:-1] - left[1:-1]) + (right[2:] - left[2:])
    up, down = p[:-2], p[2:]  # (H, W+2, C)
    dy = (down[:, :-2] - up[:, :-2]) + 2 * (down[:, 1:-1] - up[:, 1:-1]) + (down[:, 2:] - up[:, 2:])
    return dx, dy


def _strongest_channel(dx: np.ndarray, dy: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per pixel, the channel with the largest |dx| + |dy| (the first on ties, as OpenCV): dx, dy, mag (H, W)."""
    mag = np.abs(dx) + np.abs(dy)  # (H, W, C)
    pick = np.argmax(mag, axis=2)[..., None]  # argmax returns the first maximum
    return (np.take_along_axis(dx, pick, 2)[..., 0], np.take_along_axis(dy, pick, 2)[..., 0],
            np.take_along_axis(mag, pick, 2)[..., 0])


def _suppress(dx: np.ndarray, dy: np.ndarray, mag: np.ndarray, low: int) -> np.ndarray:
    """Non-maximum suppression: True where ``mag > low`` and ``mag`` is a maximum along the gradient.

    The neighbours across the edge are compared strictly on one side and non-strictly on the other
    (OpenCV's rule, so a plateau two pixels wide keeps one pixel); outside the image counts as 0.
    """
    h, w = mag.shape
    m = np.zeros((h + 2, w + 2), dtype=np.int64)
    m[1:-1, 1:-1] = mag
    centre = m[1:-1, 1:-1]

    def at(di: int, dj: int) -> np.ndarray:
        return m[1 + di:h + 1 + di, 1 + dj:w + 1 + dj]

    ax = np.abs(dx).astype(np.int64)
    ay = np.abs(dy).astype(np.int64) << _SHIFT
    tg22x = ax * _TG22
    tg67x = tg22x + (ax << (_SHIFT + 1))
    horizontal = ay < tg22x  # gradient within 22.5 degrees of x: compare left and right
    vertical = ~horizontal & (ay > tg67x)  # within 22.5 degrees of y: compare above and below
    diagonal = ~horizontal & ~vertical
    same_sign = (dx.astype(np.int64) ^ dy.astype(np.int64)) >= 0  # down-right / up-left gradient
    keep = np.where(horizontal, (centre > at(0, -1)) & (centre >= at(0, 1)), False)
    keep |= vertical & (centre > at(-1, 0)) & (centre >= at(1, 0))
    keep |= diagonal & same_sign & (centre > at(-1, -1)) & (centre > at(1, 1))
    keep |= diagonal & ~same_sign & (centre > at(-1, 1)) & (centre > at(1, -1))
    return keep & (centre > low)


def _hysteresis(candidates: np.ndarray, strong: np.ndarray) -> np.ndarray:
    """Candidates 8-connected (through candidates) to a strong pixel: a flood fill from the strong ones."""
    h, w = candidates.shape
    stride = w + 2
    cand = np.zeros((h + 2, w + 2), dtype=bool)  # a False frame: neighbours never leave the array
    cand[1:-1, 1:-1] = candidates
    cand = cand.ravel()
    edges = np.zeros_like(cand)
    seeds = np.zeros((h + 2, w + 2), dtype=bool)
    seeds[1:-1, 1:-1] = strong & candidates
    stack = np.flatnonzero(seeds).tolist()
    edges[stack] = True
    offsets = (-stride - 1, -stride, -stride + 1, -1, 1, stride - 1, stride, stride + 1)
    while stack:
        i = stack.pop()
        for off in offsets:
            j = i + off
            if cand[j] and not edges[j]:
                edges[j] = True
                stack.append(j)
    return edges.reshape(h + 2, w + 2)[1:-1, 1:-1]


def _threshold(argument: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise InvalidArgumentError(argument, value, "a finite number >= 0 (gradient magnitude, |dx| + |dy|)")
    return float(value)


def canny(pixels: np.ndarray, low_threshold: float = DEFAULT_LOW_THRESHOLD,
          high_threshold: float = DEFAULT_HIGH_THRESHOLD) -> np.ndarray:
    """Canny edges of uint8 pixels (H, W) or (H, W, C), as ``cv2.Canny(pixels, low, high)``: (H, W) uint8, 0 or 255.

    Thresholds are on the L1 gradient magnitude ``|dx| + |dy|`` of the 3x3 Sobel (0 to 2040 for uint8
    pixels), floored to integers; a pixel above ``high`` starts an edge, one above
    ``low`` continues it. The two are swapped when ``low > high``, as OpenCV does.
    """
    low = _threshold("low-threshold", low_threshold)
    high = _threshold("high-threshold", high_threshold)
    if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8 or pixels.ndim not in (2, 3) \
            or 0 in pixels.shape:
        shape = getattr(pixels, "shape", None)
        raise InvalidArgumentError("pixels", f"{type(pixels).__name__} of shape {shape}",
                                   "a non-empty uint8 array of shape (height, width) or (height, width, channels)")
    if low > high:
        low, high = high, low
    lo, hi = math.floor(low), math.floor(high)
    chans = pixels if pixels.ndim == 3 else pixels[:, :, None]
    dx, dy = _sobel(chans)
    dx, dy, mag = _strongest_channel(dx, dy)
    candidates = _suppress(dx, dy, mag, lo)
    edges = _hysteresis(candidates, mag > hi)
    return edges.astype(np.uint8) * np.uint8(255)


def canny_image(image: Any, low_threshold: float = DEFAULT_LOW_THRESHOLD,
                high_threshold: float = DEFAULT_HIGH_THRESHOLD):
    """The Canny edges of an image (anything :func:`~fastgen.pipelines.vae_images.load_image` takes) as an
    RGB PIL image, white edges on black: the condition image of a canny ControlNet."""
    from PIL import Image

    rgb = np.asarray(load_image(image), dtype=np.uint8)  # (H, W, 3)
    edges = canny(rgb, low_threshold, high_threshold)  # (H, W)
    return Image.fromarray(np.repeat(edges[:, :, None], 3, axis=2), "RGB")


def control_size(height: int, width: int, multiple: int = 8) -> tuple[int, int]:
    """``(height, width)`` rounded down to ``multiple`` (the VAE factor), as diffusers' image processor does."""
    for arg, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int) or value < multiple:
            raise InvalidArgumentError(arg, value, f"an integer >= {multiple} (pixels)")
    return round_down(height, multiple), round_down(width, multiple)


MAP_KINDS = "a PIL image, a path to an image file, or a uint8 (height, width) or (height, width, 3) array"


def load_map(item: Any):
    """One condition map as a PIL image in L, RGB or RGBA (upright, 16-bit scaled by its range), not yet RGB:
    diffusers resizes before converting, which differs for RGBA (PIL resizes with premultiplied alpha)."""
    return read_input(item, "control-image", MAP_KINDS, channels=(None, 3))


def control_pixels(images: Any, height: int, width: int, *, multiple: int = 8) -> torch.Tensor:
    """Condition images -> (N, 3, H, W) float32 in [0, 1]: a ControlNet's ``controlnet_cond``.

    ``images``: one image or a list (:func:`load_map`: a grayscale depth map becomes three equal
    channels). Each is resized (Lanczos) to ``height`` x ``width`` rounded down to ``multiple``, then
    converted to RGB and scaled by 1/255 with no normalisation, exactly as diffusers'
    ``control_image_processor`` does.
    """
    from PIL import Image

    h, w = control_size(height, width, multiple)
    items = list(images) if isinstance(images, (list, tuple)) else [images]
    if not items:
        raise InvalidArgumentError("control-image", "an empty list", "at least one image")
    arrays = []
    for item in items:
        img = load_map(item)
        if img.size != (w, h):
            img = img.resize((w, h), resample=getattr(getattr(Image, "Resampling", Image), RESAMPLE))
        arrays.append(np.asarray(img.convert("RGB"), dtype=np.uint8))  # (H, W, 3)
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)  # (N, 3, H, W) uint8
    return batch.to(torch.float32) / 255.0


def load_control_images(image: Any, num_prompts: int) -> list:
    """One condition image for every prompt, or one per prompt (:func:`load_map`), all read before any work."""
    items = list(image) if isinstance(image, (list, tuple)) else [image]
    if len(items) not in (1, num_prompts):
        raise InvalidArgumentError("control-image", f"{len(items)} images", f"1 image or one per prompt ({num_prompts})")
    return [load_map(i) for i in items]


def control_batch(pixels: torch.Tensor, batch_size: int, num_images_per_prompt: int = 1, *,
                  guidance: bool = False, guess_mode: bool = False) -> torch.Tensor:
    """Condition pixels (N, 3, H, W) repeated to the ControlNet's batch, as diffusers' ``prepare_image``.

    ``batch_size``: prompts x images per prompt. One image serves every row; N images (one per prompt)
    are each repeated ``num_images_per_prompt`` times. With classifier-free ``guidance`` and not
    ``guess_mode`` the batch is doubled (unconditional rows first, then conditional, like the latents);
    in guess mode the ControlNet runs on the conditional rows only.
    """
    if pixels.dim() != 4 or pixels.shape[0] < 1:
        raise InvalidArgumentError("control pixels", f"tensor of shape {tuple(pixels.shape)}", "(N, 3, height, width)")
    for arg, value in (("batch_size", batch_size), ("num_images_per_prompt", num_images_per_prompt)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidArgumentError(arg, value, "a positive integer")
    n = pixels.shape[0]
    if n != 1 and n * num_images_per_prompt != batch_size:
        raise InvalidArgumentError("control-image", f"{n} images",
                                   f"1 image or one per prompt ({batch_size // num_images_per_prompt})")
    out = pixels.repeat_interleave(batch_size if n == 1 else num_images_per_prompt, dim=0)
    return torch.cat([out, out]) if guidance and not guess_mode else out


__all__ = ["DEFAULT_HIGH_THRESHOLD", "DEFAULT_LOW_THRESHOLD", "canny", "canny_image", "control_batch",
           "control_pixels", "control_size", "load_control_images", "load_map"]
