"""Calibration forward loops for SD UNets and diffusion transformers, on the one loop of :mod:`.stepping`.

Static and SmoothQuant scales need activation statistics like those of real sampling; random
latents at one timestep reach them far worse than a few guided denoising steps do. Random-ish
unit-variance prompt embeddings stand in for the text encoders (calibration has only the denoiser
component). Two kinds of component are driven:

- SD 1.x/2.x UNets (component ``unet``): classifier-free guidance, the UNet's own scheduler;
- diffusion transformers (component ``transformer``, :mod:`fastgen.models.adapters_dit`'s interface)
  of the families ``sd3``, ``flux`` and ``pixart`` (``UNetMetadata.pipeline``): each family's
  conditioning inputs, its guidance (classifier-free for SD3 and PixArt, FLUX's distilled
  ``guidance`` input) and its schedule as its diffusers pipeline sets it (:mod:`.dit_sampling`:
  FLUX's ``sigmas`` and resolution-dependent ``mu``).

:func:`sd_unet_calibration` is registered by ``fastgen/__init__.py`` in the ``calibration`` plugin
group (:mod:`fastgen.core.plugins`), where ``fastgen.quant`` finds the default calibration of a build
without ``calibration=``; it serves both kinds.
"""

from __future__ import annotations

import logging
import numbers
from collections.abc import Callable, Mapping, Sequence
from types import SimpleNamespace
from typing import Any

import torch

from fastgen.errors import InvalidArgumentError
from fastgen.models.metadata import UNetMetadata
from fastgen.pipelines import dit_sampling
from fastgen.pipelines.conditioning import Conditioning
from fastgen.pipelines.config import MAX_SEED, GenerateConfig
from fastgen.pipelines.dit_conditioning import DIT_PIPELINES, DitConditioning
from fastgen.pipelines.sampling import make_scheduler, set_timesteps, step_kwargs
from fastgen.pipelines.stepping import SampleState, denoise_loop

logger = logging.getLogger(__name__)

#: The inputs of the UNets these loops drive (SD 1.x/2.x: no SDXL added conditioning).
SD_UNET_INPUTS = ("sample", "timestep", "encoder_hidden_states")
#: Seeds of the default calibration loops (never the seeds measurements draw from).
CALIBRATION_SEEDS = (101, 102)
#: Image pixels per latent pixel of every model these loops drive.
LATENT_FACTOR = 8


class ModuleUNet:
    """A denoiser component's torch module as the loop's UNet: feeds in, ``{"noise_pred": ...}`` out.

    ``module(*feeds in input_names order) -> (noise_pred,)`` (a component wrapper's convention). No
    ``spec``: the loop gives it all rows in one call.
    """

    def __init__(self, module: torch.nn.Module, input_names: Sequence[str] = SD_UNET_INPUTS) -> None:
        self.module = module
        self.input_names = tuple(input_names)

    def __call__(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"noise_pred": self.module(*(feeds[name] for name in self.input_names))[0]}


def scheduler_config(comp: Any) -> dict[str, Any] | None:
    """The diffusers scheduler config a UNet / transformer component's metadata records (None: none recorded)."""
    metadata = getattr(comp, "metadata", None)
    return metadata.scheduler if isinstance(metadata, UNetMetadata) else None


def loop_family(comp: Any) -> str | None:
    """``sd`` for an SD 1.x/2.x UNet component, ``sd3`` / ``flux`` / ``pixart`` for a diffusion
    transformer of that family (its metadata's ``pipeline``), None for anything else."""
    names = tuple(getattr(getattr(comp, "spec", None), "input_names", ()))
    if names == SD_UNET_INPUTS:
        return "sd"
    metadata = getattr(comp, "metadata", None)
    family = getattr(metadata, "pipeline", None) if isinstance(metadata, UNetMetadata) else None
    if family in DIT_PIPELINES and names[:3] == SD_UNET_INPUTS:
        return family
    return None


def unet_conditioning(comp: Any, *, batch: int, seed: int, seq: int = 77) -> tuple[torch.Tensor, torch.Tensor]:
    """Random-ish prompt embeddings (cond, uncond), each (batch, seq, dim), fixed by ``seed``.

    Unit-variance Gaussian, roughly the scale of CLIP's last hidden state after its final LayerNorm.
    """
    spec = next(t for t in comp.spec.inputs if t.name == "encoder_hidden_states")
    dim = spec.shape[-1]
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, seq, dim, generator=gen), torch.randn(batch, seq, dim, generator=gen)


def dit_conditioning(comp: Any, *, batch: int, seed: int, seq: int | None = None
                     ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Random-ish conditioning rows (cond, uncond) of a transformer component, fixed by ``seed``.

    Each maps the component's text inputs to tensors: ``encoder_hidden_states`` (batch, seq, joint_dim)
    and ``pooled_projections`` (batch, pooled_dim), unit-variance Gaussian; PixArt's
    ``encoder_attention_mask`` (batch, seq) int64 marks a short prompt (4 to seq/4 tokens, drawn
    from the seed) in the conditional rows and one token (the empty prompt's end token) in the
    unconditional ones, as T5's padded prompts have it. ``seq``: T5 tokens (default the profile's
    opt, what the family's pipeline feeds by default). FLUX's ``guidance`` is not a text input:
    :func:`denoise` adds it.
    """
    inputs = {t.name: t for t in comp.spec.inputs}
    if seq is None:
        seq = comp.spec.profile.dims["seq"].opt
    gen = torch.Generator().manual_seed(seed)
    rows: list[dict[str, torch.Tensor]] = []
    for tokens in (int(torch.randint(4, max(seq // 4, 4) + 1, (1,), generator=gen)), 1):
        row = {"encoder_hidden_states": torch.randn(batch, seq, inputs["encoder_hidden_states"].shape[-1],
                                                    generator=gen)}
        if "pooled_projections" in inputs:
            row["pooled_projections"] = torch.randn(batch, inputs["pooled_projections"].shape[-1], generator=gen)
        if "encoder_attention_mask" in inputs:
            mask = torch.zeros(batch, seq, dtype=torch.int64)
            mask[:, :min(tokens, seq)] = 1
            row["encoder_attention_mask"] = mask
        rows.append(row)
    return rows[0], rows[1]


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


def _check_seq(comp: Any, seq: Any) -> None:
    if seq is None:
        return
    if loop_family(comp) == "sd":
        raise InvalidArgumentError("seq", seq, (None,), reason="SD UNets take CLIP's 77 tokens")
    comp.spec.check_dims({"seq": _positive("seq", seq)})


def _stand_in(comp: Any, family: str) -> Any:
    """What :func:`.dit_sampling.schedule` reads of a generator: its family, its denoiser's spec
    (``unet.spec.multiples``: the patch size) and its latent factor."""
    return SimpleNamespace(pipeline=family, unet=comp, latent_factor=LATENT_FACTOR)


def check_loop(comp: Any, *, height: Any, width: Any, steps: Any, guidance: Any = None, batch: Any = 1,
               scheduler: str | None = None) -> GenerateConfig:
    """Every argument of a calibration loop checked before any work (one line naming the first bad one):
    an SD UNet or SD3/FLUX/PixArt transformer component with a scheduler config, an image size its spec
    takes (its multiples), steps and batch >= 1, a finite guidance >= 0 (None: the family's default,
    7.5 for SD), a known scheduler (none but their own for flow-matching models). Returns the loop's
    GenerateConfig, guidance resolved."""
    family = loop_family(comp)
    if family is None:
        raise InvalidArgumentError("comp", getattr(comp, "name", type(comp).__name__), "an SD 1.x/2.x UNet component "
                                   f"(inputs {', '.join(SD_UNET_INPUTS)}) or an SD3, FLUX or PixArt transformer")
    if scheduler_config(comp) is None:
        raise InvalidArgumentError("comp", getattr(comp, "name", type(comp).__name__),
                                   reason="its metadata records no scheduler config")
    size = {"height": _positive("height", height), "width": _positive("width", width)}
    comp.spec.check_dims(size)  # e.g. height 40 for a UNet that needs multiples of 16
    _positive("batch", batch)
    cfg = GenerateConfig(steps=steps, guidance_scale=guidance, scheduler=scheduler).resolved(family)
    if family in dit_sampling.FLOW_PIPELINES and scheduler is not None:  # as the DiT generators refuse it
        raise InvalidArgumentError("scheduler", scheduler, (None,), reason=f"{family} is a flow-matching model: "
                                   "it samples with its own FlowMatchEulerDiscreteScheduler")
    return cfg


def denoise(unet: Any, comp: Any, *, height: int, width: int, steps: int = 20, guidance: float | None = None,
            batch: int = 1, seed: int = 0, scheduler: str | None = None, seq: int | None = None) -> torch.Tensor:
    """Final latents (batch, C, height/8, width/8) of a text-to-image loop of the denoiser component ``comp``.

    ``unet``: ``comp``'s torch module (or any module called like it), or an engine / callable
    mapping the component's feeds to ``{"noise_pred": ...}``. The same ``seed`` gives the same
    initial noise and embeddings whatever the denoiser, so two denoisers' latents compare directly.

    SD 1.x/2.x UNets (no SDXL added conditioning): classifier-free guided (unconditional rows from
    other random embeddings, 77 tokens) with ``comp``'s own scheduler unless ``scheduler`` names
    another. Transformers: :func:`dit_conditioning` (``seq`` T5 tokens), SD3 / PixArt
    classifier-free guided, FLUX fed ``guidance`` as its distilled-guidance input, each with its own
    schedule (:func:`fastgen.pipelines.dit_sampling.schedule`). ``guidance`` None: the family's
    default (SD 7.5, SD3 7.0, FLUX 3.5, PixArt 4.5). Every argument is checked before any work
    (:func:`check_loop`).
    """
    cfg = check_loop(comp, height=height, width=width, steps=steps, guidance=guidance, batch=batch,
                     scheduler=scheduler)
    family = loop_family(comp)
    seed = _check_seed("seed", seed, batch)
    _check_seq(comp, seq)
    if isinstance(unet, torch.nn.Module):
        unet = ModuleUNet(unet, comp.spec.input_names)
    sched = make_scheduler(scheduler, scheduler_config(comp))  # type: ignore[arg-type]
    weight = float(cfg.guidance_scale)  # type: ignore[arg-type]
    if family == "sd":
        set_timesteps(sched, steps)
        timesteps, guided = sched.timesteps, True
    else:
        timesteps = dit_sampling.schedule(_stand_in(comp, family), sched, cfg, height, width, img2img=False,
                                          device=torch.device("cpu"))
        guided, weight = dit_sampling.guidance(family, cfg)
    channels = comp.spec.inputs[0].shape[1]
    gen = torch.Generator().manual_seed(seed)
    # One generator for the whole batch (not one per image): the figures of earlier reports stay comparable.
    # Flow-matching schedulers have no init_noise_sigma (their pipelines draw plain noise).
    latents = torch.randn(batch, channels, height // LATENT_FACTOR, width // LATENT_FACTOR,
                          generator=gen) * getattr(sched, "init_noise_sigma", 1.0)
    if family == "sd":
        cond_emb, uncond_emb = unet_conditioning(comp, batch=batch, seed=seed + 7919)
        cond: Any = Conditioning(torch.cat([uncond_emb, cond_emb]), guided=True)  # (2 * batch, seq, dim)
    else:
        rows, negative = dit_conditioning(comp, batch=batch, seed=seed + 7919, seq=seq)
        tensors = {name: torch.cat([negative[name], value]) if guided else value for name, value in rows.items()}
        if "guidance" in comp.spec.input_names:  # FLUX.1-dev: the distilled guidance scale, one per row
            tensors["guidance"] = torch.full((batch * (2 if guided else 1),), float(cfg.guidance_scale))  # type: ignore[arg-type]
        cond = DitConditioning(tensors, guided)
    # What a stochastic scheduler's steps draw: one generator per image, on seeds after the noise's.
    seeds = [seed + 1 + j for j in range(batch)]
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    state = SampleState(prompt="", config=cfg, seeds=seeds, height=height, width=width, scheduler=sched,
                        timesteps=timesteps, generators=generators, guided=guided,
                        guidance=torch.full((batch, 1, 1, 1), weight),
                        extra=step_kwargs(sched, eta=0.0, generators=generators), zero_negative=False,
                        latents=latents, cond=cond)
    with torch.inference_mode():
        denoise_loop(unet, [state])
    return state.latents  # type: ignore[return-value]


def unet_calibration_loop(comp: Any, *, height: int, width: int, steps: int,
                          seeds: tuple[int, ...] = CALIBRATION_SEEDS,
                          seq: int | None = None) -> Callable[[torch.nn.Module], None]:
    """A ``forward_loop`` for ``fastgen.calibrate``: full denoising loops of ``steps`` steps, one per
    seed of ``seeds`` (other seeds than any measurement), over the module it is given (a UNet's or a
    transformer's, :func:`denoise` with the family's defaults; ``seq``: a transformer's text tokens).
    The arguments are checked here, not when the loop first runs (after the model was copied and hooked)."""
    check_loop(comp, height=height, width=width, steps=steps)
    _check_seq(comp, seq)
    if isinstance(seeds, (str, bytes)) or not isinstance(seeds, Sequence) or not seeds:
        raise InvalidArgumentError("seeds", seeds, "a non-empty tuple of seeds")
    seeds = tuple(_check_seed(f"seeds[{i}]", s, 1) for i, s in enumerate(seeds))

    def loop(module: torch.nn.Module) -> None:
        for s in seeds:
            denoise(module, comp, height=height, width=width, steps=steps, seed=s, seq=seq)

    return loop


#: Component name of each loop family's denoiser.
_DENOISERS = {"sd": "unet", **{family: "transformer" for family in DIT_PIPELINES}}


def sd_unet_calibration(component: Any) -> Callable[[torch.nn.Module], None] | None:
    """The default calibration of an SD 1.x/2.x UNet or an SD3/FLUX/PixArt transformer component: two
    5-step denoising loops at the profile's opt size (None for any other component: another source,
    or synthetic inputs, serve it). One registered source for both, so the registry stays as it was."""
    family = loop_family(component)
    if family is None or component.name != _DENOISERS[family] or scheduler_config(component) is None:
        return None
    dims = component.spec.profile.dims
    return unet_calibration_loop(component, height=dims["height"].opt, width=dims["width"].opt, steps=5)


__all__ = ["CALIBRATION_SEEDS", "LATENT_FACTOR", "ModuleUNet", "check_loop", "denoise", "dit_conditioning",
           "loop_family", "scheduler_config", "sd_unet_calibration", "unet_calibration_loop", "unet_conditioning"]
