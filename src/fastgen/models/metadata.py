"""Typed metadata of a component: what a pipeline needs beside the weights, one class per kind.

A UNet carries its scheduler config and pipeline family, a VAE its latent scaling, a classifier its
labels and preprocessing, a text classifier its labels and token limit. ``models.assets`` fills
these when a component is loaded; ``fastgen.build`` stores them in the engine manifest
(:meth:`ComponentMetadata.to_manifest`, versioned by :data:`METADATA_VERSION`), and engines read
them back (:func:`metadata_from_manifest`).

Every field but the ones a kind cannot do without is optional: None means "not recorded" (a
custom ``nn.Module`` adapted by hand, a bare ``.onnx`` graph) and is left out of :meth:`to_dict`,
so a component's dict is exactly what its loader knew. The values a consumer falls back to for an
unrecorded field are defined here and nowhere else (:data:`IMAGENET_MEAN`, :data:`DEFAULT_RESAMPLE`,
:meth:`ImageClassifierMetadata.with_defaults`, :meth:`UNetMetadata.zeros_for_empty_prompt`...).

Readers tolerate writers newer than themselves: unknown keys are ignored and an unknown kind falls
back to the class of the component's name. This module imports only the standard library.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from fastgen.errors import InvalidArgumentError

logger = logging.getLogger(__name__)

#: Version of the metadata schema written into manifests (``{"version": ..., "kind": ..., "fields": ...}``).
METADATA_VERSION = 1

# --- the one place for defaults -----------------------------------------------------------------

#: ImageNet channel statistics (RGB): what torchvision and most transformers image models normalise with.
IMAGENET_MEAN: tuple[float, ...] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, ...] = (0.229, 0.224, 0.225)
#: Statistics for images of any other channel count: [0, 1] pixels mapped to [-1, 1].
NEUTRAL_MEAN: tuple[float, ...] = (0.5,)
NEUTRAL_STD: tuple[float, ...] = (0.5,)
#: PIL's resampling filters by name, as their integer codes (``PIL.Image.Resampling``).
RESAMPLE_FILTERS: dict[str, int] = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}
#: Bilinear: what transformers image processors use unless their config says otherwise.
DEFAULT_RESAMPLE = RESAMPLE_FILTERS["bilinear"]
#: Resize straight to the model's size (stretch), as fixed-size transformers processors do.
DEFAULT_CENTER_CROP = False
#: Input side of a classifier whose config and processor name none.
DEFAULT_IMAGE_SIZE = 224
#: diffusers' ``AutoencoderKL`` default ``scaling_factor`` (the SD 1.x VAE's).
DEFAULT_SCALING_FACTOR = 0.18215
#: Token limit of a text classifier whose export spec has no ``seq`` range.
DEFAULT_MAX_LENGTH = 512

Pipeline = Literal["sd", "sdxl", "sd3", "flux", "pixart"]
#: The values of :data:`Pipeline`, for validation.
PIPELINES: tuple[str, ...] = ("sd", "sdxl", "sd3", "flux", "pixart")


def _fail(kind: str, name: str, value: Any, expected: str) -> InvalidArgumentError:
    return InvalidArgumentError(f"{kind} metadata {name}", value, expected)


def _labels(kind: str, value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise _fail(kind, "labels", value, "a list of label names in output index order")
    return tuple(str(v) for v in value)


def _positive_int(kind: str, name: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        if isinstance(value, float) and value.is_integer() and value >= 1:  # JSON writers may emit 224.0
            return int(value)
        raise _fail(kind, name, value, "a positive integer")
    return int(value)


def _floats(kind: str, name: str, value: Any, *, positive: bool = False) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise _fail(kind, name, value, "a list of numbers, one per channel") from None
    if not out or not all(math.isfinite(v) and (v > 0 or not positive) for v in out):
        raise _fail(kind, name, value, "a non-empty list of finite numbers" + (" > 0" if positive else ""))
    return out


def _json_value(value: Any) -> Any:
    """A field value as JSON data: tuples as lists, dicts deep-copied (the caller may mutate them)."""
    if isinstance(value, tuple):
        return [_json_value(v) for v in value]
    if isinstance(value, dict):
        return copy.deepcopy(value)
    return value


@dataclass(frozen=True)
class ComponentMetadata:
    """Base of the per-kind metadata classes: frozen, JSON-serialisable, version-tolerant.

    Subclasses declare their fields with a docstring under each; ``kind`` names the class in
    manifests.
    """

    kind: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        """The recorded fields as JSON data (fields left at None are omitted)."""
        return {f.name: _json_value(getattr(self, f.name)) for f in dataclasses.fields(self)
                if getattr(self, f.name) is not None}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> ComponentMetadata:
        """Build from :meth:`to_dict`'s form; keys this version does not know (a newer writer's) are ignored."""
        data = dict(data or {})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            logger.debug("%s: ignoring metadata keys this fastgen does not know: %s", cls.__name__, unknown)
        return cls(**{k: v for k, v in data.items() if k in names})

    def to_manifest(self) -> dict[str, Any]:
        """The versioned form stored in an engine manifest's ``metadata`` entry."""
        return {"version": METADATA_VERSION, "kind": self.kind, "fields": self.to_dict()}


@dataclass(frozen=True)
class GenericMetadata(ComponentMetadata):
    """A component kind fastgen keeps no metadata for (a custom component name, a bare graph)."""

    kind: ClassVar[str] = "generic"


@dataclass(frozen=True)
class UNetMetadata(ComponentMetadata):
    """A diffusion UNet or transformer (component ``transformer``): how to schedule it and which conditioning
    family it belongs to."""

    kind: ClassVar[str] = "unet"

    scheduler: dict[str, Any] | None = None
    """The diffusers scheduler config (``scheduler_config.json``) the UNet is sampled with; None: not recorded."""
    pipeline: Pipeline | None = None
    """``sd`` (SD 1.x / 2.x text conditioning), ``sdxl`` (added ``text_time`` conditioning), or a diffusion
    transformer's family: ``sd3`` (SD3/3.5 MMDiT), ``flux`` (FLUX.1), ``pixart`` (PixArt-Sigma); None: not
    recorded (the generator infers it from the UNet's inputs)."""
    force_zeros_for_empty_prompt: bool | None = None
    """SDXL: an empty negative prompt conditions on zeros rather than on the encoded empty string; None:
    the pipeline's default (:meth:`zeros_for_empty_prompt`)."""

    def __post_init__(self) -> None:
        if self.scheduler is not None:
            if not isinstance(self.scheduler, Mapping):
                raise _fail(self.kind, "scheduler", self.scheduler, "a diffusers scheduler config dict")
            object.__setattr__(self, "scheduler", copy.deepcopy(dict(self.scheduler)))
        if self.pipeline is not None and self.pipeline not in PIPELINES:
            raise InvalidArgumentError(f"{self.kind} metadata pipeline", self.pipeline, PIPELINES)
        if self.force_zeros_for_empty_prompt is not None and not isinstance(self.force_zeros_for_empty_prompt, bool):
            raise _fail(self.kind, "force_zeros_for_empty_prompt", self.force_zeros_for_empty_prompt, "true or false")

    def zeros_for_empty_prompt(self, pipeline: str | None = None) -> bool:
        """The recorded flag, else diffusers' default for ``pipeline`` (default: the recorded one): on for SDXL only."""
        if self.force_zeros_for_empty_prompt is not None:
            return self.force_zeros_for_empty_prompt
        return (pipeline or self.pipeline) == "sdxl"


@dataclass(frozen=True)
class VaeMetadata(ComponentMetadata):
    """A VAE encoder or decoder: how latents are scaled and how much smaller than the images they are."""

    kind: ClassVar[str] = "vae"

    scaling_factor: float | None = None
    """Latents are ``scaling_factor *`` the VAE's posterior (0.18215 for SD 1.x, 0.13025 for SDXL); None: not
    recorded (the generator then needs it as an argument)."""
    latent_factor: int | None = None
    """Spatial downsampling from pixels to latents (8 for four-block VAEs); None: not recorded."""
    shift_factor: float | None = None
    """Latents are ``scaling_factor * (posterior - shift_factor)`` and decoded from ``latents / scaling_factor +
    shift_factor`` (SD3: 0.0609, FLUX: 0.1159); None: no shift (0), as SD 1.x / SDXL VAEs."""

    def __post_init__(self) -> None:
        if self.shift_factor is not None:
            if (isinstance(self.shift_factor, bool) or not isinstance(self.shift_factor, (int, float))
                    or not math.isfinite(self.shift_factor)):
                raise _fail(self.kind, "shift_factor", self.shift_factor, "a finite number")
            object.__setattr__(self, "shift_factor", float(self.shift_factor))
        if self.scaling_factor is not None:
            if (isinstance(self.scaling_factor, bool) or not isinstance(self.scaling_factor, (int, float))
                    or not math.isfinite(self.scaling_factor) or self.scaling_factor <= 0):
                raise _fail(self.kind, "scaling_factor", self.scaling_factor, "a finite number > 0")
            object.__setattr__(self, "scaling_factor", float(self.scaling_factor))
        factor = _positive_int(self.kind, "latent_factor", self.latent_factor)
        if factor is not None and factor & (factor - 1):
            raise _fail(self.kind, "latent_factor", factor, "a power of two (1, 2, 4, 8...)")
        object.__setattr__(self, "latent_factor", factor)


#: How token (or patch) states become one embedding (sentence-transformers' Pooling modes, plus
#: ``pooled``: the engine's own 2-D pooled output, e.g. ``pooler_output``).
POOLING_MODES: tuple[str, ...] = ("mean", "cls", "lasttoken", "max", "mean_sqrt_len_tokens", "pooled")


def _pooling(kind: str, pooling: Any, normalize: Any) -> None:
    if pooling is not None and pooling not in POOLING_MODES:
        raise InvalidArgumentError(f"{kind} metadata pooling", pooling, POOLING_MODES)
    if normalize is not None and not isinstance(normalize, bool):
        raise _fail(kind, "normalize", normalize, "true or false")


@dataclass(frozen=True)
class TextEncoderMetadata(ComponentMetadata):
    """A text encoder (``text-encoder``, ``text-encoder-2``, ``text-encoder-3``); its tokenizer travels beside
    the engine (``tokenizer/``). The embedding fields are what a sentence-transformers folder says
    (``modules.json``: ``1_Pooling/config.json``, a ``Normalize`` module, ``max_seq_length``)."""

    kind: ClassVar[str] = "text-encoder"

    pooling: str | None = None
    """How ``Scorer.embed`` pools the last hidden state (:data:`POOLING_MODES`); None: not recorded (mean
    pooling, or the engine's pooled output when it has one)."""
    normalize: bool | None = None
    """L2-normalise embeddings by default (a sentence-transformers ``Normalize`` module); None: not recorded (no)."""
    max_length: int | None = None
    """Texts are truncated to this many tokens (sentence-transformers' ``max_seq_length``); None: not recorded
    (the tokenizer's ``model_max_length``)."""

    def __post_init__(self) -> None:
        _pooling(self.kind, self.pooling, self.normalize)
        object.__setattr__(self, "max_length", _positive_int(self.kind, "max_length", self.max_length))


@dataclass(frozen=True)
class ImageClassifierMetadata(ComponentMetadata):
    """An image classifier: its label names and how images are turned into its input."""

    kind: ClassVar[str] = "image-classifier"

    labels: tuple[str, ...] | None = None
    """Label names in output index order; None: not recorded (``label_<i>``)."""
    image_size: int | tuple[int, int] | None = None
    """Input side in pixels, or ``(height, width)``; None: not recorded (the engine's input shape)."""
    mean: tuple[float, ...] | None = None
    """Per-channel mean subtracted from [0, 1] pixels; None: :data:`IMAGENET_MEAN` for RGB models, else 0.5."""
    std: tuple[float, ...] | None = None
    """Per-channel standard deviation pixels are divided by; None: :data:`IMAGENET_STD` for RGB, else 0.5."""
    resample: int | None = None
    """PIL resampling filter code (names in :data:`RESAMPLE_FILTERS` are accepted); None: :data:`DEFAULT_RESAMPLE`."""
    center_crop: bool | None = None
    """Scale the shorter side to cover the input and cut out the centre, instead of stretching; None: no."""

    def __post_init__(self) -> None:
        k = self.kind
        object.__setattr__(self, "labels", _labels(k, self.labels))
        size = self.image_size
        if isinstance(size, (list, tuple)):
            if len(size) != 2:
                raise _fail(k, "image_size", size, "an integer or (height, width)")
            size = (_positive_int(k, "image_size", size[0]), _positive_int(k, "image_size", size[1]))
        else:
            size = _positive_int(k, "image_size", size)
        object.__setattr__(self, "image_size", size)
        mean, std = _floats(k, "mean", self.mean), _floats(k, "std", self.std, positive=True)
        if mean is not None and std is not None and len(mean) != len(std):
            raise _fail(k, "std", list(std), f"{len(mean)} values, one per channel of the mean")
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)
        resample = self.resample
        if isinstance(resample, str) and resample.lower() in RESAMPLE_FILTERS:
            resample = RESAMPLE_FILTERS[resample.lower()]
        if resample is not None and (isinstance(resample, bool) or resample not in RESAMPLE_FILTERS.values()):
            raise InvalidArgumentError(f"{k} metadata resample", resample,
                                       [*RESAMPLE_FILTERS, *sorted(RESAMPLE_FILTERS.values())])
        object.__setattr__(self, "resample", None if resample is None else int(resample))
        if self.center_crop is not None and not isinstance(self.center_crop, bool):
            raise _fail(k, "center_crop", self.center_crop, "true or false")

    def with_defaults(self, channels: int = 3) -> ImageClassifierMetadata:
        """A copy with every unrecorded preprocessing field set to its default for a ``channels``-channel
        model (``labels`` and ``image_size`` stay as they are: their fallbacks come from the engine)."""
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if channels == 3 else (NEUTRAL_MEAN, NEUTRAL_STD)
        return dataclasses.replace(
            self, mean=self.mean if self.mean is not None else mean, std=self.std if self.std is not None else std,
            resample=self.resample if self.resample is not None else DEFAULT_RESAMPLE,
            center_crop=self.center_crop if self.center_crop is not None else DEFAULT_CENTER_CROP)


@dataclass(frozen=True)
class ImageEncoderMetadata(ImageClassifierMetadata):
    """An image encoder (``image-encoder``: ViT, DINOv2...): preprocessing as an image classifier's (no labels),
    and how its output becomes one embedding."""

    kind: ClassVar[str] = "image-encoder"

    pooling: str | None = None
    """``cls`` (the first token), ``mean`` (every token) or ``pooled`` (the engine's pooled output); None:
    not recorded (the pooled output when the engine has one, else ``cls``)."""
    normalize: bool | None = None
    """L2-normalise embeddings by default; None: not recorded (no)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _pooling(self.kind, self.pooling, self.normalize)


@dataclass(frozen=True)
class TextClassifierMetadata(ComponentMetadata):
    """A text classifier: its label names and how many tokens it reads."""

    kind: ClassVar[str] = "text-classifier"

    labels: tuple[str, ...] | None = None
    """Label names in output index order; None: not recorded (``label_<i>``)."""
    max_length: int | None = None
    """Texts are truncated to this many tokens; None: not recorded (the tokenizer's ``model_max_length``)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", _labels(self.kind, self.labels))
        object.__setattr__(self, "max_length", _positive_int(self.kind, "max_length", self.max_length))


#: The two-tower families (CLIP: ``logit_scale * cosine``, a softmax over texts; SigLIP: a sigmoid of it plus a bias).
TOWER_FAMILIES: tuple[str, ...] = ("clip", "siglip")


def _check_tower(meta: Any) -> None:
    """The fields :class:`TextTowerMetadata` and :class:`ImageTowerMetadata` share."""
    k = meta.kind
    if meta.family is not None and meta.family not in TOWER_FAMILIES:
        raise InvalidArgumentError(f"{k} metadata family", meta.family, TOWER_FAMILIES)
    for name in ("logit_scale", "logit_bias"):
        value = getattr(meta, name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or (
                name == "logit_scale" and value <= 0):
            raise _fail(k, name, value, "a finite number" + (" > 0" if name == "logit_scale" else ""))
        object.__setattr__(meta, name, float(value))


@dataclass(frozen=True)
class TextTowerMetadata(TextClassifierMetadata):
    """The text tower of a two-tower image-text model (CLIP, SigLIP): ``text_embeds`` (batch, dim), projected,
    not normalised; what the two towers' similarity needs travels with both towers."""

    kind: ClassVar[str] = "text-tower"

    family: str | None = None
    """``clip`` or ``siglip`` (:data:`TOWER_FAMILIES`); None: not recorded."""
    logit_scale: float | None = None
    """The multiplier of the cosine similarity: the model's ``logit_scale`` parameter already exponentiated
    (CLIP's initial value: 14.29, trained: 100); None: not recorded."""
    logit_bias: float | None = None
    """SigLIP's bias added to the scaled cosine before the sigmoid; None: none (CLIP)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_tower(self)


@dataclass(frozen=True)
class ImageTowerMetadata(ImageClassifierMetadata):
    """The image tower of a two-tower image-text model: ``image_embeds`` (batch, dim), projected, not normalised;
    its preprocessing fields are an image classifier's, plus the similarity's scale and bias."""

    kind: ClassVar[str] = "image-tower"

    family: str | None = None
    """``clip`` or ``siglip`` (:data:`TOWER_FAMILIES`); None: not recorded."""
    logit_scale: float | None = None
    """As :attr:`TextTowerMetadata.logit_scale` (the same value on both towers)."""
    logit_bias: float | None = None
    """As :attr:`TextTowerMetadata.logit_bias`."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_tower(self)


#: The box layouts of YOLO-style detector outputs: ``yolov8`` (ultralytics YOLOv8 / 11, NudeNet v3: one
#: (batch, 4 + classes, anchors) output, cx cy w h then class scores, no objectness) and ``yolov5`` (one
#: (batch, anchors, 5 + classes) output: cx cy w h, objectness, class scores).
DETECTOR_LAYOUTS: tuple[str, ...] = ("yolov8", "yolov5")


@dataclass(frozen=True)
class DetectorMetadata(ImageClassifierMetadata):
    """A YOLO-style object detector (``detector``): class names, input size and its boxes output's layout.

    Its images are letterboxed (resized keeping their aspect, padded with grey 114 to the input size,
    centred), never stretched or cropped; pixels are ``x / 255`` (mean 0, std 1) unless recorded."""

    kind: ClassVar[str] = "detector"

    stride: int | None = None
    """The largest stride of the detection heads (ultralytics' ``stride``, 32); None: not recorded (32)."""
    layout: str | None = None
    """:data:`DETECTOR_LAYOUTS`: ``yolov8`` or ``yolov5``; None: inferred from the output's shape."""

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "stride", _positive_int(self.kind, "stride", self.stride))
        if self.layout is not None and self.layout not in DETECTOR_LAYOUTS:
            raise InvalidArgumentError(f"{self.kind} metadata layout", self.layout, DETECTOR_LAYOUTS)

    def with_defaults(self, channels: int = 3) -> DetectorMetadata:
        """A copy with unrecorded preprocessing set to a detector's: ``x / 255`` (mean 0, std 1), bilinear."""
        return dataclasses.replace(
            self, mean=self.mean if self.mean is not None else (0.0,) * channels,
            std=self.std if self.std is not None else (1.0,) * channels,
            resample=self.resample if self.resample is not None else DEFAULT_RESAMPLE, center_crop=False)


#: Metadata class of each component name fastgen knows; any other name gets :class:`GenericMetadata`.
COMPONENT_METADATA: dict[str, type[ComponentMetadata]] = {
    "unet": UNetMetadata,
    "unet-controlled": UNetMetadata,
    "vae-decoder": VaeMetadata,
    "vae-encoder": VaeMetadata,
    "text-encoder": TextEncoderMetadata,
    "text-encoder-2": TextEncoderMetadata,
    "text-encoder-3": TextEncoderMetadata,
    "transformer": UNetMetadata,
    "classifier": ImageClassifierMetadata,
    "text-classifier": TextClassifierMetadata,
    "text-tower": TextTowerMetadata,
    "image-tower": ImageTowerMetadata,
    "image-encoder": ImageEncoderMetadata,
    "detector": DetectorMetadata,
}
_BY_KIND: dict[str, type[ComponentMetadata]] = {
    cls.kind: cls for cls in (GenericMetadata, *COMPONENT_METADATA.values())}


def metadata_class(component: str) -> type[ComponentMetadata]:
    """The metadata class of a component name (``unet``, ``classifier``...); GenericMetadata for others."""
    return COMPONENT_METADATA.get(component, GenericMetadata)


def metadata_from_dict(component: str, data: Mapping[str, Any] | None) -> ComponentMetadata:
    """Typed metadata of ``component`` from a plain dict: :meth:`ComponentMetadata.to_dict`'s form, which
    is also the ``extras`` dict of format-1 manifests (same keys, same values)."""
    return metadata_class(component).from_dict(data)


def metadata_from_manifest(component: str, entry: Mapping[str, Any] | None) -> ComponentMetadata:
    """Typed metadata from a manifest's ``metadata`` entry (:meth:`ComponentMetadata.to_manifest`).

    A kind this fastgen does not know (a newer writer's) is read as the class of ``component``;
    a newer ``version`` is read field by field, ignoring what this version does not know.
    """
    entry = dict(entry or {})
    if not entry:
        return metadata_class(component)()
    fields = entry.get("fields") or {}
    if not isinstance(fields, Mapping):
        raise InvalidArgumentError("manifest metadata fields", fields, "a JSON object")
    version = entry.get("version")
    if isinstance(version, int) and version > METADATA_VERSION:
        logger.debug("metadata version %s is newer than this fastgen's %d: reading the fields it knows",
                     version, METADATA_VERSION)
    cls = _BY_KIND.get(entry.get("kind"), metadata_class(component))  # type: ignore[arg-type]
    return cls.from_dict(fields)


__all__ = [
    "COMPONENT_METADATA", "PIPELINES", "DEFAULT_CENTER_CROP", "DEFAULT_IMAGE_SIZE", "DEFAULT_MAX_LENGTH", "DEFAULT_RESAMPLE",
    "DEFAULT_SCALING_FACTOR", "IMAGENET_MEAN", "IMAGENET_STD", "METADATA_VERSION", "NEUTRAL_MEAN", "NEUTRAL_STD",
    "RESAMPLE_FILTERS", "ComponentMetadata", "DETECTOR_LAYOUTS", "DetectorMetadata", "GenericMetadata", "ImageClassifierMetadata", "ImageEncoderMetadata", "POOLING_MODES", "TextClassifierMetadata",
    "TextEncoderMetadata", "TextTowerMetadata", "ImageTowerMetadata", "TOWER_FAMILIES", "UNetMetadata", "VaeMetadata", "metadata_class", "metadata_from_dict",
    "metadata_from_manifest",
]
