"""The denoising loop over a UNet engine, with diffusers' own schedulers (no sampler is re-implemented).

Randomness is per image: each image has its own ``torch.Generator`` (on the CPU, as diffusers draws
with CPU generators and then moves the noise), which draws, in this order, its VAE posterior sample
(image-to-image), its initial noise, then any noise the scheduler's steps ask for. So an image depends
on its own seed only, never on what else shares the batch.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Sequence
from typing import Any

import torch

from fastgen._progress import steps as progress_steps
from fastgen.errors import InvalidArgumentError
from fastgen.pipelines.conditioning import Conditioning, run_chunked

logger = logging.getLogger(__name__)

#: fastgen's sampler names -> (diffusers scheduler class, config overrides).
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "dpm++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "lcm": ("LCMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
}


def make_scheduler(name: str | None, config: dict[str, Any]):
    """A fresh diffusers scheduler: ``SchedulerClass.from_config(config)`` (schedulers are stateful).

    ``name`` None: the class the config names (``_class_name``), i.e. the model's own scheduler.
    """
    import diffusers

    if name is None:
        cls_name, overrides = config.get("_class_name"), {}
        if not isinstance(cls_name, str):
            raise InvalidArgumentError("scheduler", None, list(SCHEDULERS),
                                       reason="the model's scheduler config names no class: choose one")
    elif name in SCHEDULERS:
        cls_name, overrides = SCHEDULERS[name]
    else:
        raise InvalidArgumentError("scheduler", name, list(SCHEDULERS))
    cls = getattr(diffusers, cls_name, None)
    # Only scheduler classes: the name comes from a JSON file.
    if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
        raise InvalidArgumentError("scheduler", cls_name, list(SCHEDULERS), reason="not a diffusers scheduler class")
    return cls.from_config(config, **overrides)


def set_timesteps(scheduler: Any, steps: int, device: torch.device | str = "cpu") -> None:
    """``scheduler.set_timesteps(steps)``; a step count the scheduler refuses is a one-line error."""
    try:
        scheduler.set_timesteps(steps, device=device)
    except ValueError as exc:  # e.g. LCM: at most original_inference_steps; any: at most 1000
        reason = " ".join(str(exc).split()).replace("`", "")
        raise InvalidArgumentError("steps", steps, reason=f"{type(scheduler).__name__}: {reason}") from None


def step_kwargs(scheduler: Any, *, eta: float, generators: list[torch.Generator]) -> dict[str, Any]:
    """``eta`` and ``generator`` for the schedulers whose ``step`` takes them (diffusers' rule)."""
    params = set(inspect.signature(scheduler.step).parameters)
    out: dict[str, Any] = {}
    if "eta" in params:
        out["eta"] = eta
    if "generator" in params:
        out["generator"] = generators
    return out


def per_sample_noise(shape: Sequence[int], generators: list[torch.Generator], device: torch.device) -> torch.Tensor:
    """(len(generators), *shape[1:]) standard normal, row i drawn from generator i on the CPU, then moved."""
    rows = [torch.randn((1, *shape[1:]), generator=g, dtype=torch.float32) for g in generators]
    return torch.cat(rows).to(device)


def img2img_timesteps(scheduler: Any, steps: int, strength: float) -> torch.Tensor:
    """The tail of the schedule image-to-image runs: the last ``int(steps * strength)`` steps.

    None at all when that is 0 (strength 0): diffusers fails there; here the image is only
    encoded and decoded (PNDM's extra final timestep would otherwise still run once).
    """
    init_timestep = min(int(steps * strength), steps)
    if init_timestep == 0:
        return scheduler.timesteps[:0]
    t_start = max(steps - init_timestep, 0)
    timesteps = scheduler.timesteps[t_start * scheduler.order:]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(t_start * scheduler.order)
    return timesteps


def encode_images(vae_encoder: Any, pixels: torch.Tensor, sources: Sequence[int],
                  generators: list[torch.Generator], scaling_factor: float, device: torch.device) -> torch.Tensor:
    """Posterior samples ``scaling_factor * (mean + exp(logvar / 2) * noise)``, one per image.

    ``pixels`` (distinct images, 3, H, W) in [-1, 1]; image i encodes ``pixels[sources[i]]`` with
    noise from ``generators[i]``. Each distinct image goes through the encoder once.
    """
    out = run_chunked(vae_encoder, {"image": pixels})
    index = torch.tensor(list(sources), device=out["latent_mean"].device)
    mean = out["latent_mean"][index].to(device)  # (images, C, h, w)
    logvar = out["latent_logvar"][index].to(device)
    noise = per_sample_noise(mean.shape, generators, device)
    return scaling_factor * (mean + torch.exp(0.5 * logvar) * noise)


def denoise(unet: Any, scheduler: Any, latents: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning,
            guidance: torch.Tensor, generators: list[torch.Generator], *, eta: float = 0.0,
            progress: bool = False) -> tuple[torch.Tensor, list[float]]:
    """Run the UNet and the scheduler over ``timesteps``; returns the final latents and each step's ms.

    latents (images, C, h, w) float32; guidance (images, 1, 1, 1): one weight per image, so requests
    with different guidance can share a batch.
    """
    extra = step_kwargs(scheduler, eta=eta, generators=generators)
    step_ms: list[float] = []
    total = len(timesteps)
    with progress_steps("denoising", total, enabled=progress) as bar:
        for i, t in enumerate(timesteps):
            bar.advance(f"step {i + 1}/{total}")
            start = time.perf_counter()
            # One UNet call for both halves of classifier-free guidance: (2 * images, C, h, w).
            model_input = torch.cat([latents, latents]) if cond.guided else latents
            model_input = scheduler.scale_model_input(model_input, t)
            timestep = t.reshape(1).to(torch.float32).repeat(model_input.shape[0])  # (rows,)
            noise_pred = run_chunked(unet, {"sample": model_input, "timestep": timestep,
                                            **cond.feeds()})["noise_pred"].to(latents.device)
            if cond.guided:
                noise_uncond, noise_text = noise_pred.chunk(2)
                noise_pred = noise_uncond + guidance * (noise_text - noise_uncond)
            latents = scheduler.step(noise_pred, t, latents, **extra, return_dict=False)[0]
            step_ms.append((time.perf_counter() - start) * 1e3)
    return latents, step_ms
