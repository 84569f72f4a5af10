"""ControlNet in the generation pipelines, as diffusers' ``StableDiffusion(XL)ControlNetPipeline`` runs it.

A generator with ControlNets runs the ``unet-controlled`` engine (the UNet taking the residuals as
inputs) and keeps one ``controlnet`` engine per net (``Generator.controlnets``). A request with
condition images gets a :class:`ControlState` (per net: its pixels, its
:class:`~fastgen.models.adapters_controlnet.ControlGuidance`), and before every UNet call
:func:`residuals` runs each net ONCE over the rows of every request in the batch that uses it,
each row at its own request's conditioning scale for that step (0 outside the net's guidance
window: the row is then left out), and adds the outputs into residual tensors of the whole batch.
So:

- several nets: the residuals are summed name by name (diffusers' ``MultiControlNetModel``);
- classifier-free guidance: the net sees both halves (the same condition image for both), unless in
  guess mode, where it sees the conditional rows only, the unconditional rows get zeros and residual
  ``i`` is weighted by ``logspace(-1, 0, n)[i]`` (diffusers' guess mode);
- rows of requests without condition images get zero residuals: the controlled UNet then gives
  exactly the plain UNet's prediction, so plain and controlled requests (and requests with different
  scales, windows or images) share UNet calls.

Condition images follow diffusers' ``control_image_processor`` (:mod:`fastgen.pipelines.control_images`):
resized to the generation size and scaled to [0, 1]; with no height/width given, text-to-image takes
the size of the (first net's) condition image, rounded down to what the models accept.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fastgen.errors import InvalidArgumentError, UnsupportedError
from fastgen.models.adapters_controlnet import (
    CONTROLLED_UNET,
    CONTROLNET,
    ControlGuidance,
    guess_mode_weights,
    residual_names,
    zero_residuals,
)
from fastgen.models.component import Component
from fastgen.pipelines.control_images import control_pixels, load_map
from fastgen.pipelines.engine_calls import run_chunked

logger = logging.getLogger(__name__)

#: Engine directory names of a generator folder's ControlNets: ``controlnet/``, then ``controlnet-1/``...
NET_FOLDER = CONTROLNET


@dataclass(eq=False)
class ControlState:
    """One request's ControlNet inputs: the same condition image for every image of the request."""

    nets: list[Any]
    """The ``controlnet`` engines, in order (the generator's)."""
    pixels: list[torch.Tensor]
    """Per net: its condition image, (1, 3, height, width) float32 in [0, 1]."""
    guidance: list[ControlGuidance]
    """Per net: conditioning scale and guidance window."""
    guess_mode: bool = False
    """diffusers' guess mode (see the module docstring)."""


# --- construction ---------------------------------------------------------------------------------

def takes_residuals(unet: Any) -> bool:
    """Whether ``unet`` is an engine of the ``unet-controlled`` kind (ControlNet residual inputs)."""
    spec = getattr(unet, "spec", None)
    return spec is not None and bool(residual_names(spec))


def check_nets(unet: Any, nets: Any) -> list[Any]:
    """The ControlNet engines of a generator as a list (one engine, a list of them, or None: none),
    each checked against ``unet``: the same residuals, the same (SD or SDXL) conditioning."""
    items = [] if nets is None else list(nets) if isinstance(nets, (list, tuple)) else [nets]
    if items and not takes_residuals(unet):
        raise InvalidArgumentError("unet", getattr(unet.spec, "component", "unet"), reason="ControlNets need the "
                                   f"'{CONTROLLED_UNET}' engine (the UNet taking their residuals as inputs)")
    for i, net in enumerate(items):
        spec = getattr(net, "spec", None)
        if spec is None or "controlnet_cond" not in spec.input_names:
            raise InvalidArgumentError(f"controlnet[{i}]", type(net).__name__, "a 'controlnet' engine")
        if residual_names(spec) != residual_names(unet.spec):
            raise InvalidArgumentError(f"controlnet[{i}]", spec.model_type or spec.component,
                                       reason="its residuals do not match the UNet's (a ControlNet for another "
                                              "UNet architecture)")
        if ("text_embeds" in spec.input_names) != ("text_embeds" in unet.spec.input_names):
            raise InvalidArgumentError(f"controlnet[{i}]", spec.model_type or spec.component,
                                       reason="an SD 1.x/2.x ControlNet with an SDXL UNet, or the other way round")
    return items


def wanted(model: Any, controlnet: Any) -> bool:
    """Whether a generator of ``model`` runs ControlNets: one is given, or the model has one."""
    from fastgen.models import model_components

    if controlnet is not None:
        return not (isinstance(controlnet, (list, tuple)) and not controlnet)
    return isinstance(model, (str, os.PathLike)) and CONTROLNET in model_components(model)


def load_controlled_unet(model: Any) -> Any:
    """``model``'s ``unet-controlled`` component; from its plain ``unet`` when it has none (a
    pipeline without a ControlNet of its own, or a preset such as ``tiny``)."""
    from fastgen.models import adapt, load_component, model_components

    if CONTROLLED_UNET in model_components(model):
        return load_component(model, CONTROLLED_UNET)
    plain = load_component(model, "unet")
    options = plain.source.get("adapter", {})
    comp = adapt(plain.model, CONTROLLED_UNET, latent_factor=options.get("latent_factor", 8),
                 image_size=options.get("image_size"))
    comp.origin, comp.metadata = plain.origin, plain.metadata  # the scheduler and pipeline family
    return comp


def net_engines(model: Any, controlnet: Any, build: Callable[[Any], Any] | None,
                load: Callable[[Path], Any]) -> dict[str, Any]:
    """The ControlNet engines of a generator by folder name (``controlnet``, ``controlnet-1``...).

    ``controlnet``: None (the model's own ``controlnet`` component, if any), or one item or a list:
    an engine, a folder of a built engine (``manifest.json``), or a model (a preset with a
    ``controlnet`` component, a diffusers ControlNet folder, a ``ControlNetModel``, a loaded
    :class:`~fastgen.models.component.Component`) to ``build``
    (None: engines only, as for a folder of built engines).
    """
    from fastgen.models import load_component, model_components

    if controlnet is None:
        has_own = build is not None and isinstance(model, (str, os.PathLike)) and CONTROLNET in model_components(model)
        items = [model] if has_own else []
    else:
        items = list(controlnet) if isinstance(controlnet, (list, tuple)) else [controlnet]
    out: dict[str, Any] = {}
    for i, item in enumerate(items):
        if isinstance(item, Component):
            if build is None:
                raise InvalidArgumentError("controlnet", item.origin, reason="a generator of built engines takes "
                                           "ControlNet engines or engine folders")
            engine = build(item)
        elif hasattr(item, "spec") and callable(item):
            engine = item
        elif isinstance(item, (str, os.PathLike)) and (Path(item).expanduser() / "manifest.json").is_file():
            engine = load(Path(item).expanduser())
        elif build is None:
            raise InvalidArgumentError("controlnet", os.fspath(item) if isinstance(item, os.PathLike) else str(item),
                                       reason="a generator of built engines takes ControlNet engines or engine "
                                              "folders (build the controlnet component first)")
        else:
            engine = build(load_component(item, CONTROLNET))
        out[net_folder(i)] = engine
    return out


def net_folder(index: int) -> str:
    """Engine folder name of net ``index``: ``controlnet``, ``controlnet-1``, ``controlnet-2``..."""
    return NET_FOLDER if index == 0 else f"{NET_FOLDER}-{index}"


def engine_folder(path: Path, components: Sequence[str]) -> dict[str, Path] | None:
    """The engine directories of a folder made by ``fastgen build`` (None when it is not one), by
    component: ``unet-controlled/`` serves as ``unet`` when present, with ``controlnet/``,
    ``controlnet-1/``... beside it."""
    found = {name: path / name for name in components if (path / name / "manifest.json").is_file()}
    if (path / CONTROLLED_UNET / "manifest.json").is_file():
        found["unet"] = path / CONTROLLED_UNET
        i = 0
        while (path / net_folder(i) / "manifest.json").is_file():
            found[net_folder(i)] = path / net_folder(i)
            i += 1
    return found if "unet" in found else None


def take_nets(engines: dict[str, Any]) -> list[Any]:
    """Remove the ControlNet engines (:func:`net_folder` keys) from ``engines`` and return them in order."""
    nets, i = [], 0
    while net_folder(i) in engines:
        nets.append(engines.pop(net_folder(i)))
        i += 1
    return nets


# --- per request ------------------------------------------------------------------------------------

def load_images(generator: Any, control_image: Any, num_prompts: int) -> list[list[Any]] | None:
    """Per prompt, its condition image for each net (read before any work), or None for no control.

    One net: an image for every prompt, or a list with one per prompt. Several nets (as diffusers'
    multi-ControlNet pipelines): a list with one entry per net (an image for every prompt), or a list
    with one list per prompt holding its image for each net.
    """
    if control_image is None:
        return None
    n = len(getattr(generator, "controlnets", []))
    if n == 0:
        raise InvalidArgumentError("control_image", "an image", reason="this generator has no ControlNet (pass "
                                   "controlnet= to from_pretrained, or use a model with one)")
    items = list(control_image) if isinstance(control_image, (list, tuple)) else [control_image]
    if n == 1:
        if len(items) not in (1, num_prompts):
            raise InvalidArgumentError("control_image", f"{len(items)} images",
                                       f"1 image or one per prompt ({num_prompts})")
        maps = [load_map(i) for i in items]
        return [[maps[p if len(maps) > 1 else 0]] for p in range(num_prompts)]
    nested = any(isinstance(i, (list, tuple)) for i in items)
    if not nested:  # one image per net, for every prompt
        if len(items) != n:
            raise InvalidArgumentError("control_image", f"{len(items)} images", f"one per ControlNet ({n})")
        maps = [load_map(i) for i in items]
        return [list(maps) for _ in range(num_prompts)]
    if len(items) != num_prompts or any(not isinstance(i, (list, tuple)) or len(i) != n for i in items):
        raise InvalidArgumentError("control_image", "a nested list", f"one list per prompt ({num_prompts}), each "
                                   f"with one image per ControlNet ({n})")
    return [[load_map(i) for i in per_prompt] for per_prompt in items]


def request_images(generator: Any, control_image: Any) -> list[Any]:
    """One request's condition images, one per net (:func:`load_images` for one prompt)."""
    return load_images(generator, control_image, 1)[0]  # type: ignore[index]


def guidances(cfg: Any, num_nets: int) -> list[ControlGuidance]:
    """Each net's scale and window from a GenerateConfig: a single value serves every net, a tuple
    has one value per net (diffusers' broadcasting of ``controlnet_conditioning_scale`` and
    ``control_guidance_start`` / ``end``)."""
    values = []
    for name, value in (("controlnet_conditioning_scale", cfg.controlnet_conditioning_scale),
                        ("control_guidance_start", cfg.control_guidance_start),
                        ("control_guidance_end", cfg.control_guidance_end)):
        if isinstance(value, tuple):
            if len(value) != num_nets:
                raise InvalidArgumentError(name.replace("_", "-"), list(value),
                                           reason=f"one value per ControlNet ({num_nets}) or a single value")
            values.append(list(value))
        else:
            values.append([value] * num_nets)
    return [ControlGuidance(scale=s, start=a, end=b) for s, a, b in zip(*values)]


def prepare(generator: Any, images: Sequence[Any] | None, cfg: Any, height: int, width: int, *,
            inpainting: bool = False) -> ControlState | None:
    """The :class:`ControlState` of one request from its per-net condition images (None: no control)."""
    if images is None:
        return None
    nets = list(getattr(generator, "controlnets", []))
    if not nets:
        raise InvalidArgumentError("control_image", "an image", reason="this generator has no ControlNet")
    if inpainting:
        raise UnsupportedError("ControlNet with inpainting (mask_image) is not supported; use image-to-image or "
                               "text-to-image")
    if len(images) != len(nets):
        raise InvalidArgumentError("control_image", f"{len(images)} images", f"one per ControlNet ({len(nets)})")
    generator.check_size(height, width, nets)
    device = getattr(generator.unet, "device", None)
    device = device if isinstance(device, torch.device) else torch.device("cpu")
    pixels = [control_pixels([img], height, width, multiple=generator.latent_factor).to(device) for img in images]
    return ControlState(nets=nets, pixels=pixels, guidance=guidances(cfg, len(nets)), guess_mode=cfg.guess_mode)


def size_source(images: list[list[Any]] | None) -> list[Any] | None:
    """The images that set a text-to-image size (first net's, per prompt), as ``Generator.image_size`` reads them."""
    return [per_prompt[0] for per_prompt in images] if images else None


# --- per step ---------------------------------------------------------------------------------------

def residuals(unet: Any, states: Sequence[Any], layout: Sequence[tuple[int | None, int]],
              feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The residual inputs of one UNet call (empty when ``unet`` takes none).

    ``states``: the batch's SampleStates; ``layout``: each one's first unconditional (None when
    unguided) and conditional row; ``feeds``: the UNet's other inputs, rows in that layout.
    """
    names = residual_names(unet.spec) if getattr(unet, "spec", None) is not None else []
    controlled = [(s, rows) for s, rows in zip(states, layout) if getattr(s, "control", None) is not None]
    if not names:
        if controlled:
            raise UnsupportedError("this UNet takes no ControlNet residuals (build the 'unet-controlled' component)")
        return {}
    sample = feeds["sample"]  # (rows, C, h, w)
    total = zero_residuals(unet.spec, {"batch": sample.shape[0], "height": states[0].height,
                                       "width": states[0].width}, device=sample.device)
    groups: dict[int, tuple[Any, list[tuple[list[int], torch.Tensor, float, bool]]]] = {}
    for s, (uncond, cond) in controlled:
        c = s.control
        for k, net in enumerate(c.nets):
            scale = c.guidance[k].scale_at(s.index, s.total_steps)
            if scale == 0.0:  # outside the window (or scale 0): diffusers' residuals are exactly zero
                continue
            rows = list(range(cond, cond + s.images))
            if uncond is not None and not c.guess_mode:  # guess mode: the conditional half only
                rows = list(range(uncond, uncond + s.images)) + rows
            groups.setdefault(id(net), (net, []))[1].append((rows, c.pixels[k], scale, c.guess_mode))
    weights = guess_mode_weights(len(names))
    for net, items in groups.values():
        index = torch.tensor([r for rows, *_ in items for r in rows], device=sample.device)
        net_feeds = {n: feeds[n][index] for n in net.spec.input_names if n in feeds}
        net_feeds["controlnet_cond"] = torch.cat([px.expand(len(rows), -1, -1, -1) for rows, px, *_ in items])
        net_feeds["conditioning_scale"] = torch.tensor([sc for rows, _, sc, _ in items for _ in rows],
                                                       dtype=torch.float32, device=sample.device)  # (net rows,)
        out = run_chunked(net, net_feeds)
        flags = [g for rows, _, _, g in items for _ in rows]
        guess = torch.tensor(flags, device=sample.device).reshape(-1, 1, 1, 1) if any(flags) else None
        for i, name in enumerate(names):
            res = out[name].to(sample.device)  # (net rows, ch, h/div, w/div), already times the row's scale
            if guess is not None:
                res = torch.where(guess, res * weights[i], res)
            total[name].index_add_(0, index, res)
    return total


__all__ = ["ControlState", "check_nets", "engine_folder", "guidances", "load_controlled_unet", "load_images",
           "net_engines", "prepare", "request_images", "residuals", "size_source", "take_nets", "takes_residuals",
           "wanted"]
