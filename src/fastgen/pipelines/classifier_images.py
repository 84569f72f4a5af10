"""Image inputs of a classifier: load, convert and resize to uint8 pixels, channels last.

Accepted images (one, or a list / tuple of them):

- ``PIL.Image.Image``, any mode (converted to RGB, or L for a one-channel model; alpha is dropped);
- a file path (``str`` / ``os.PathLike``), opened with PIL;
- a ``numpy.ndarray`` of dtype uint8, ``(H, W)`` or ``(H, W, C)`` with C in 1, 3, 4 (RGB order);
  a 4-D ``(N, H, W, C)`` array is a batch of N images;
- a ``torch.Tensor`` of dtype uint8 laid out as the numpy arrays (channels last, as
  ``fastgen.ops.to_uint8_nhwc`` returns), or a float tensor **channels first** ``(C, H, W)`` /
  ``(N, C, H, W)`` with values in [0, 1] (torchvision's convention), turned into uint8 pixels by
  ``round_half_even(clamp(x, 0, 1) * 255)``.

Resizing is PIL's ``Image.resize`` with the model's ``resample`` filter: either straight to the
model's (height, width) ("stretch", the default and what most transformers image processors do
for a fixed ``{"height", "width"}`` size), or, with ``center_crop``, the shorter side scaled to
cover the target and the centre cut out. An image already at the model's size is not resampled.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from fastgen.errors import InvalidArgumentError
from fastgen.models.metadata import DEFAULT_CENTER_CROP, DEFAULT_RESAMPLE, RESAMPLE_FILTERS

_IMAGE_TYPES = "PIL images, image file paths, uint8 (H, W, C) arrays or float (C, H, W) tensors in [0, 1]"


def resample_code(value: Any) -> int:
    """PIL's resampling code from an int code or a name (``bilinear``, ``bicubic``...: ``RESAMPLE_FILTERS``)."""
    if isinstance(value, str) and value.lower() in RESAMPLE_FILTERS:
        return RESAMPLE_FILTERS[value.lower()]
    if (isinstance(value, (int, np.integer)) and not isinstance(value, bool)
            and int(value) in RESAMPLE_FILTERS.values()):
        return int(value)
    raise InvalidArgumentError("resample", value, [*RESAMPLE_FILTERS, *sorted(RESAMPLE_FILTERS.values())])


def is_image_file(path: str | os.PathLike) -> bool:
    """Whether PIL can identify the file (reads the header only)."""
    try:
        with Image.open(path):
            return True
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError):
        return False


def open_image(path: str | os.PathLike, argument: str = "image") -> Image.Image:
    """Open and fully decode an image file; any failure is one line naming the file."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy() if im.mode in ("RGB", "L") else im.convert("RGBA" if "A" in im.getbands() else "RGB")
    except FileNotFoundError:
        raise InvalidArgumentError(argument, os.fspath(path), reason="no such file") from None
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        detail = " ".join(str(exc).split()) or type(exc).__name__
        raise InvalidArgumentError(argument, os.fspath(path), reason=f"cannot read image: {detail}") from None


def flatten_images(images: Any, argument: str = "images") -> list[Any]:
    """One image, a batch array/tensor, or a sequence of images -> a flat list of single images."""
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
        return list(images)
    if isinstance(images, (Image.Image, str, os.PathLike, np.ndarray, torch.Tensor)):
        return [images]
    if isinstance(images, Sequence):
        out: list[Any] = []
        for item in images:
            if isinstance(item, (np.ndarray, torch.Tensor)) and item.ndim == 4:
                out.extend(item)
            else:
                out.append(item)
        return out
    raise InvalidArgumentError(argument, type(images).__name__, _IMAGE_TYPES + ", or a list of them")


def _array_to_hwc(arr: np.ndarray, argument: str) -> np.ndarray:
    """A uint8 (H, W) / (H, W, C) array -> (H, W, C) with C in 1, 3, 4."""
    if arr.dtype != np.uint8:
        raise InvalidArgumentError(argument, f"array of dtype {arr.dtype}",
                                   "uint8 arrays (H, W, C); float images go as (C, H, W) torch tensors in [0, 1]")
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4) or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise InvalidArgumentError(argument, f"array of shape {arr.shape}", "(H, W) or (H, W, C) with C in 1, 3, 4")
    return arr


def _tensor_to_hwc(t: torch.Tensor, argument: str) -> np.ndarray:
    t = t.detach().cpu()
    if t.dtype == torch.uint8:
        return _array_to_hwc(t.numpy(), argument)
    if not t.dtype.is_floating_point:
        raise InvalidArgumentError(argument, f"tensor of dtype {t.dtype}", "uint8 (H, W, C) or float (C, H, W) in [0, 1]")
    if t.dim() == 2:
        t = t.unsqueeze(0)
    if t.dim() != 3 or t.shape[0] not in (1, 3, 4):
        raise InvalidArgumentError(argument, f"float tensor of shape {tuple(t.shape)}",
                                   "(C, H, W) with C in 1, 3, 4 and values in [0, 1]")
    v = t.to(torch.float32).nan_to_num(0.0).clamp_(0.0, 1.0).mul_(255.0).round_()  # (C, H, W), half to even
    return v.to(torch.uint8).permute(1, 2, 0).contiguous().numpy()  # (H, W, C)


def _pil_from_hwc(arr: np.ndarray) -> Image.Image:
    if arr.shape[2] == 1:
        return Image.fromarray(arr[:, :, 0], mode="L")
    return Image.fromarray(np.ascontiguousarray(arr), mode="RGB" if arr.shape[2] == 3 else "RGBA")


def _convert_hwc(arr: np.ndarray, channels: int) -> np.ndarray:
    """Channel conversion of an (H, W, C) uint8 array the way PIL's ``convert`` does it."""
    have = arr.shape[2]
    if have == channels:
        return arr
    if channels == 3 and have == 4:
        return arr[:, :, :3]  # PIL's RGBA -> RGB drops alpha
    if channels == 3 and have == 1:
        return np.repeat(arr, 3, axis=2)
    return np.asarray(_pil_from_hwc(arr).convert("L" if channels == 1 else "RGB")).reshape(*arr.shape[:2], channels)


def _resize(im: Image.Image, size: tuple[int, int], resample: int, center_crop: bool) -> Image.Image:
    """PIL image -> exactly ``size`` = (height, width) pixels."""
    h, w = size
    if im.size == (w, h):
        return im
    if not center_crop:
        return im.resize((w, h), resample=resample)
    # Shorter side scaled to cover the target, then the centre cut out (torchvision's CenterCrop offsets).
    scale = max(h / im.height, w / im.width)
    rw, rh = max(w, round(im.width * scale)), max(h, round(im.height * scale))
    im = im.resize((rw, rh), resample=resample)
    left, top = int(round((rw - w) / 2.0)), int(round((rh - h) / 2.0))
    return im.crop((left, top, left + w, top + h))


def image_to_uint8(image: Any, size: tuple[int, int], *, channels: int = 3, resample: int = DEFAULT_RESAMPLE,
                   center_crop: bool = DEFAULT_CENTER_CROP, argument: str = "image") -> np.ndarray:
    """One image (any accepted kind) -> (height, width, channels) uint8 at the model's size."""
    if isinstance(image, (str, os.PathLike)):
        image = open_image(image, argument)
    if isinstance(image, torch.Tensor):
        image = _tensor_to_hwc(image, argument)
    if isinstance(image, np.ndarray):
        arr = _convert_hwc(_array_to_hwc(image, argument), channels)
        if arr.shape[:2] == tuple(size):
            return arr  # already at size: PIL's resize would only copy
        image = _pil_from_hwc(arr)
    if not isinstance(image, Image.Image):
        raise InvalidArgumentError(argument, type(image).__name__, _IMAGE_TYPES)
    mode = "L" if channels == 1 else "RGB"
    if image.mode != mode:
        image = image.convert(mode)
    image = _resize(image, size, resample, center_crop)
    return np.asarray(image).reshape(size[0], size[1], channels)


def images_to_uint8(images: Sequence[Any], size: tuple[int, int], *, channels: int = 3,
                    resample: int = DEFAULT_RESAMPLE, center_crop: bool = DEFAULT_CENTER_CROP,
                    argument: str = "images") -> torch.Tensor:
    """A list of images -> one (N, height, width, channels) uint8 tensor, contiguous."""
    out = np.empty((len(images), size[0], size[1], channels), dtype=np.uint8)  # (N, H, W, C)
    for i, image in enumerate(images):
        out[i] = image_to_uint8(image, size, channels=channels, resample=resample, center_crop=center_crop,
                                argument=argument if isinstance(image, (str, os.PathLike)) else f"{argument}[{i}]")
    return torch.from_numpy(out)
