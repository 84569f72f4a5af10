"""What one generation call asks for (a frozen dataclass; the CLI's flags come from it) and what it returns."""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass, field
from typing import Any, Literal

from fastgen.core.config import ConfigMixin
from fastgen.errors import InvalidArgumentError

SchedulerName = Literal["euler", "euler-ancestral", "ddim", "dpm++", "lcm", "pndm"]
OutputType = Literal["pil", "np", "uint8", "latent"]

#: Largest seed: image ``j`` of a prompt uses ``seed + j``, which must stay a valid torch seed.
MAX_SEED = 2**63 - 1


def _check_int(name: str, value: Any, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low or (
            high is not None and value > high):
        allowed = f"integers >= {low}" if high is None else f"integers from {low} to {high}"
        raise InvalidArgumentError(name.replace("_", "-"), value, allowed)


def _check_float(name: str, value: Any, low: float, high: float | None = None) -> None:
    ok = (not isinstance(value, bool) and isinstance(value, numbers.Real) and value == value
          and value >= low and (high is None or value <= high) and value != float("inf"))
    if not ok:
        allowed = f"finite numbers >= {low}" if high is None else f"numbers from {low} to {high}"
        raise InvalidArgumentError(name.replace("_", "-"), value, allowed)


@dataclass(frozen=True)
class GenerateConfig(ConfigMixin):
    """Sampling settings of one text-to-image or image-to-image call."""

    steps: int = 20
    """Denoising steps asked of the scheduler (image-to-image runs the last strength * steps of them)."""
    guidance_scale: float = 7.5
    """Classifier-free guidance weight; 1 or less skips the unconditional pass, as diffusers does."""
    scheduler: SchedulerName | None = None
    """Sampler (a diffusers scheduler built from the model's scheduler config); none: the model's own."""
    height: int | None = None
    """Image height in pixels, a multiple the UNet accepts; none: the UNet profile's opt (text-to-image)
    or the input image's height rounded down to such a multiple (image-to-image)."""
    width: int | None = None
    """Image width in pixels (same rules as height)."""
    strength: float = 0.8
    """Image-to-image: how much of the input image is re-noised, from 0 (kept) to 1 (replaced)."""
    num_images_per_prompt: int = 1
    """Images per prompt; image j of a prompt with seed s uses the seed s + j."""
    seed: int | None = None
    """Seed of every prompt (image j gets seed + j, whatever else is in the batch); none: a random
    seed per prompt, reported in the result."""
    negative_prompt: str | None = None
    """What to steer away from, for every prompt; none: the empty prompt (SDXL: zero embeddings)."""
    output_type: OutputType = "pil"
    """pil (PIL images), np (float32 NHWC in [0, 1], as diffusers), uint8 (NHWC uint8 array) or
    latent (the final latents, undecoded)."""
    eta: float = 0.0
    """DDIM's eta: the weight of fresh noise at each step (0 is deterministic DDIM); other samplers ignore it."""

    def __post_init__(self) -> None:
        self.validate_literals()
        _check_int("steps", self.steps, 1)
        _check_float("guidance_scale", self.guidance_scale, 0.0)
        _check_float("strength", self.strength, 0.0, 1.0)
        _check_float("eta", self.eta, 0.0)
        _check_int("num_images_per_prompt", self.num_images_per_prompt, 1)
        for name in ("height", "width"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), 1)
        if self.seed is not None:
            _check_int("seed", self.seed, 0, MAX_SEED)
        if self.negative_prompt is not None and not isinstance(self.negative_prompt, str):
            raise InvalidArgumentError("negative-prompt", self.negative_prompt, "a string")

    def replace(self, **overrides: Any) -> GenerateConfig:
        """A copy with some fields changed (validated again); unknown names raise."""
        names = [f.name for f in dataclasses.fields(self)]
        unknown = sorted(set(overrides) - set(names))
        if unknown:
            raise InvalidArgumentError("generate option", unknown[0], names)
        return dataclasses.replace(self, **overrides)


@dataclass(frozen=True)
class Latencies:
    """Wall-clock time of each stage of one call, in milliseconds."""

    text_encoding_ms: float = 0.0
    """Tokenising and running the text encoder(s), prompts and negatives together."""
    vae_encode_ms: float = 0.0
    """Image-to-image: encoding the input image(s) into latents."""
    denoising_ms: float = 0.0
    """The whole denoising loop."""
    denoising_step_ms: tuple[float, ...] = ()
    """Each denoising step (UNet call, guidance, scheduler step)."""
    vae_decode_ms: float = 0.0
    """Decoding the final latents into images (0 for output_type latent)."""
    scoring_ms: float = 0.0
    """Best-of-N: scoring the candidates."""
    total_ms: float = 0.0
    """The whole call, checks and output conversion included."""

    def to_dict(self) -> dict[str, Any]:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in dataclasses.fields(self)}


@dataclass
class GenerationResult:
    """Images of one call with what made them: prompts, seeds, timings and (best-of-N) scores."""

    images: Any = field(repr=False)
    """``pil``: a list of PIL images; ``np``: float32 array (N, H, W, 3) in [0, 1]; ``uint8``: uint8
    array (N, H, W, 3); ``latent``: float32 tensor (N, C, H/F, W/F)."""
    prompts: list[str]
    """The prompt of each image."""
    seeds: list[int]
    """The seed of each image: the same prompt, config and seed give the same image."""
    prompt_indices: list[int]
    """Index of each image's prompt in the prompts passed in."""
    latencies: Latencies
    """Time per stage."""
    config: GenerateConfig
    """The settings used (after overrides)."""
    scores: list[Any] | None = None
    """Best-of-N: the scorer's ``Score`` of each kept image (best first within a prompt); else None."""
    rank_values: list[float] | None = None
    """Best-of-N: the value each kept image was ranked by."""
    extras: dict[str, Any] = field(default_factory=dict)
    """Anything else worth reporting (image size, scheduler, pipeline kind)."""

    def __len__(self) -> int:
        return len(self.seeds)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary (no pixels)."""
        scores = None
        if self.scores is not None:
            scores = [s.to_dict() if hasattr(s, "to_dict") else {"probs": dict(s.probs)} for s in self.scores]
        return {"prompts": list(self.prompts), "seeds": list(self.seeds), "prompt_indices": list(self.prompt_indices),
                "latencies": self.latencies.to_dict(), "config": self.config.to_dict(), "scores": scores,
                "rank_values": self.rank_values, **self.extras}
