"""Quantization configs: frozen, versioned dataclasses that say how ``quantize_`` rewrites a module.

Each config serialises to a JSON-able dict that names its class (``{"type": "Int8DynamicConfig",
"version": 1, ...}``); :func:`config_from_dict` reads any of them back. ``cache_key()`` is a stable
hash of that dict, so an engine built from a quantized component can key on it.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import numbers
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from fastgen.core.config import ConfigMixin
from fastgen.errors import InvalidArgumentError

#: Module-name patterns (``fnmatch``, matched against the qualified name inside the module given to
#: ``quantize_``) that stay in floating point unless a config's ``skip`` says otherwise. Why each one
#: is here is measured by ``fastgen.quant.sensitivity`` (see benchmarks/bench_quant.py and the report):
DEFAULT_SKIP: tuple[str, ...] = (
    # The timestep MLP feeds every ResNet block's scale/shift; it runs once per step on a (batch, 320)
    # input, so quantizing it saves nothing and its error reaches every block.
    "*time_embedding.*",
    # SDXL's added (text_time) conditioning MLP and class embeddings: the same argument.
    "*add_embedding.*",
    "*class_embedding.*",
    # DiTs' (PixArt, SD3, Flux) timestep MLP: the same argument. On a 4-block PixArt (width 128,
    # random weights) its two layers are the 2nd and 3rd most sensitive of 50 after the final
    # proj_out (W8A8 alone: 57 and 62 dB; fp8: 43 and 45 dB); keeping them (and proj_out, below) in
    # float lifts the whole model from 41.9 to 56.6 dB (W8A8) and from 28.0 to 44.3 dB (fp8).
    "*timestep_embedder.*",
    # Diffusion transformers, measured with fastgen.quant.sensitivity on tiny-sd3/-flux/-pixart and
    # on one larger shape per family (width 384, 6 blocks, 256x256 px, random weights; figures from
    # there, W8A8 / fp8 alone, full ranking in benchmarks/results/quant_accuracy_dit_cpu.json):
    # - SD3's and FLUX's conditioning MLPs (timestep, pooled-text and FLUX's guidance embedders): 60-70 /
    #   48-54 dB, the next most sensitive after the layers below; one row per image, nothing to save.
    "*time_text_embed.*",
    # - FLUX's x_embedder (packed latents in): 43 / 29 dB, as bad as the final projection; tiny (64 wide).
    "*x_embedder",
    # - the final adaLN modulation (norm_out.linear, SD3 and FLUX): 59-61 / 48-49 dB, third; one row
    #   per image. The blocks' adaLN linears (norm1.linear, norm1_context.linear, FLUX single blocks'
    #   norm.linear, PixArt's adaln_single.linear) are not sensitive (worst 71 / 58 dB) and hold a
    #   quarter of FLUX's weights, so they are quantized; so are the context_embedder (84-87 / 72-74 dB),
    #   PixArt's caption_projection (66 / 55 dB), the attention out projections (70-84 / 56-71 dB) and
    #   FLUX single blocks' proj_out (69 / 61 dB, like any feed-forward output, and their largest layer).
    "*norm_out.linear",
    # With these and the final proj_out in float, the final latents of a denoising loop gain 6 to 34 dB
    # (W8A8, fp8; int8 weight-only 0.2 to 24 dB) for 2-5% of the larger shapes' weights: see
    # docs/quantization.md ("Diffusion transformers") for the table per family and config.
    # First and last convolutions (3x3 in every diffusers UNet/VAE, so never eligible anyway; listed
    # so that a model with a 1x1 conv_in/conv_out keeps them in float too).
    "*conv_in",
    "*conv_out",
    # The 1x1 convolutions on a diffusers UNet's residual stream: the ResNet blocks' conv_shortcut
    # (over concatenated skip features of very different scales) and the transformer blocks'
    # proj_in/proj_out (SD 1.x; Linear in SDXL). Measured with fastgen.quant.sensitivity on sd15
    # (256 px, random weights): they are the 46 most sensitive layers of 230 and carry 89% of the
    # output error of W8A8 (predicted 35.6 -> 45.1 dB without them); on tiny, keeping them in float
    # lifts the final latents from 38.9 to 51.0 dB (W8A8) and 28.4 to 40.4 dB (fp8), for about 15% of
    # the quantizable multiply-adds. Pass skip=() (or your own list) to quantize them too.
    "*conv_shortcut",
    "*proj_in",
    "*attentions.*.proj_out",
    # A DiT's final projection (top level of the model, or of its component wrapper): its most sensitive
    # layer in every family (41-44 dB W8A8, 28-29 dB fp8 alone). Not "*proj_out", which would keep
    # FLUX's single-block output projections (not sensitive, see above) in float as well.
    "proj_out",
    "model.proj_out",
    # Classifier heads: the logits decide top-1 and nothing after the head averages its error out
    # (tiny ResNet W8A8: logits 53.6 -> 40.1 dB with the head quantized); a negligible share of compute.
    "*classifier",
    "*classifier.*",
)


def _check_patterns(name: str, value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, tuple) or not all(isinstance(p, str) and p for p in value):
        raise InvalidArgumentError(name, value, "None or a sequence of non-empty fnmatch patterns")


@dataclass(frozen=True)
class QuantConfig(ConfigMixin):
    """Base of the quantization configs (not used directly)."""

    #: What ``version`` a config of this class must carry; bumped when its meaning changes.
    VERSION: ClassVar[int] = 1
    #: Weight storage: int8, int4 (packed two per byte, per group) or fp8 (e4m3, per channel).
    weight_dtype: ClassVar[Literal["int8", "int4", "fp8"]] = "int8"
    #: Activations: None (weight-only, computed in the input's float dtype), quantized per token at
    #: run time (``dynamic``) or with one calibrated per-tensor scale (``static``).
    activation: ClassVar[Literal["dynamic", "static"] | None] = None

    skip: tuple[str, ...] | None = None
    """Module-name patterns (fnmatch, e.g. ``*attn1.to_q``) left in floating point; None uses
    ``fastgen.quant.DEFAULT_SKIP`` (time embeddings, first/last convs, classifier heads); () skips nothing."""
    version: int = 1
    """Config format version; configs written by another version of this class are refused."""

    def __post_init__(self) -> None:
        if type(self) is QuantConfig:
            raise InvalidArgumentError("config", "QuantConfig", sorted(CONFIG_TYPES),
                                       reason="use one of the concrete configs")
        if isinstance(self.skip, list):
            object.__setattr__(self, "skip", tuple(self.skip))
        _check_patterns("skip", self.skip)
        if self.version != self.VERSION:
            raise InvalidArgumentError("version", self.version, (self.VERSION,),
                                       reason=f"{type(self).__name__} of another fastgen version")
        self.validate_literals()

    # -- derived facts the quantized modules use ------------------------------------------------
    @property
    def group_size(self) -> int | None:
        """Weight scale group along K (None: one scale per output channel)."""
        return None

    @property
    def act_dtype(self) -> Literal["int8", "fp8"] | None:
        """Element type of quantized activations (None: weight-only)."""
        if self.activation is None:
            return None
        return "fp8" if self.weight_dtype == "fp8" else "int8"

    @property
    def uses_smoothing(self) -> bool:
        return bool(getattr(self, "smoothquant", False))

    @property
    def needs_calibration(self) -> bool:
        """Whether ``quantize_`` needs ``fastgen.calibrate`` statistics first."""
        return self.uses_smoothing or self.activation == "static"

    def skip_patterns(self) -> tuple[str, ...]:
        return DEFAULT_SKIP if self.skip is None else self.skip

    def skips(self, name: str) -> bool:
        """Whether the module called ``name`` stays in floating point under this config."""
        return any(fnmatch.fnmatchcase(name, p) for p in self.skip_patterns())

    def describe(self) -> str:
        """Short form for ``extra_repr``/logs: the class and the fields that change the math."""
        ignore = {"skip", "version"}
        parts = [f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self) if f.name not in ignore]
        return f"{type(self).__name__}({', '.join(parts)})"

    def same_math(self, other: QuantConfig) -> bool:
        """Equal apart from the skip list (which decides where, not how, a layer is quantized)."""
        return type(self) is type(other) and dataclasses.replace(self, skip=None) == dataclasses.replace(
            other, skip=None)

    # -- serialisation ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"type": type(self).__name__, **super().to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantConfig:
        if cls is QuantConfig:  # the base class reads any config (a field typed QuantConfig)
            return config_from_dict(data)
        data = dict(data)
        kind = data.pop("type", cls.__name__)
        if kind != cls.__name__:
            raise InvalidArgumentError("type", kind, (cls.__name__,))
        return super().from_dict(data)

    def cache_key(self) -> str:
        # to_dict() already names the class and carries the version.
        from fastgen.core.config import sha256_json

        return sha256_json(self.to_dict())


def _check_alpha(alpha: Any) -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0.0 <= alpha <= 1.0:
        raise InvalidArgumentError("alpha", alpha, "numbers from 0 to 1")


@dataclass(frozen=True)
class Int8WeightOnlyConfig(QuantConfig):
    """int8 weights with one scale per output channel; activations stay in floating point.

    The cheapest to apply (no calibration) and the most accurate; saves weight memory and bandwidth
    (small batches), not arithmetic.
    """

    weight_dtype: ClassVar[str] = "int8"
    activation: ClassVar[str | None] = None


@dataclass(frozen=True)
class Int4WeightOnlyConfig(QuantConfig):
    """int4 weights (packed two per byte) with one scale per group of ``group_size`` input channels."""

    weight_dtype: ClassVar[str] = "int4"
    activation: ClassVar[str | None] = None

    group_size: Literal[32, 64, 128] = 128  # type: ignore[assignment]
    """Input channels sharing one weight scale; layers whose in_features it does not divide stay in
    floating point (logged), as do layers too small to split into groups."""

    def __post_init__(self) -> None:
        if isinstance(self.group_size, bool) or self.group_size not in (32, 64, 128):
            raise InvalidArgumentError("group-size", self.group_size, (32, 64, 128))
        super().__post_init__()


@dataclass(frozen=True)
class Int8DynamicConfig(QuantConfig):
    """W8A8: int8 weights per output channel, int8 activations quantized per token at run time.

    ``smoothquant`` migrates activation outliers into the weights (SmoothQuant, Xiao et al. 2023):
    per input channel j, ``s_j = amax(X_j)**alpha / amax(W_j)**(1 - alpha)``; the layer computes
    ``(X / s) @ (W * s).T``. It needs per-channel activation maxima from ``fastgen.calibrate``.
    """

    weight_dtype: ClassVar[str] = "int8"
    activation: ClassVar[str | None] = "dynamic"

    smoothquant: bool = False
    """Apply SmoothQuant smoothing (needs ``fastgen.calibrate(module, forward_loop)`` first)."""
    alpha: float = 0.5
    """SmoothQuant migration strength: 0 leaves activations as they are, 1 moves all their range into the weights."""

    def __post_init__(self) -> None:
        if not isinstance(self.smoothquant, bool):
            raise InvalidArgumentError("smoothquant", self.smoothquant, (True, False))
        _check_alpha(self.alpha)
        super().__post_init__()


@dataclass(frozen=True)
class Int8StaticConfig(QuantConfig):
    """W8A8 with one calibrated per-tensor activation scale per layer (needs ``fastgen.calibrate``).

    The form TensorRT's explicit quantization and ONNX Runtime's QDQ fusions execute in int8: the
    ONNX export is a plain QuantizeLinear/DequantizeLinear pair in front of each MatMul. Less
    accurate than per-token scales when activations have outliers; ``smoothquant`` helps there.
    """

    weight_dtype: ClassVar[str] = "int8"
    activation: ClassVar[str | None] = "static"

    smoothquant: bool = False
    """Apply SmoothQuant smoothing before the per-tensor quantization."""
    alpha: float = 0.5
    """SmoothQuant migration strength (0 to 1)."""

    def __post_init__(self) -> None:
        if not isinstance(self.smoothquant, bool):
            raise InvalidArgumentError("smoothquant", self.smoothquant, (True, False))
        _check_alpha(self.alpha)
        super().__post_init__()


@dataclass(frozen=True)
class Fp8DynamicConfig(QuantConfig):
    """fp8 (e4m3) weights with one scale per output channel and fp8 activations scaled per token
    (row-wise) at run time; fp8 tensor cores on Hopper/Ada, the exact PyTorch math elsewhere."""

    weight_dtype: ClassVar[str] = "fp8"
    activation: ClassVar[str | None] = "dynamic"


#: ``type`` key -> config class, for :func:`config_from_dict`.
CONFIG_TYPES: dict[str, type[QuantConfig]] = {
    c.__name__: c for c in (Int8WeightOnlyConfig, Int4WeightOnlyConfig, Int8DynamicConfig, Int8StaticConfig,
                            Fp8DynamicConfig)
}


#: Named quantization recipes: what ``BuildConfig(quantization=...)`` and ``fastgen build
#: --quantization`` accept (the names the accuracy report in benchmarks/results uses).
QuantPreset = Literal["none", "int8-weight-only", "int4-weight-only", "int4-weight-only-g64", "w8a8-dynamic",
                      "w8a8-dynamic-smoothquant", "w8a8-static", "w8a8-static-smoothquant", "fp8-dynamic"]
QUANT_PRESETS: dict[str, QuantConfig] = {
    "int8-weight-only": Int8WeightOnlyConfig(),
    "int4-weight-only": Int4WeightOnlyConfig(group_size=128),
    # 64 divides every SD UNet width (320, 640, 1280) that 128 does not.
    "int4-weight-only-g64": Int4WeightOnlyConfig(group_size=64),
    "w8a8-dynamic": Int8DynamicConfig(),
    "w8a8-dynamic-smoothquant": Int8DynamicConfig(smoothquant=True),
    "w8a8-static": Int8StaticConfig(),
    "w8a8-static-smoothquant": Int8StaticConfig(smoothquant=True),
    "fp8-dynamic": Fp8DynamicConfig(),
}


def resolve_quantization(value: Any) -> QuantConfig | None:
    """A preset name (``"none"`` -> None), a config, or a config's dict, as a config (or None)."""
    if value is None or value == "none":
        return None
    if isinstance(value, str):
        if value not in QUANT_PRESETS:
            raise InvalidArgumentError("quantization", value, ["none", *QUANT_PRESETS])
        return QUANT_PRESETS[value]
    return check_config(value)


def config_from_dict(data: dict[str, Any]) -> QuantConfig:
    """The config a ``to_dict()`` (or its JSON) describes, dispatched on its ``type`` key."""
    if not isinstance(data, dict):
        raise InvalidArgumentError("config", type(data).__name__, "a dict with a 'type' key")
    kind = data.get("type")
    if kind not in CONFIG_TYPES:
        raise InvalidArgumentError("config type", kind, sorted(CONFIG_TYPES))
    return CONFIG_TYPES[kind].from_dict(data)


def check_config(config: Any) -> QuantConfig:
    """``config`` itself when it is a concrete quantization config (a dict is parsed), else raise."""
    if isinstance(config, dict):
        return config_from_dict(config)
    if not isinstance(config, QuantConfig) or type(config) is QuantConfig:
        raise InvalidArgumentError("config", type(config).__name__, sorted(CONFIG_TYPES))
    return config
