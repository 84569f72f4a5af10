"""Schedulers and noise for the denoising loop (:mod:`fastgen.pipelines.stepping`): diffusers' own
schedulers, no sampler re-implemented.

Randomness is per image: each image has its own ``torch.Generator`` (on the CPU, as diffusers draws
with CPU generators and then moves the noise), which draws, in this order, its VAE posterior sample
(image-to-image), its initial noise, then any noise the scheduler's steps ask for. So an image depends
on its own seed only, never on what else shares the batch.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from typing import Any

import torch

from fastgen.errors import InvalidArgumentError

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
    # Some schedules step off the model's timestep range without refusing: PNDM with steps_offset=1 at
    # 1000 steps starts at timestep 1000 of 0..999 and fails with an IndexError at the first step.
    trained = getattr(getattr(scheduler, "config", None), "num_train_timesteps", None)
    timesteps = getattr(scheduler, "timesteps", None)
    if trained is not None and timesteps is not None and len(timesteps) and float(timesteps.max()) >= trained:
        raise InvalidArgumentError("steps", steps, reason=f"{type(scheduler).__name__}'s schedule for {steps} steps "
                                   f"reaches timestep {int(timesteps.max())}, past the model's {trained - 1}: "
                                   f"use fewer steps")


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
