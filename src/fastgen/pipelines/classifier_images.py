"""Image inputs of a classifier: load, convert and resize to uint8 pixels, channels last.

Accepted images (one, or a list / tuple of them):

- ``PIL.Image.Image``, any mode (converted to RGB, or L for a one-channel model; alpha is dropped).
  16-bit and 32-bit integer modes (``I;16``, ``I;16B``, ``I;16L``, ``I``) are scaled from
  [0, 65535] and float images (``F``) from [0, 1], as the float tensors below, instead of being
  clipped; palette images with transparency go through RGBA; an EXIF orientation is applied
  (the image as a viewer shows it);
- a file path (``str`` / ``os.PathLike``) of a regular file, opened with PIL (first frame of an
  animation); FIFOs, devices, sockets and directories are refused before anything is read, and so
  are images of more than ``PIL.Image.MAX_IMAGE_PIXELS`` pixels (PIL itself only warns up to twice
  that: a decompression bomb is a few bytes that decode to gigabytes);
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

import logging
import os
import stat
import struct
from collections.abc import Callable, Sequence
from typing import IO, Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from fastgen.errors import InvalidArgumentError
from fastgen.models.metadata import DEFAULT_CENTER_CROP, DEFAULT_RESAMPLE, RESAMPLE_FILTERS

logger = logging.getLogger(__name__)

_IMAGE_TYPES = "PIL images, image file paths, uint8 (H, W, C) arrays or float (C, H, W) tensors in [0, 1]"
#: PIL formats never opened: loading EPS runs Ghostscript (an interpreter) on the file's contents.
UNSAFE_FORMATS = frozenset({"EPS"})
#: Centre-crop resizes whose intermediate image would exceed this many pixels (and 16x the target)
#: resample only the kept window: a 100000 x 1 strip is 92 bytes as a PNG, but 6.4 million x 64 pixels
#: once its short side is scaled to 64. Below it the exact resize-then-crop of torchvision is kept.
EXACT_CROP_PIXELS = 1 << 22
# What PIL's decoders raise on malformed files (a broken EXIF or TIFF directory: struct.error, KeyError...).
_READ_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError, EOFError, IndexError, TypeError,
                KeyError, ZeroDivisionError, struct.error, Image.DecompressionBombError)


def resample_code(value: Any) -> int:
    """PIL's resampling code from an int code or a name (``bilinear``, ``bicubic``...: ``RESAMPLE_FILTERS``)."""
    if isinstance(value, str) and value.lower() in RESAMPLE_FILTERS:
        return RESAMPLE_FILTERS[value.lower()]
    if (isinstance(value, (int, np.integer)) and not isinstance(value, bool)
            and int(value) in RESAMPLE_FILTERS.values()):
        return int(value)
    raise InvalidArgumentError("resample", value, [*RESAMPLE_FILTERS, *sorted(RESAMPLE_FILTERS.values())])


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return kind
    return "not a plain file"


def open_regular(path: str | os.PathLike, argument: str = "image") -> IO[bytes]:
    """``path`` opened for binary reading when it is a regular file (symlinks followed), else a one-line
    :class:`InvalidArgumentError` naming it. Never blocks: a FIFO is opened non-blocking and refused
    from the open descriptor's own ``fstat``, so nothing can swap the file between check and open."""
    name = os.fspath(path)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(name, flags)
    except FileNotFoundError:
        raise InvalidArgumentError(argument, name, reason="no such file") from None
    except ValueError as exc:  # an embedded NUL byte
        raise InvalidArgumentError(argument, name, reason=str(exc)) from None
    except OSError as exc:  # a socket (ENXIO), a directory on some systems, no permission...
        try:
            mode = os.stat(name).st_mode
        except (OSError, ValueError):
            mode = stat.S_IFREG
        if not stat.S_ISREG(mode):
            raise InvalidArgumentError(argument, name, reason=f"not a regular file ({_file_kind(mode)})") from None
        raise InvalidArgumentError(argument, name, reason=f"cannot open: {exc.strerror or exc}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise InvalidArgumentError(argument, name, reason=f"not a regular file ({_file_kind(mode)})")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def check_pixels(width: int, height: int, argument: str, name: str) -> None:
    """Refuse an image (or video frame) larger than ``PIL.Image.MAX_IMAGE_PIXELS`` before decoding it."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and width * height > limit:
        raise InvalidArgumentError(argument, name, reason=f"{width}x{height} is {width * height} pixels, more than "
                                   f"PIL.Image.MAX_IMAGE_PIXELS ({limit}): a decompression bomb? raise that limit "
                                   "to read it")


def _formats() -> list[str]:
    Image.init()
    return [f for f in Image.ID if f not in UNSAFE_FORMATS]


def _detail(exc: BaseException) -> str:
    if isinstance(exc, UnidentifiedImageError):
        return "not an image format PIL reads"  # PIL's own message shows the file object's repr
    return " ".join(str(exc).split()) or type(exc).__name__


def is_image_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a regular file PIL can identify, within the pixel limit (reads the header only)."""
    try:
        with open_regular(path) as f, Image.open(f, formats=_formats()) as im:
            check_pixels(im.width, im.height, "image", os.fspath(path))
            return True
    except (InvalidArgumentError, *_READ_ERRORS):
        return False


def standard_mode(im: Image.Image, argument: str = "image") -> Image.Image:
    """``im`` upright (EXIF orientation applied) in L, RGB or RGBA, by the range its own mode holds.

    PIL's ``convert`` clips 16-bit, 32-bit and float pixels at 255 (a 16-bit photo turns white):
    integer modes are scaled from [0, 65535] (``I`` too: PIL opens 16-bit files as ``I`` as well),
    ``F`` from [0, 1] (NaN as 0), as float tensors are. Palette images with transparency go through
    RGBA, which PIL asks for; any other mode (1, CMYK, YCbCr, LAB, HSV, La, PA...) through ``convert``.
    """
    if im.width < 1 or im.height < 1:
        raise InvalidArgumentError(argument, f"{im.width}x{im.height} pixels", "images of at least 1x1 pixels")
    try:
        orientation = im.getexif().get(0x0112, 1)  # 0x0112: Orientation
    except _READ_ERRORS as exc:  # a malformed EXIF block does not make the pixels unreadable
        logger.debug("ignoring an unreadable EXIF block: %s", exc)
        orientation = 1
    if orientation in (2, 3, 4, 5, 6, 7, 8):
        try:
            im = ImageOps.exif_transpose(im)
        except _READ_ERRORS as exc:
            logger.debug("ignoring an EXIF orientation that cannot be applied: %s", exc)
    mode = im.mode
    if mode in ("L", "RGB", "RGBA"):
        return im
    if mode == "I" or mode.startswith("I;16"):
        levels = np.clip(np.asarray(im, dtype=np.int64), 0, 65535)
        return Image.fromarray(((levels + 128) // 257).astype(np.uint8))  # round(v * 255 / 65535), exact ints
    if mode == "F":
        levels = np.rint(np.clip(np.nan_to_num(np.asarray(im, dtype=np.float32), nan=0.0), 0.0, 1.0)
                         * np.float32(255.0))
        return Image.fromarray(levels.astype(np.uint8))
    if "A" in im.getbands() or "a" in im.getbands() or "transparency" in im.info:
        return im.convert("RGBA")
    return im.convert("RGB")


def read_image(f: IO[bytes], argument: str, name: str,
               check: Callable[[int, int, str, str], None] = check_pixels) -> Image.Image:
    """Fully decode an open binary image (its first frame) into L, RGB or RGBA (:func:`standard_mode`):
    ``check(width, height, argument, name)`` sees the header's size before any pixel is decoded (default:
    :func:`check_pixels`); unsafe formats are never opened; any failure is one line naming ``name``."""
    try:
        with Image.open(f, formats=_formats()) as im:
            check(im.width, im.height, argument, name)
            im.load()
            out = standard_mode(im, argument)
            return out.copy() if out is im else out  # a copy: the caller may close the file
    except _READ_ERRORS as exc:
        raise InvalidArgumentError(argument, name, reason=f"cannot read image: {_detail(exc)}") from None


def open_image(path: str | os.PathLike, argument: str = "image") -> Image.Image:
    """Open and fully decode a regular image file (:func:`read_image`); any failure, or more than
    ``MAX_IMAGE_PIXELS`` pixels, is one line naming the file."""
    with open_regular(path, argument) as f:
        return read_image(f, argument, os.fspath(path))


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
    # The other side is floored, as torchvision's Resize and transformers' image processors compute it
    # (int(size * long / short)): rounding would be a column off theirs on e.g. a 37x53 image.
    if h * im.width >= w * im.height:  # the height binds
        rw, rh = max(w, int(h * im.width / im.height)), h
    else:
        rw, rh = w, max(h, int(w * im.height / im.width))
    left, top = int(round((rw - w) / 2.0)), int(round((rh - h) / 2.0))
    if rw * rh > max(16 * w * h, EXACT_CROP_PIXELS):
        # The same window, resampled straight from the source (the filter scaled alike): an elongated
        # image is never blown up to millions of pixels only to have nearly all of them cut away.
        box = (left * im.width / rw, top * im.height / rh, (left + w) * im.width / rw, (top + h) * im.height / rh)
        return im.resize((w, h), resample=resample, box=box)
    im = im.resize((rw, rh), resample=resample)
    return im.crop((left, top, left + w, top + h))


def image_to_uint8(image: Any, size: tuple[int, int], *, channels: int = 3, resample: int = DEFAULT_RESAMPLE,
                   center_crop: bool = DEFAULT_CENTER_CROP, argument: str = "image") -> np.ndarray:
    """One image (any accepted kind) -> (height, width, channels) uint8 at the model's size."""
    if isinstance(image, (str, os.PathLike)):
        image = open_image(image, argument)  # already in a standard mode
    elif isinstance(image, Image.Image):
        image = standard_mode(image, argument)
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
