"""Calibration forward loops for SD UNets: short denoising loops on the one loop of :mod:`.stepping`.

Static and SmoothQuant scales need activation statistics like those of real sampling; random
latents at one timestep reach them far worse than a few classifier-free-guided denoising steps do.
Random-ish unit-variance prompt embeddings stand in for the text encoder (calibration has only the
UNet component). :func:`sd_unet_calibration` is registered by ``fastgen/__init__.py`` in the
``calibration`` plugin group (:mod:`fastgen.core.plugins`), where ``fastgen.quant`` finds the default
calibration of a build without ``calibration=``.
"""

from __future__ import annotations

import logging
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from fastgen.errors import InvalidArgumentError
from fastgen.models.metadata import UNetMetadata
from fastgen.pipelines.conditioning import Conditioning
from fastgen.pipelines.config import MAX_SEED, GenerateConfig
from fastgen.pipelines.sampling import make_scheduler, set_timesteps, step_kwargs
from fastgen.pipelines.stepping import SampleState, denoise_loop

logger = logging.getLogger(__name__)

#: The inputs of the UNets these loops drive (SD 1.x/2.x: no SDXL added conditioning).
SD_UNET_INPUTS = ("sample", "timestep", "encoder_hidden_states")
#: Seeds of the default calibration loops (never the seeds measurements draw from).
CALIBRATION_SEEDS = (101, 102)


class ModuleUNet:
    """A UNet component's torch module as the loop's UNet: feeds in, ``{"noise_pred": ...}`` out.

    ``module(*feeds in input_names order) -> (noise_pred,)`` (a component wrapper's convention). No
    ``spec``: the loop gives it all rows in one call.
    """

    def __init__(self, module: torch.nn.Module, input_names: Sequence[str] = SD_UNET_INPUTS) -> None:
        self.module = module
        self.input_names = tuple(input_names)

    def __call__(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"noise_pred": self.module(*(feeds[name] for name in self.input_names))[0]}


def scheduler_config(comp: Any) -> dict[str, Any] | None:
    """The diffusers scheduler config a UNet component's metadata records (None: none recorded)."""
    metadata = getattr(comp, "metadata", None)
    return metadata.scheduler if isinstance(metadata, UNetMetadata) else None


def unet_conditioning(comp: Any, *, batch: int, seed: int, seq: int = 77) -> tuple[torch.Tensor, torch.Tensor]:
    """Random-ish prompt embeddings (cond, uncond), each (batch, seq, dim), fixed by ``seed``.

    Unit-variance Gaussian, roughly the scale of CLIP's last hidden state after its final LayerNorm.
    """
    spec = next(t for t in comp.spec.inputs if t.name == "encoder_hidden_states")
    dim = spec.shape[-1]
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, seq, dim, generator=gen), torch.randn(batch, seq, dim, generator=gen)


#: Seeds a loop derives from its ``seed``: the embeddings' (seed + 7919) and each image's (seed + 1 + j).
_SEED_SPAN = 7920


def _positive(argument: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise InvalidArgumentError(argument, value, "integers >= 1")
    return int(value)


def _check_seed(argument: str, value: Any, batch: int) -> int:
    high = MAX_SEED - _SEED_SPAN - batch
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= value <= high:
        raise InvalidArgumentError(argument, value, f"integers from 0 to {high}")
    return int(value)


def check_loop(comp: Any, *, height: Any, width: Any, steps: Any, guidance: Any = 7.5, batch: Any = 1,
               scheduler: str | None = None) -> GenerateConfig:
    """Every argument of a calibration loop checked before any work (one line naming the first bad one):
    an SD UNet component with a scheduler config, an image size its spec takes (its multiples), steps
    and batch >= 1, a finite guidance >= 0, a known scheduler. Returns the loop's GenerateConfig."""
    names = tuple(getattr(getattr(comp, "spec", None), "input_names", ()))
    if tuple(names) != SD_UNET_INPUTS:
        raise InvalidArgumentError("comp", getattr(comp, "name", type(comp).__name__), f"an SD 1.x/2.x UNet "
                                   f"component (inputs {', '.join(SD_UNET_INPUTS)})")
    if scheduler_config(comp) is None:
        raise InvalidArgumentError("comp", getattr(comp, "name", type(comp).__name__),
                                   reason="its metadata records no scheduler config")
    size = {"height": _positive("height", height), "width": _positive("width", width)}
    comp.spec.check_dims(size)  # e.g. height 40 for a UNet that needs multiples of 16
    _positive("batch", batch)
    return GenerateConfig(steps=steps, guidance_scale=guidance, scheduler=scheduler)


def denoise(unet: Any, comp: Any, *, height: int, width: int, steps: int = 20, guidance: float = 7.5,
            batch: int = 1, seed: int = 0, scheduler: str | None = None) -> torch.Tensor:
    """Final latents (batch, C, height/8, width/8) of a text-to-image loop of the UNet component ``comp``.

    ``unet``: ``comp``'s torch module (or any module called like it), or an engine / callable
    mapping the UNet feeds to ``{"noise_pred": ...}``. The same ``seed`` gives the same initial
    noise and embeddings whatever the UNet, so two UNets' latents compare directly. Classifier-free
    guided (unconditional rows from other random embeddings) with ``comp``'s own scheduler unless
    ``scheduler`` names another. SD 1.x/2.x UNets only (no SDXL added conditioning). Every argument
    is checked before any work (:func:`check_loop`).
    """
    cfg = check_loop(comp, height=height, width=width, steps=steps, guidance=guidance, batch=batch,
                     scheduler=scheduler)
    seed = _check_seed("seed", seed, batch)
    if isinstance(unet, torch.nn.Module):
        unet = ModuleUNet(unet, comp.spec.input_names)
    config = scheduler_config(comp)
    sched = make_scheduler(scheduler, config)  # type: ignore[arg-type]
    set_timesteps(sched, steps)
    channels = comp.spec.inputs[0].shape[1]
    gen = torch.Generator().manual_seed(seed)
    # One generator for the whole batch (not one per image): the figures of earlier reports stay comparable.
    latents = torch.randn(batch, channels, height // 8, width // 8, generator=gen) * sched.init_noise_sigma
    cond, uncond = unet_conditioning(comp, batch=batch, seed=seed + 7919)
    # What a stochastic scheduler's steps draw: one generator per image, on seeds after the noise's.
    seeds = [seed + 1 + j for j in range(batch)]
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    state = SampleState(prompt="", config=cfg, seeds=seeds, height=height, width=width, scheduler=sched,
                        timesteps=sched.timesteps, generators=generators, guided=True,
                        guidance=torch.full((batch, 1, 1, 1), float(guidance)),
                        extra=step_kwargs(sched, eta=0.0, generators=generators), zero_negative=False,
                        latents=latents,
                        cond=Conditioning(torch.cat([uncond, cond]), guided=True))  # (2 * batch, seq, dim)
    with torch.inference_mode():
        denoise_loop(unet, [state])
    return state.latents  # type: ignore[return-value]


def unet_calibration_loop(comp: Any, *, height: int, width: int, steps: int,
                          seeds: tuple[int, ...] = CALIBRATION_SEEDS) -> Callable[[torch.nn.Module], None]:
    """A ``forward_loop`` for ``fastgen.calibrate``: full denoising loops of ``steps`` steps, one per
    seed of ``seeds`` (other seeds than any measurement), over the module it is given. The arguments
    are checked here, not when the loop first runs (after the model was copied and hooked)."""
    check_loop(comp, height=height, width=width, steps=steps)
    if isinstance(seeds, (str, bytes)) or not isinstance(seeds, Sequence) or not seeds:
        raise InvalidArgumentError("seeds", seeds, "a non-empty tuple of seeds")
    seeds = tuple(_check_seed(f"seeds[{i}]", s, 1) for i, s in enumerate(seeds))

    def loop(module: torch.nn.Module) -> None:
        for s in seeds:
            denoise(module, comp, height=height, width=width, steps=steps, seed=s)

    return loop


def sd_unet_calibration(component: Any) -> Callable[[torch.nn.Module], None] | None:
    """The default calibration of an SD 1.x/2.x UNet component: two 5-step denoising loops at the
    profile's opt size (None for any other component: another source, or synthetic inputs, serve it)."""
    if component.name != "unet" or tuple(component.spec.input_names) != SD_UNET_INPUTS \
            or scheduler_config(component) is None:
        return None
    dims = component.spec.profile.dims
    return unet_calibration_loop(component, height=dims["height"].opt, width=dims["width"].opt, steps=5)


__all__ = ["CALIBRATION_SEEDS", "ModuleUNet", "check_loop", "denoise", "scheduler_config", "sd_unet_calibration",
           "unet_calibration_loop", "unet_conditioning"]
