"""Step-level generation: many requests, each with its own scheduler, advanced one denoising step at a time.

:class:`~fastgen.pipelines.generator.Generator` runs one batch from its first step to its last. Here
each request is a :class:`SampleState` that holds everything :meth:`Generator.generate` keeps for
one prompt (its own diffusers scheduler instance, timesteps and position in them, its CPU
``torch.Generator`` per image seeded ``seed + j``, its guidance weight, conditioning rows and
latents), so requests of one image size can share UNet calls while joining and leaving at any step
boundary (continuous batching, :mod:`fastgen.runtime`):

- :func:`prepare`: checks and per-request state (no model call);
- :func:`encode_prompts`: one text-encoder call for the prompts and negatives of many new requests;
- :func:`init_latents`: each request's initial noise, drawn from its own generators;
- :func:`denoise_step`: ONE UNet call over all rows of the given requests, each row with its own
  timestep (per-sample timesteps) and each request with its own guidance weight, then each
  request's scheduler steps on its slice;
- :func:`decode`: one VAE-decoder call for the finished requests.

The arithmetic is :mod:`fastgen.pipelines.sampling`'s, row for row, and the random draws come from
the request's own generators in the same order, so a request gives what ``Generator.generate`` gives
for it alone with the same seed, whatever else shares its UNet calls (equal to floating-point
rounding: a batched matrix product may round differently from a smaller one).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fastgen.errors import InvalidArgumentError, UnsupportedError
from fastgen.pipelines.conditioning import (
    Conditioning,
    assemble_conditioning,
    conditioning_texts,
    run_chunked,
)
from fastgen.pipelines.config import MAX_SEED, GenerateConfig
from fastgen.pipelines.sampling import make_scheduler, per_sample_noise, set_timesteps, step_kwargs


@dataclass(eq=False)
class SampleState:
    """One request (one prompt, ``config.num_images_per_prompt`` images) between denoising steps."""

    prompt: str
    config: GenerateConfig
    seeds: list[int]
    """Seed of each image: ``seed + j``."""
    height: int
    width: int
    scheduler: Any
    """This request's own diffusers scheduler (schedulers are stateful: never shared)."""
    timesteps: torch.Tensor
    generators: list[torch.Generator]
    """One CPU generator per image, as ``Generator.generate`` seeds them."""
    guided: bool
    guidance: torch.Tensor
    """(images, 1, 1, 1) float32: the guidance weight of each image."""
    extra: dict[str, Any]
    """``eta`` / ``generator`` for the schedulers whose ``step`` takes them."""
    zero_negative: bool
    index: int = 0
    """Steps taken so far."""
    latents: torch.Tensor | None = None
    """(images, C, h, w) float32 once :func:`init_latents` ran."""
    cond: Conditioning | None = None
    """UNet rows (unconditional first when guided) once :func:`encode_prompts` ran."""
    step_ms: list[float] = field(default_factory=list)
    """Wall time of each UNet call this request took part in (the whole batched call)."""
    text_encoding_ms: float = 0.0
    vae_decode_ms: float = 0.0

    @property
    def images(self) -> int:
        return len(self.seeds)

    @property
    def rows(self) -> int:
        """UNet rows per step: two per image with classifier-free guidance, else one."""
        return self.images * (2 if self.guided else 1)

    @property
    def total_steps(self) -> int:
        return len(self.timesteps)

    @property
    def done(self) -> bool:
        return self.index >= len(self.timesteps)


def _device(generator: Any) -> torch.device:
    device = getattr(generator.unet, "device", None)
    return device if isinstance(device, torch.device) else torch.device("cpu")


def prepare(generator: Any, prompt: str, config: GenerateConfig | None = None, *, seed: int | None = None,
            image: Any = None) -> SampleState:
    """Check one text-to-image request and make its state (scheduler, timesteps, generators); no model call.

    ``seed``: overrides ``config.seed``; neither: a random seed, reported in ``state.seeds``. Raises
    what :meth:`Generator.generate` raises for the same arguments (bad size, unknown scheduler, a
    step count the scheduler refuses).
    """
    if image is not None:
        raise UnsupportedError("step-level generation is text-to-image only; use Generator.generate for img2img")
    if not isinstance(prompt, str):
        raise InvalidArgumentError("prompt", prompt, "strings (the empty string is allowed)")
    cfg = config or GenerateConfig()
    base = seed if seed is not None else cfg.seed
    if base is None:
        base = secrets.randbelow(2**31)  # as Generator.generate draws an unseeded prompt's seed
    elif isinstance(base, bool) or not isinstance(base, int) or not 0 <= base <= MAX_SEED:
        raise InvalidArgumentError("seed", base, f"integers from 0 to {MAX_SEED}")
    height, width = generator._size(cfg, None)
    generator._check_size(height, width, [generator.unet, generator.vae_decoder])
    scheduler = make_scheduler(cfg.scheduler, generator.scheduler_config)
    set_timesteps(scheduler, cfg.steps, _device(generator))
    seeds = [base + j for j in range(cfg.num_images_per_prompt)]
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    guided = cfg.guidance_scale > 1.0
    zero_negative = (generator.pipeline == "sdxl" and generator.force_zeros_for_empty_prompt
                     and cfg.negative_prompt is None)
    guidance = torch.full((len(seeds), 1, 1, 1), float(cfg.guidance_scale), device=_device(generator))
    return SampleState(prompt=prompt, config=cfg, seeds=seeds, height=height, width=width, scheduler=scheduler,
                       timesteps=scheduler.timesteps, generators=generators, guided=guided, guidance=guidance,
                       extra=step_kwargs(scheduler, eta=cfg.eta, generators=generators), zero_negative=zero_negative)


def encode_prompts(generator: Any, states: Sequence[SampleState]) -> float:
    """Conditioning rows of every state from ONE text-encoder call (each distinct text encoded once).

    Returns the call's wall time in ms (also stored in each state's ``text_encoding_ms``).
    """
    start = time.perf_counter()
    texts: list[str] = []
    spans: list[tuple[int, int]] = []
    for s in states:
        own = conditioning_texts([s.prompt], negative_prompt=s.config.negative_prompt, guided=s.guided,
                                 zero_negative=s.zero_negative)
        spans.append((len(texts), len(own)))
        texts += own
    hidden, pooled = generator.prompt_encoder.encode(texts)  # (texts, seq, dim), (texts, pooled) or None
    sdxl = generator.pipeline == "sdxl"
    for s, (first, count) in zip(states, spans):
        own_pooled = pooled[first:first + count] if pooled is not None else None
        s.cond = assemble_conditioning(hidden[first:first + count], own_pooled, [s.images], guided=s.guided,
                                       zero_negative=s.zero_negative, sdxl=sdxl, height=s.height, width=s.width)
    ms = (time.perf_counter() - start) * 1e3
    for s in states:
        s.text_encoding_ms = ms
    return ms


def init_latents(generator: Any, states: Sequence[SampleState]) -> None:
    """Initial noise of each state from its own generators, times its scheduler's ``init_noise_sigma``."""
    device = _device(generator)
    for s in states:
        shape = (s.images, generator.latent_channels, s.height // generator.latent_factor,
                 s.width // generator.latent_factor)
        s.latents = per_sample_noise(shape, s.generators, device) * s.scheduler.init_noise_sigma


def _feeds(states: Sequence[SampleState], cache: dict | None) -> dict[str, torch.Tensor]:
    """The conditioning inputs of a batch: each state's rows in turn (its unconditional rows first)."""
    key = tuple(id(s) for s in states)
    if cache is not None and cache.get("key") == key:
        return cache["feeds"]
    parts = [s.cond.feeds() for s in states]  # type: ignore[union-attr]
    feeds = {name: torch.cat([p[name] for p in parts]) for name in parts[0]}
    if cache is not None:  # reused while the batch's membership stays the same
        cache.clear()
        cache.update(key=key, feeds=feeds, states=list(states))
    return feeds


def denoise_step(generator: Any, states: Sequence[SampleState], *, feeds_cache: dict | None = None) -> list:
    """Advance every state by one step: one UNet call over all their rows, then each scheduler's step.

    The states must share one image size and have steps left. ``feeds_cache``: a dict kept by the
    caller between calls, so the conditioning rows are concatenated only when the batch changes.
    Returns one entry per state: None, or the exception its scheduler step raised (that state is
    left as it was; the others advanced). An exception of the UNet call itself propagates, with no
    state changed, so a caller may retry a smaller batch.
    """
    if not states:
        return []
    sizes = {(s.height, s.width) for s in states}
    if len(sizes) != 1:
        raise InvalidArgumentError("states", sorted(sizes), reason="one UNet call takes one image size")
    start = time.perf_counter()
    inputs, timesteps = [], []
    for s in states:
        t = s.timesteps[s.index]
        # Both halves of guidance, as the solo loop: scale_model_input on (2 * images, C, h, w).
        model_input = torch.cat([s.latents, s.latents]) if s.guided else s.latents
        inputs.append(s.scheduler.scale_model_input(model_input, t))
        timesteps.append(t.reshape(1).to(torch.float32).expand(model_input.shape[0]))  # (rows,)
    sample = torch.cat(inputs)  # (rows, C, h, w)
    timestep = torch.cat(timesteps)  # (rows,): per-sample timesteps
    noise_pred = run_chunked(generator.unet, {"sample": sample, "timestep": timestep,
                                              **_feeds(states, feeds_cache)})["noise_pred"]
    errors: list = []
    offset = 0
    for s in states:
        own = noise_pred[offset:offset + s.rows].to(s.latents.device)
        offset += s.rows
        try:
            if s.guided:
                noise_uncond, noise_text = own.chunk(2)
                own = noise_uncond + s.guidance * (noise_text - noise_uncond)
            s.latents = s.scheduler.step(own, s.timesteps[s.index], s.latents, **s.extra, return_dict=False)[0]
            s.index += 1
            errors.append(None)
        except Exception as exc:  # one request's scheduler failing must not fail the batch
            errors.append(exc)
    ms = (time.perf_counter() - start) * 1e3
    for s, err in zip(states, errors):
        if err is None:
            s.step_ms.append(ms)
    return errors


def decode(generator: Any, states: Sequence[SampleState]) -> list[torch.Tensor]:
    """Each state's images (images, 3, H, W) in [-1, 1] from ONE VAE-decoder call (diffusers decodes
    ``latents / scaling_factor``). The states must share one image size."""
    if not states:
        return []
    start = time.perf_counter()
    latents = torch.cat([s.latents for s in states])  # type: ignore[misc]
    images = run_chunked(generator.vae_decoder, {"latent": latents / generator.scaling_factor})["image"]
    ms = (time.perf_counter() - start) * 1e3
    out, offset = [], 0
    for s in states:
        out.append(images[offset:offset + s.images])
        offset += s.images
        s.vae_decode_ms = ms
    return out


__all__ = ["SampleState", "decode", "denoise_step", "encode_prompts", "init_latents", "prepare"]
