"""The per-family parts of sampling SD3, FLUX and PixArt-Sigma in :mod:`fastgen.pipelines.stepping`'s loop.

The loop itself (one transformer call per step over many requests, guidance, each request's own
scheduler) is the UNets' one; what differs lives here, each rule as its diffusers pipeline has it:

- schedules: SD3/FLUX sample with FlowMatchEulerDiscreteScheduler; FLUX passes ``sigmas =
  linspace(1, 1/steps, steps)`` and a resolution-dependent ``mu`` (:func:`calculate_shift` over the
  image's token count), SD3 passes ``mu`` when its scheduler config uses dynamic shifting;
  image-to-image runs the schedule's tail from ``int(steps - steps * strength)`` (the float product,
  as SD3Img2Img/FluxImg2Img, not SD's ``int(steps * strength)``);
- guidance: SD3/PixArt classifier-free guidance weighted by ``guidance_scale``; FLUX feeds
  ``guidance_scale`` to the transformer (distilled guidance) and adds true CFG rows when
  ``true_cfg_scale > 1`` and a negative prompt is given;
- image-to-image noising: flow-matching schedulers' ``scale_noise`` where a scheduler has it, else
  ``add_noise``.
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import torch

from fastgen.errors import InvalidArgumentError, UnsupportedError
from fastgen.pipelines.config import GenerateConfig
from fastgen.pipelines.dit_conditioning import DIT_PIPELINES
from fastgen.pipelines.sampling import set_timesteps

FLOW_PIPELINES = ("sd3", "flux")


def is_dit(generator: Any) -> bool:
    return getattr(generator, "pipeline", None) in DIT_PIPELINES


def calculate_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
                    base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """FLUX's ``mu``: the schedule's shift, linear in the image's token count between the two anchors."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * slope + (base_shift - slope * base_seq_len)


def check_request(generator: Any, cfg: GenerateConfig, *, mask: Any, control: Any) -> None:
    """Refuse what the DiT pipelines do not do (inpainting, ControlNet, a DDPM-family sampler on a flow model)."""
    if mask is not None:
        raise UnsupportedError(f"inpainting is not supported for {generator.pipeline} generators yet")
    if control:
        raise UnsupportedError(f"ControlNet is not supported for {generator.pipeline} generators yet")
    generator.prompt_encoder.check_length(cfg.max_sequence_length)
    if generator.pipeline in FLOW_PIPELINES and cfg.scheduler is not None:
        raise InvalidArgumentError("scheduler", cfg.scheduler, (None,), reason=f"{generator.pipeline} is a "
                                   "flow-matching model: it samples with its own FlowMatchEulerDiscreteScheduler")


def guidance(pipeline: str, cfg: GenerateConfig) -> tuple[bool, float]:
    """(guided: whether a request has unconditional rows, the weight combining them) of a resolved config."""
    if pipeline == "flux":
        return cfg.true_cfg_scale > 1.0 and cfg.negative_prompt is not None, float(cfg.true_cfg_scale)
    return cfg.guidance_scale > 1.0, float(cfg.guidance_scale)  # type: ignore[operator]


def _patch(generator: Any) -> int:
    """Latent pixels per transformer token along each side (FLUX's 2x2 packing, SD3's patch size)."""
    unit = generator.unet.spec.multiples.get("height", generator.latent_factor)
    return max(int(unit) // int(generator.latent_factor), 1)


def _accepts(scheduler: Any, name: str) -> bool:
    return name in inspect.signature(scheduler.set_timesteps).parameters


def schedule(generator: Any, scheduler: Any, cfg: GenerateConfig, height: int, width: int, *, img2img: bool,
             device: torch.device) -> torch.Tensor:
    """Set ``scheduler``'s timesteps as the family's diffusers pipeline does; the timesteps to run."""
    steps = cfg.steps
    config = scheduler.config
    kwargs: dict[str, Any] = {}
    patch = _patch(generator)
    tokens = (height // generator.latent_factor // patch) * (width // generator.latent_factor // patch)
    shift_args = (tokens, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                  config.get("base_shift", 0.5), config.get("max_shift", 1.15 if generator.pipeline == "flux" else 1.16))
    if generator.pipeline == "flux":
        if _accepts(scheduler, "sigmas") and not config.get("use_flow_sigmas", False):
            kwargs["sigmas"] = np.linspace(1.0, 1 / steps, steps)
        if _accepts(scheduler, "mu"):
            kwargs["mu"] = calculate_shift(*shift_args)
    elif generator.pipeline == "sd3" and config.get("use_dynamic_shifting", False):
        kwargs["mu"] = calculate_shift(*shift_args)
    if generator.pipeline in FLOW_PIPELINES:
        # Not sampling.set_timesteps: a flow schedule starts at timestep 1000 (sigma 1) by design.
        try:
            scheduler.set_timesteps(steps if "sigmas" not in kwargs else None, device=device, **kwargs)
        except ValueError as exc:
            reason = " ".join(str(exc).split()).replace("`", "")
            raise InvalidArgumentError("steps", steps, reason=f"{type(scheduler).__name__}: {reason}") from None
    else:
        set_timesteps(scheduler, steps, device)
    if not img2img:
        if generator.pipeline == "flux" and hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(0)  # as FluxPipeline
        return scheduler.timesteps
    if generator.pipeline == "pixart":  # no diffusers PixArt img2img: SD's rule
        from fastgen.pipelines.sampling import img2img_timesteps

        return img2img_timesteps(scheduler, steps, cfg.strength)
    init_timestep = min(steps * cfg.strength, steps)
    t_start = int(max(steps - init_timestep, 0))
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(t_start * scheduler.order)
    return scheduler.timesteps[t_start * scheduler.order:]


def noise_latents(scheduler: Any, latents: torch.Tensor, noise: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
    """Image-to-image: the encoded image's latents noised to ``timestep`` (images,)."""
    if hasattr(scheduler, "scale_noise"):  # flow matching: sigma * noise + (1 - sigma) * latents
        return scheduler.scale_noise(latents, timestep, noise)
    return scheduler.add_noise(latents, noise, timestep)


__all__ = ["calculate_shift", "check_request", "guidance", "is_dit", "noise_latents", "schedule"]
