"""Request bodies of the HTTP API (pydantic models): the OpenAI Images fields plus fastgen's own.

Types are checked strictly (``"4"`` is not a step count, ``4.5`` is not one either); unknown fields
are refused, naming them, so a typo never silently falls back to a default. The values themselves
(ranges, scheduler names, seeds) are checked by :class:`fastgen.GenerateConfig` and the service,
whose one-line errors name the field.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict

from fastgen.errors import InvalidArgumentError
from fastgen.serve.generation import CONFIG_FIELDS, GenerationParams

#: ``response_format`` values served: images come back inline, never as URLs to fetch later.
RESPONSE_FORMATS = ("b64_json",)
_SIZE = re.compile(r"^\s*([0-9]{1,6})\s*[xX]\s*([0-9]{1,6})\s*$")


def parse_size(size: str | None) -> tuple[int | None, int | None]:
    """``"WxH"`` -> (width, height); None or ``"auto"``: the model's default size."""
    if size is None or size.strip().lower() == "auto":
        return None, None
    match = _SIZE.match(size)
    if match is None or int(match.group(1)) < 1 or int(match.group(2)) < 1:
        raise InvalidArgumentError("size", size, "WIDTHxHEIGHT in pixels, e.g. 512x512, or auto")
    return int(match.group(1)), int(match.group(2))


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class ImageSettings(_Body):
    """Fields that generation (JSON) and editing (multipart form) share."""

    prompt: str
    n: int = 1
    size: str | None = None
    response_format: str = "b64_json"
    model: str | None = None
    user: str | None = None
    """Accepted for OpenAI compatibility, and ignored."""
    steps: int | None = None
    guidance_scale: float | None = None
    scheduler: str | None = None
    seed: int | None = None
    negative_prompt: str | None = None
    strength: float | None = None
    eta: float | None = None
    mask_blur: float | None = None
    padding_mask_crop: int | None = None
    true_cfg_scale: float | None = None
    """FLUX: true classifier-free guidance with ``negative_prompt`` when above 1."""
    max_sequence_length: int | None = None
    """SD3 / FLUX / PixArt: T5 tokens per prompt (default: the model family's)."""
    adapters: dict[str, float] | None = None
    """LoRA adapters the server loaded (``--lora``) to run with, name -> scale; ``{}``: none; absent:
    the server's (all of them, at their scales)."""
    candidates: int | None = None
    keep: int | None = None
    rank_by: str | None = None
    scorer: str | None = None
    """Best-of-N: the image classifier that ranks the candidates, by its ``/v1/models`` id or name;
    absent: the server's only one."""
    deadline_s: float | None = None
    """Seconds after submission by which the images must be done; later: 504."""
    stream: bool = False

    def to_params(self, image: Any = None, mask: Any = None) -> GenerationParams:
        if self.response_format not in RESPONSE_FORMATS:
            raise InvalidArgumentError("response_format", self.response_format, RESPONSE_FORMATS,
                                       reason="images are returned inline as base64 PNG")
        width, height = parse_size(self.size)
        settings = {name: getattr(self, name) for name in CONFIG_FIELDS}
        return GenerationParams(prompt=self.prompt, n=self.n, width=width, height=height, seed=self.seed,
                                candidates=self.candidates, keep=self.keep, rank_by=self.rank_by, model=self.model,
                                scorer=self.scorer,
                                deadline_s=self.deadline_s, image=image, mask=mask, adapters=self.adapters,
                                settings=settings)


class GenerationBody(ImageSettings):
    """``POST /v1/images/generations``."""


class ScoreBody(_Body):
    """``POST /v1/score``: texts, images (base64 PNG / JPEG, or ``data:`` URLs), or both."""

    texts: list[str] | None = None
    images: list[str] | None = None
    model: str | None = None
    """The scorer, by its ``/v1/models`` id or name; absent: the only text classifier for the texts,
    the only image classifier for the images."""
    deadline_s: float | None = None


class EmbeddingsBody(_Body):
    """``POST /v1/embeddings`` (OpenAI's fields, texts only, plus fastgen's ``images``)."""

    input: str | list[str] | None = None
    """A text or a list of texts."""
    model: str | None = None
    """The embedding model, by its ``/v1/models`` id or name; absent: the only one of the input's kind."""
    encoding_format: str = "float"
    """``float`` (lists of numbers) or ``base64`` (float32 little-endian bytes)."""
    user: str | None = None
    """Accepted for OpenAI compatibility, and ignored."""
    images: list[str] | None = None
    """fastgen's own: images (base64 PNG / JPEG, or ``data:`` URLs) for an image encoder, instead of ``input``."""
    deadline_s: float | None = None


class DetectBody(_Body):
    """``POST /v1/detect``: images (base64 PNG / JPEG, or ``data:`` URLs) and the detector's thresholds."""

    images: list[str]
    model: str | None = None
    """The detector, by its ``/v1/models`` id or name; absent: the only one."""
    conf: float | None = None
    iou: float | None = None
    max_det: int | None = None
    deadline_s: float | None = None


__all__ = ["DetectBody", "EmbeddingsBody", "GenerationBody", "ImageSettings", "RESPONSE_FORMATS", "ScoreBody",
           "parse_size"]
