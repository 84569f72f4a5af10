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

#: Largest seed: image ``j`` of a prompt uses ``seed + j``, which must stay a valid torch seed (and
#: every seed a result reports must be one ``--seed`` / ``seed=`` takes back).
MAX_SEED = 2**63 - 1
#: Longest prompt or text, in characters. CLIP reads 77 tokens and classifiers a few hundred, but the
#: tokenizers (and the truncation warning) go through the whole text first: a 10 MB prompt took a
#: minute of CPU before anything was refused.
MAX_TEXT_CHARS = 100_000
#: Most denoising steps: diffusers' schedulers train on 1000 timesteps and refuse more; a typo such as
#: ``steps=10**9`` must fail at once rather than allocate a billion-entry schedule.
MAX_STEPS = 1000
#: diffusers' default guidance_scale of each pipeline family (FLUX: the distilled guidance).
DEFAULT_GUIDANCE = {"sd": 7.5, "sdxl": 7.5, "sd3": 7.0, "flux": 3.5, "pixart": 4.5}
#: Largest mask blur radius in pixels: PIL's Gaussian blur takes time in the radius, and a blur wider
#: than any image only makes the mask uniform.
MAX_MASK_BLUR = 1000.0


def _check_int(name: str, value: Any, low: int, high: int | None = None) -> int:
    """``value`` as a plain int (numpy integers included), else one line naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low or (
            high is not None and value > high):
        allowed = f"integers >= {low}" if high is None else f"integers from {low} to {high}"
        raise InvalidArgumentError(name.replace("_", "-"), value, allowed)
    return int(value)


def _check_float(name: str, value: Any, low: float, high: float | None = None) -> float:
    ok = (not isinstance(value, bool) and isinstance(value, numbers.Real) and value == value
          and value >= low and (high is None or value <= high) and value != float("inf"))
    if not ok:
        allowed = f"finite numbers >= {low}" if high is None else f"numbers from {low} to {high}"
        raise InvalidArgumentError(name.replace("_", "-"), value, allowed)
    return float(value)


def check_seed(seed: Any, images: int = 1, argument: str = "seed") -> int:
    """``seed`` as a plain int (numpy integers included) such that ``seed + images - 1``, the seed of the
    last image, is still at most :data:`MAX_SEED`; else one line naming ``argument``."""
    high = MAX_SEED - max(int(images), 1) + 1
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed <= high:
        reason = (f"image j uses seed + j, so with {images} images the largest seed is {high}"
                  if images > 1 and isinstance(seed, numbers.Integral) and high < seed <= MAX_SEED else None)
        raise InvalidArgumentError(argument, seed, f"integers from 0 to {high}", reason=reason)
    return int(seed)


def check_text(argument: str, value: Any, what: str = "strings (the empty string is allowed)") -> str:
    """``value`` if it is a str that a tokenizer can take: at most :data:`MAX_TEXT_CHARS` characters
    and encodable as UTF-8 (no lone surrogate: invalid UTF-8 from a command line or a file read with
    ``surrogateescape`` arrives as one, and the Rust tokenizers raise a raw error on it). NUL and
    other control characters are characters like any other."""
    if not isinstance(value, str):
        shown = value if isinstance(value, (int, float, type(None))) else type(value).__name__
        raise InvalidArgumentError(argument, shown, what)
    if len(value) > MAX_TEXT_CHARS:
        raise InvalidArgumentError(argument, f"a text of {len(value)} characters",
                                   f"at most {MAX_TEXT_CHARS} characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidArgumentError(argument, value[max(exc.start - 10, 0):exc.end + 10],
                                   reason=f"a lone surrogate {value[exc.start]!r} at character {exc.start} (invalid "
                                          "UTF-8, e.g. decoded with surrogateescape): pass valid Unicode") from None
    return value


@dataclass(frozen=True)
class GenerateConfig(ConfigMixin):
    """Sampling settings of one text-to-image or image-to-image call."""

    OPTION_NAME = "generate option"

    steps: int = 20
    """Denoising steps asked of the scheduler (image-to-image runs the last strength * steps of them)."""
    guidance_scale: float | None = None
    """Classifier-free guidance weight; 1 or less skips the unconditional pass, as diffusers does (FLUX:
    the distilled guidance fed to the transformer); none: the pipeline's diffusers default (SD/SDXL 7.5,
    SD3 7, FLUX 3.5, PixArt 4.5)."""
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
    mask_blur: float = 0.0
    """Inpainting: radius of the Gaussian blur applied to the mask first (diffusers'
    ``mask_processor.blur``); softens the paste-back of padding_mask_crop. 0: none."""
    padding_mask_crop: int | None = None
    """Inpainting: work on the mask's bounding box grown by this many pixels (and to the output's
    aspect ratio), then paste the result back into the input image, as diffusers'
    ``padding_mask_crop``; none: the whole image."""
    controlnet_conditioning_scale: float | tuple[float, ...] = 1.0
    """ControlNet: the residuals are multiplied by it (0 turns a net off); a tuple gives one per net."""
    control_guidance_start: float | tuple[float, ...] = 0.0
    """ControlNet: fraction of the steps before which a net is off (0 to 1; a tuple: one per net)."""
    control_guidance_end: float | tuple[float, ...] = 1.0
    """ControlNet: fraction of the steps after which a net is off (above start, up to 1; a tuple: one per net)."""
    guess_mode: bool = False
    """ControlNet: the nets see the conditional half of guidance only, their residuals weighted from 0.1
    (first) to 1 (mid block), as diffusers' guess mode."""
    true_cfg_scale: float = 1.0
    """FLUX: true classifier-free guidance weight, on when above 1 and a negative prompt is given (an extra
    unconditional row per image, as FluxPipeline's true_cfg_scale); other pipelines ignore it."""
    max_sequence_length: int | None = None
    """SD3/FLUX/PixArt: T5 tokens per prompt (1 to 512); none: the pipeline's default (SD3 256, FLUX 512,
    PixArt 300). Requests of different lengths never share a transformer call."""

    def __post_init__(self) -> None:
        self.validate_literals()
        # Numbers are stored as plain ints and floats: numpy scalars are accepted, and the config (and
        # every result's to_dict) stays JSON-serialisable.
        normal = {"steps": _check_int("steps", self.steps, 1, MAX_STEPS),
                  "true_cfg_scale": _check_float("true_cfg_scale", self.true_cfg_scale, 0.0),
                  "strength": _check_float("strength", self.strength, 0.0, 1.0),
                  "eta": _check_float("eta", self.eta, 0.0),
                  "num_images_per_prompt": _check_int("num_images_per_prompt", self.num_images_per_prompt, 1)}
        for name in ("height", "width"):
            if getattr(self, name) is not None:
                normal[name] = _check_int(name, getattr(self, name), 1)
        normal["mask_blur"] = _check_float("mask_blur", self.mask_blur, 0.0, MAX_MASK_BLUR)
        if self.guidance_scale is not None:
            normal["guidance_scale"] = _check_float("guidance_scale", self.guidance_scale, 0.0)
        if self.max_sequence_length is not None:
            normal["max_sequence_length"] = _check_int("max_sequence_length", self.max_sequence_length, 1, 512)
        if self.padding_mask_crop is not None:
            normal["padding_mask_crop"] = _check_int("padding_mask_crop", self.padding_mask_crop, 0)
        normal.update(_check_control(self))
        if self.seed is not None:
            normal["seed"] = check_seed(self.seed, normal["num_images_per_prompt"])
        if self.negative_prompt is not None:
            check_text("negative-prompt", self.negative_prompt, "a string")
        for name, value in normal.items():
            object.__setattr__(self, name, value)

    def resolved(self, pipeline: str | None) -> GenerateConfig:
        """This config with ``guidance_scale`` set to ``pipeline``'s default when it is none (what a
        result reports)."""
        if self.guidance_scale is not None:
            return self
        return dataclasses.replace(self, guidance_scale=DEFAULT_GUIDANCE.get(pipeline or "sd", 7.5))



def _check_control(cfg: GenerateConfig) -> dict[str, Any]:
    """The ControlNet settings as a float or a tuple of floats each, every (start, end) pair ordered."""
    out: dict[str, Any] = {}
    for name, low, high in (("controlnet_conditioning_scale", -1e6, 1e6), ("control_guidance_start", 0.0, 1.0),
                            ("control_guidance_end", 0.0, 1.0)):
        value = getattr(cfg, name)
        if isinstance(value, (list, tuple)):
            if not value:
                raise InvalidArgumentError(name.replace("_", "-"), "[]", "a number or one number per ControlNet")
            out[name] = tuple(_check_float(f"{name}[{i}]", v, low, high) for i, v in enumerate(value))
        else:
            out[name] = _check_float(name, value, low, high)
    starts, ends = out["control_guidance_start"], out["control_guidance_end"]
    if isinstance(starts, tuple) and isinstance(ends, tuple) and len(starts) != len(ends):
        raise InvalidArgumentError("control-guidance-start", list(starts),
                                   reason=f"{len(starts)} values, but control-guidance-end has {len(ends)}")
    count = max(len(v) if isinstance(v, tuple) else 1 for v in (starts, ends))
    pairs = zip(starts if isinstance(starts, tuple) else [starts] * count,
                ends if isinstance(ends, tuple) else [ends] * count)
    for i, (start, end) in enumerate(pairs):
        if start >= end:
            raise InvalidArgumentError("control-guidance-start", start, f"less than control-guidance-end ({end})",
                                       reason=f"net {i}" if count > 1 else None)
    if not isinstance(cfg.guess_mode, bool):
        raise InvalidArgumentError("guess-mode", cfg.guess_mode, "True or False")
    return out


def check_image_memory(images: int, height: int, width: int, *, argument: str, per_prompt: int) -> None:
    """Refuse a call whose images could not all be held at once, before any work: a generator decodes
    every image of a call in one float32 (N, H, W, 3) batch (``num_images_per_prompt=10**9`` asked for
    terabytes and was killed by the kernel). ``argument`` names the count to lower."""
    from fastgen.models.spec import human_bytes, memory_limit_bytes

    limit = memory_limit_bytes()
    one = height * width * 3 * 4
    if one > limit:  # one image alone: the size is the culprit, not the count
        name, size = ("height", height) if height >= width else ("width", width)
        raise InvalidArgumentError(name, size, reason=f"one {height}x{width} image would need {human_bytes(one)}, "
                                   f"more than this machine's memory ({human_bytes(limit)})")
    if images * one > limit:
        raise InvalidArgumentError(argument, per_prompt, reason=f"{images} images of {height}x{width} would need "
                                   f"{human_bytes(images * one)} at once, more than this machine's memory "
                                   f"({human_bytes(limit)}); generate fewer per call")


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
