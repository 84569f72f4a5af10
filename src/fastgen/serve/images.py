"""Images in and out of the HTTP app: uploads and base64 decoded (size checked before any pixel is
decoded), results encoded as base64 PNG. These are CPU work that holds the GIL for milliseconds to
seconds, so the app runs them on worker threads (``anyio.to_thread.run_sync``), never on the event loop.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from typing import Any

from fastgen.errors import InvalidArgumentError
from fastgen.serve.errors import APIError

_DATA_URL = re.compile(r"^data:image/[a-zA-Z0-9.+-]+;base64,", re.ASCII)


def image_too_large(argument: str, width: int, height: int, limit: int) -> APIError:
    return APIError(413, f"{argument}: a {width}x{height} image has more than {limit} pixels (max_image_pixels)",
                    code="too_large", param=argument)


def _read(data: bytes, argument: str, max_pixels: int) -> Any:
    """Encoded image bytes -> the PIL image as stored, read as image files are read
    (:func:`fastgen.pipelines.classifier_images.read_image`: unsafe formats never opened, EXIF, 16-bit);
    413 above ``max_pixels`` (read from the header), one-line 400 naming ``argument`` for the rest."""
    from fastgen.pipelines.classifier_images import check_pixels, read_image

    if not data:
        raise InvalidArgumentError(argument, "an empty file", "a PNG, JPEG or WebP image")

    def check(width: int, height: int, argument: str, name: str) -> None:
        if width * height > max_pixels:
            raise image_too_large(argument, width, height, max_pixels)
        check_pixels(width, height, argument, name)

    return read_image(io.BytesIO(data), argument, "the uploaded data", check)


def decode_image(data: bytes, *, argument: str, max_pixels: int) -> Any:
    """Encoded image bytes (PNG, JPEG, WebP, ...) -> an RGB PIL image (see :func:`_read`)."""
    return _read(data, argument, max_pixels).convert("RGB")


def decode_mask(data: bytes, *, argument: str, max_pixels: int) -> Any:
    """An uploaded inpainting mask -> an ``L`` PIL image, white where the image is regenerated. With an
    alpha channel it is read as OpenAI's edits API reads it: transparent pixels are edited (an
    opaque mask edits nothing); without one, as diffusers reads masks: white is regenerated."""
    from PIL import ImageOps

    image = _read(data, argument, max_pixels)
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info:
        return ImageOps.invert(image.convert("RGBA").getchannel("A"))
    return image.convert("L")


def decode_base64_image(text: Any, *, argument: str, max_pixels: int) -> Any:
    """A base64 string (or a ``data:image/...;base64,`` URL) of an image -> an RGB PIL image."""
    if not isinstance(text, str):
        raise InvalidArgumentError(argument, type(text).__name__, "a base64 string of a PNG or JPEG image")
    payload = _DATA_URL.sub("", text.strip(), count=1)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidArgumentError(argument, f"{len(text)} characters", "a base64 string of a PNG or JPEG image",
                                   reason="not valid base64") from None
    return decode_image(data, argument=argument, max_pixels=max_pixels)


#: zlib level of the PNGs served: 1 encodes twice as fast as PIL's default 6 (1.3 ms against 2.5 ms for
#: a 128 x 128 generated image here; ~80 ms saved per 1024 x 1024 image) for files ~15% larger.
PNG_COMPRESS_LEVEL = 1


def png_base64(image: Any) -> str:
    """A PIL image as base64 PNG text."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


__all__ = ["decode_base64_image", "decode_image", "decode_mask", "image_too_large", "png_base64"]
