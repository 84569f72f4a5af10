"""The denoising loop of every generation path, one step at a time over many requests.

Each request is a :class:`SampleState` that holds everything one prompt needs (its own diffusers
scheduler instance, timesteps and position in them, its CPU ``torch.Generator`` per image seeded
``seed + j``, its guidance weight, conditioning rows and latents), so requests of one image size
can share UNet calls while joining and leaving at any step boundary. :meth:`Generator.generate
<fastgen.pipelines.generator.Generator.generate>` drives one batch of states from the first step to
the last (:func:`denoise_loop`); the runtime (:mod:`fastgen.runtime`) drives them step by step
(continuous batching); UNet calibration (:mod:`fastgen.pipelines.calibration`) runs the same loop
over a torch module:

- :func:`prepare`: checks and per-request state (no model call), text-to-image or image-to-image;
- :func:`encode_prompts`: one text-encoder call for the prompts and negatives of many new requests;
- :func:`init_latents`: each request's initial latents from its own generators: noise, or (image-to-
  image) one VAE-encoder call for the distinct input images, a posterior sample, then noise added;
- :func:`denoise_step` / :func:`unet_step`: ONE UNet call over all rows of the given requests, each
  row with its own timestep and each request with its own guidance weight
  (:func:`combine_guidance`), then each request's scheduler steps on its slice;
- :func:`decode`: one VAE-decoder call for the finished requests.

SD3, FLUX and PixArt-Sigma generators take the same steps over their transformer (``generator.unet``);
their prompt encoding, schedules, guidance and image-to-image noising are in
:mod:`fastgen.pipelines.dit_conditioning` and :mod:`fastgen.pipelines.dit_sampling`.

Inpainting requests (:mod:`fastgen.pipelines.inpaint`) take the same steps: their initial latents
come from one VAE-encoder call for their input and masked images, an inpainting UNet gets their
mask and masked-image latents appended to their rows, and with a regular UNet their latents'
unmasked part is reset after each scheduler step.

Rows are laid out as diffusers lays out one batch: every guided request's unconditional rows first,
then every request's conditional rows, so a batch of states gives what diffusers gives for the same
prompts in one call. Per-image randomness comes from the image's own generator only, in this order:
its VAE posterior sample (image-to-image), its initial noise, then whatever the scheduler's steps
draw; so a request gives the same images whatever else shares its UNet calls (equal to
floating-point rounding: a batched matrix product may round differently from a smaller one).

Numerical failures stay with their request too: after each step every request's latents are checked
(one ``isfinite`` reduction per request, one host sync per step), and a request whose latents hold a
NaN or an infinity gets a :class:`~fastgen.errors.NumericalError` naming the step, as its entry of
:func:`unet_step`'s per-request errors, while the others go on. :func:`nonfinite_rows` tells which
rows of any batched output (the VAE decoder's) are affected.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fastgen.core.progress import steps as progress_steps
from fastgen.errors import InvalidArgumentError, NumericalError, UnsupportedError
from fastgen.pipelines import controlnet, dit_sampling, inpaint, vae_images
from fastgen.pipelines.conditioning import Conditioning, assemble_conditioning
from fastgen.pipelines.config import GenerateConfig, check_seed, check_text
from fastgen.pipelines.engine_calls import run_chunked
from fastgen.pipelines.sampling import (
    img2img_timesteps,
    make_scheduler,
    per_sample_noise,
    set_timesteps,
    step_kwargs,
)
from fastgen.pipelines.vae_images import nonfinite_rows


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
    image: Any = None
    """Image-to-image: the input image (an RGB PIL image) every image of the request starts from."""
    vae_encode_ms: float = 0.0
    """Image-to-image: wall time of the VAE-encoder call that encoded the input image."""
    inpaint: Any = None
    """Inpainting: the request's :class:`~fastgen.pipelines.inpaint.InpaintState` (mask, its latents);
    ``image`` is then the input image as the pipeline sees it (cropped with padding_mask_crop)."""
    control: Any = None
    """ControlNet: the request's :class:`~fastgen.pipelines.controlnet.ControlState` (condition images, scales)."""
    adapters: Any = None
    """LoRA: the :class:`~fastgen.lora.AdapterSelection` its engine calls run with (fastgen.Runtime's
    per-request adapters); None: whatever the engines hold."""

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
            image: Any = None, size: tuple[int, int] | None = None, images: int | None = None,
            mask: Any = None, control: Sequence[Any] | None = None) -> SampleState:
    """Check one request and make its state (scheduler, timesteps, generators); no model call.

    ``seed``: overrides ``config.seed``; neither: a random seed, reported in ``state.seeds``.
    ``image``: image-to-image from this decoded RGB PIL image (``vae_images.load_image`` reads
    paths and arrays); the schedule is the last ``strength`` part of ``config.steps``. ``size``:
    (height, width), instead of :meth:`Generator.image_size`'s choice. ``images``: how many images
    (default ``config.num_images_per_prompt``). ``mask``: inpainting of ``image`` (a mask
    :func:`fastgen.pipelines.inpaint.load_mask` reads, or an ``InpaintSource`` made for this size).
    ``control``: ControlNet condition images, one per net of the generator (PIL images).
    Raises what :meth:`Generator.generate` raises for the same arguments (bad size, unknown
    scheduler, a step count the scheduler refuses).
    """
    if image is not None and not _is_pil(image):
        raise UnsupportedError(f"step-level image-to-image takes a decoded PIL image, not {type(image).__name__}: "
                               "read it with fastgen.pipelines.vae_images.load_image, or use Generator.generate")
    check_text("prompt", prompt)
    given = config or GenerateConfig()  # what the result reports
    cfg = given.resolved(getattr(generator, "pipeline", None))  # guidance_scale none: the family's default
    dit = dit_sampling.is_dit(generator)
    if dit:
        dit_sampling.check_request(generator, cfg, mask=mask, control=control)
    if mask is not None and image is None:
        raise InvalidArgumentError("mask_image", "a mask", reason="inpainting needs the input image too")
    count = cfg.num_images_per_prompt if images is None else images
    base = seed if seed is not None else cfg.seed
    if base is None:
        base = secrets.randbelow(2**31)  # as Generator.generate draws an unseeded prompt's seed
    else:  # image j uses base + j: the last one must still be a seed a caller can pass back
        base = check_seed(base, count)
    engines = [generator.unet, generator.vae_decoder]
    if image is not None:
        if generator.vae_encoder is None:
            raise InvalidArgumentError("image", "an image", reason="this generator has no vae-encoder engine")
        engines.append(generator.vae_encoder)
    height, width = size if size is not None else generator.image_size(
        cfg, [image] if image is not None else controlnet.size_source([control] if control else None))
    generator.check_size(height, width, engines)
    inpainting = None
    if mask is not None:
        source = mask if isinstance(mask, inpaint.InpaintSource) else inpaint.prepare_source(
            image, mask, height, width, cfg)
        inpainting = inpaint.InpaintState(source, inpaint.unet_mode(generator))
        image = source.image
    else:
        inpaint.check_without_mask(generator)
        inpaint.check_options(cfg)
    controlled = controlnet.prepare(generator, control, cfg, height, width, inpainting=mask is not None)
    scheduler = make_scheduler(cfg.scheduler, generator.scheduler_config)
    if dit:
        timesteps = dit_sampling.schedule(generator, scheduler, cfg, height, width, img2img=image is not None,
                                          device=_device(generator))
    else:
        set_timesteps(scheduler, cfg.steps, _device(generator))
        timesteps = img2img_timesteps(scheduler, cfg.steps, cfg.strength) if image is not None else scheduler.timesteps
    seeds = [base + j for j in range(count)]
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    # FLUX: guided means true CFG (guidance_scale is fed to the transformer instead).
    guided, weight = dit_sampling.guidance(generator.pipeline, cfg) if dit else (
        cfg.guidance_scale > 1.0, float(cfg.guidance_scale))  # type: ignore[operator]
    zero_negative = (generator.pipeline == "sdxl" and generator.force_zeros_for_empty_prompt
                     and cfg.negative_prompt is None)
    guidance = torch.full((len(seeds), 1, 1, 1), weight, device=_device(generator))
    return SampleState(prompt=prompt, config=given, seeds=seeds, height=height, width=width, scheduler=scheduler,
                       timesteps=timesteps, generators=generators, guided=guided, guidance=guidance,
                       extra=step_kwargs(scheduler, eta=cfg.eta, generators=generators), zero_negative=zero_negative,
                       image=image, inpaint=inpainting, control=controlled)


def _is_pil(image: Any) -> bool:
    from PIL import Image

    return isinstance(image, Image.Image)


def _negative(state: SampleState) -> str | None:
    """The text of the state's unconditional rows, None when it has none (unguided, or zeroed)."""
    if not state.guided or state.zero_negative:
        return None
    return state.config.negative_prompt if state.config.negative_prompt is not None else ""


def encode_prompts(generator: Any, states: Sequence[SampleState]) -> float:
    """Conditioning rows of every state from ONE text-encoder call (each distinct text encoded once).

    The texts are every state's prompt, then the negatives, as diffusers batches one call's.
    Returns the call's wall time in ms (also stored in each state's ``text_encoding_ms``).
    """
    start = time.perf_counter()
    negatives = [_negative(s) for s in states]
    texts = [s.prompt for s in states] + [n for n in negatives if n is not None]
    if dit_sampling.is_dit(generator):
        generator.prompt_encoder.encode_states(states, texts, negatives)
        return _encoded(states, start)
    hidden, pooled = generator.prompt_encoder.encode(texts)  # (texts, seq, dim), (texts, pooled) or None
    sdxl = generator.pipeline == "sdxl"
    next_negative = len(states)
    for i, (s, negative) in enumerate(zip(states, negatives)):
        rows = [i]
        if negative is not None:
            rows.append(next_negative)
            next_negative += 1
        index = torch.tensor(rows, device=hidden.device)
        own_pooled = pooled[index.to(pooled.device)] if pooled is not None else None
        s.cond = assemble_conditioning(hidden[index], own_pooled, [s.images], guided=s.guided,
                                       zero_negative=s.zero_negative, sdxl=sdxl, height=s.height, width=s.width)
    return _encoded(states, start)


def _encoded(states: Sequence[SampleState], start: float) -> float:
    ms = (time.perf_counter() - start) * 1e3
    for s in states:
        s.text_encoding_ms = ms
    return ms


def init_latents(generator: Any, states: Sequence[SampleState]) -> None:
    """Each state's initial latents from its own generators.

    Text-to-image: noise times the scheduler's ``init_noise_sigma``. Image-to-image: ONE VAE-encoder
    call for the distinct input images of all the states (by identity), each image's posterior sample
    ``scaling_factor * (mean + exp(logvar / 2) * noise)``, then noise added at the first timestep.
    """
    device = _device(generator)
    for s in states:
        if s.image is None:
            # Flow-matching schedulers have no init_noise_sigma (their pipelines draw plain noise).
            s.latents = per_sample_noise(_latent_shape(generator, s), s.generators, device) * getattr(
                s.scheduler, "init_noise_sigma", 1.0)
    from_images = [s for s in states if s.image is not None and s.inpaint is None]
    if from_images:
        _encode_images(generator, from_images, device)
    inpainting = [s for s in states if s.inpaint is not None]
    if inpainting:
        inpaint.init_latents(generator, inpainting, device)


def _latent_shape(generator: Any, s: SampleState) -> tuple[int, int, int, int]:
    return (s.images, generator.latent_channels, s.height // generator.latent_factor,
            s.width // generator.latent_factor)


def _encode_images(generator: Any, states: Sequence[SampleState], device: torch.device) -> None:
    start = time.perf_counter()
    slots: dict[int, int] = {}
    distinct: list = []
    for s in states:
        if id(s.image) not in slots:
            slots[id(s.image)] = len(distinct)
            distinct.append(s.image)
    sizes = {(s.height, s.width) for s in states}
    if len(sizes) != 1:
        raise InvalidArgumentError("states", sorted(sizes), reason="one VAE-encoder call takes one image size")
    height, width = sizes.pop()
    pixels = vae_images.to_pixels(distinct, height, width)  # (distinct, 3, H, W) in [-1, 1]
    out = run_chunked(generator.vae_encoder, {"image": pixels})
    for s in states:
        index = torch.full((s.images,), slots[id(s.image)], device=out["latent_mean"].device)
        mean = out["latent_mean"][index].to(device)  # (images, C, h, w)
        logvar = out["latent_logvar"][index].to(device)
        noise = per_sample_noise(mean.shape, s.generators, device)
        # SD3/FLUX VAEs shift the posterior before scaling (shift_factor; 0 for SD).
        shift = getattr(generator, "shift_factor", 0.0)
        s.latents = generator.scaling_factor * (mean + torch.exp(0.5 * logvar) * noise - shift)
    bad = nonfinite_rows(torch.cat([s.latents for s in states]))  # type: ignore[misc]
    if bad:  # state i is prompt i of Generator.generate; its images are consecutive rows
        ends = torch.tensor([s.images for s in states]).cumsum(0).tolist()
        which = sorted({next(i for i, end in enumerate(ends) if row < end) for row in bad})
        raise NumericalError("the VAE encoder returned non-finite latents (NaN or inf) for the input image of "
                             f"prompt(s) {', '.join(map(str, which))}")
    for s in states:
        if len(s.timesteps):  # strength 0 (or too few steps to run one): the encoded image as it is
            noise = per_sample_noise(_latent_shape(generator, s), s.generators, device)
            s.latents = dit_sampling.noise_latents(s.scheduler, s.latents, noise, s.timesteps[:1].repeat(s.images))
    ms = (time.perf_counter() - start) * 1e3
    for s in states:
        s.vae_encode_ms = ms


def combine_guidance(noise_uncond: torch.Tensor, noise_text: torch.Tensor,
                     guidance: torch.Tensor | float) -> torch.Tensor:
    """Classifier-free guidance: ``uncond + guidance * (text - uncond)``, the one place it is computed.

    ``noise_uncond`` / ``noise_text``: (images, C, h, w); ``guidance``: a float or (images, 1, 1, 1).
    """
    return noise_uncond + guidance * (noise_text - noise_uncond)


def _layout(states: Sequence[SampleState]) -> list[tuple[int | None, int]]:
    """Per state, the first UNet row of its unconditional block (None when unguided) and of its
    conditional block: all unconditional blocks first, then all conditional ones, in state order."""
    uncond_rows = sum(s.images for s in states if s.guided)
    out: list[tuple[int | None, int]] = []
    uncond = cond = 0
    for s in states:
        out.append((uncond if s.guided else None, uncond_rows + cond))
        uncond += s.images if s.guided else 0
        cond += s.images
    return out


def _arrange(states: Sequence[SampleState], parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Each state's rows (its unconditional half first when guided) in the :func:`_layout` order."""
    uncond = [p[:s.images] for s, p in zip(states, parts) if s.guided]
    cond = [p[s.images:] if s.guided else p for s, p in zip(states, parts)]
    return torch.cat(uncond + cond)


def _feeds(states: Sequence[SampleState], cache: dict | None) -> dict[str, torch.Tensor]:
    """The conditioning inputs of a batch in the :func:`_layout` order."""
    key = tuple(id(s) for s in states)
    if cache is not None and cache.get("key") == key:
        return cache["feeds"]
    parts = [s.cond.feeds() for s in states]  # type: ignore[union-attr]
    feeds = {name: _arrange(states, [p[name] for p in parts]) for name in parts[0]}
    if cache is not None:  # reused while the batch's membership stays the same
        cache.clear()
        cache.update(key=key, feeds=feeds, states=list(states))
    return feeds


def unet_step(unet: Any, states: Sequence[SampleState], *, feeds_cache: dict | None = None) -> list:
    """:func:`denoise_step` over ``unet``: any engine or callable mapping the UNet feeds (``sample``,
    ``timestep``, the conditioning) to ``{"noise_pred": ...}``."""
    if not states:
        return []
    sizes = {(s.height, s.width) for s in states}
    if len(sizes) != 1:
        raise InvalidArgumentError("states", sorted(sizes), reason="one UNet call takes one image size")
    start = time.perf_counter()
    inputs, timesteps = [], []
    for s in states:
        t = s.timesteps[s.index]
        # Both halves of guidance: scale_model_input on (2 * images, C, h, w), as diffusers does.
        model_input = torch.cat([s.latents, s.latents]) if s.guided else s.latents
        # Inpainting UNet: the mask and masked-image latents join the scaled rows along the channels.
        # Flow-matching schedulers have no scale_model_input: their pipelines feed the latents as they are.
        scaled = s.scheduler.scale_model_input(model_input, t) if hasattr(s.scheduler, "scale_model_input") \
            else model_input
        inputs.append(inpaint.unet_input(s, scaled) if s.inpaint is not None else scaled)
        timesteps.append(t.reshape(1).to(torch.float32).expand(model_input.shape[0]))  # (rows,)
    sample = _arrange(states, inputs)  # (rows, C, h, w)
    timestep = _arrange(states, timesteps)  # (rows,): per-sample timesteps
    feeds = {"sample": sample, "timestep": timestep, **_feeds(states, feeds_cache)}
    feeds.update(controlnet.residuals(unet, states, _layout(states), feeds))  # ControlNet residuals, if any
    noise_pred = run_chunked(unet, feeds)["noise_pred"]
    errors: list = []
    previous: list = []
    for s, (uncond_row, cond_row) in zip(states, _layout(states)):
        own = noise_pred[cond_row:cond_row + s.images].to(s.latents.device)
        previous.append(s.latents)
        try:
            if uncond_row is not None:
                own = combine_guidance(noise_pred[uncond_row:uncond_row + s.images].to(s.latents.device), own,
                                       s.guidance)
            stepped = s.scheduler.step(own, s.timesteps[s.index], s.latents, **s.extra, return_dict=False)[0]
            if s.inpaint is not None:  # regular UNet: the kept part back to the input image's latents
                stepped = inpaint.blend(s, stepped, s.index)
            s.latents = stepped
            s.index += 1
            errors.append(None)
        except Exception as exc:  # one request's scheduler failing must not fail the batch
            errors.append(exc)
    _check_finite(states, errors, previous, noise_pred)
    ms = (time.perf_counter() - start) * 1e3
    for s, err in zip(states, errors):
        if err is None:
            s.step_ms.append(ms)
    return errors


def _check_finite(states: Sequence[SampleState], errors: list, previous: list, noise_pred: torch.Tensor) -> None:
    """Turn each stepped state whose new latents hold a NaN or an infinity into a :class:`NumericalError`
    (its entry of ``errors``), the state put back as it was before the step; the others are untouched.

    One ``isfinite`` reduction per state and one host sync for the whole step: a NaN never recovers,
    so a request that went non-finite fails at that step instead of "succeeding" as a NaN image.
    """
    stepped = [i for i, e in enumerate(errors) if e is None]
    if not stepped:
        return
    finite = torch.stack([torch.isfinite(states[i].latents).all() for i in stepped]).tolist()  # type: ignore[arg-type]
    layout = _layout(states)
    for i, ok in zip(stepped, finite):
        if ok:
            continue
        s = states[i]
        images = nonfinite_rows(s.latents) or list(range(s.images))  # type: ignore[arg-type]
        s.index -= 1
        s.latents = previous[i]
        uncond_row, cond_row = layout[i]
        rows = noise_pred[cond_row:cond_row + s.images]
        if uncond_row is not None:
            rows = torch.cat([noise_pred[uncond_row:uncond_row + s.images], rows])
        source = ("the UNet returned non-finite noise predictions" if nonfinite_rows(rows)
                  else f"{type(s.scheduler).__name__}.step produced them")
        errors[i] = NumericalError(
            f"non-finite latents (NaN or inf) at denoising step {s.index + 1} of {s.total_steps}: {source} "
            f"(image(s) {', '.join(map(str, images))}, seed(s) {', '.join(str(s.seeds[j]) for j in images)})")


def denoise_step(generator: Any, states: Sequence[SampleState], *, feeds_cache: dict | None = None) -> list:
    """Advance every state by one step: one UNet call over all their rows, then each scheduler's step.

    The states must share one image size and have steps left. ``feeds_cache``: a dict kept by the
    caller between calls, so the conditioning rows are concatenated only when the batch changes.
    Returns one entry per state: None, or the exception its scheduler step raised (that state is
    left as it was; the others advanced). An exception of the UNet call itself propagates, with no
    state changed, so a caller may retry a smaller batch.
    """
    return unet_step(generator.unet, states, feeds_cache=feeds_cache)


def denoise_loop(unet: Any, states: Sequence[SampleState], *, progress: bool = False) -> None:
    """Step all ``states`` together until every one is done (one UNet call per step); the first
    scheduler error is raised, a :class:`NumericalError` naming the prompt (state ``i`` is prompt ``i``,
    as :meth:`Generator.generate` lays them out). ``progress``: a progress bar over the longest schedule."""
    total = max((s.total_steps - s.index for s in states), default=0)
    cache: dict = {}
    with progress_steps("denoising", total, enabled=progress) as bar:
        for i in range(total):
            bar.advance(f"step {i + 1}/{total}")
            active = [s for s in states if not s.done]
            failed = next(((s, e) for s, e in zip(active, unet_step(unet, active, feeds_cache=cache))
                           if e is not None), None)
            if failed is not None:
                state, error = failed
                if isinstance(error, NumericalError):
                    raise NumericalError(f"prompt {states.index(state)} ({state.prompt[:40]!r}): {error}") from None
                raise error


def decode(generator: Any, states: Sequence[SampleState]) -> list[torch.Tensor]:
    """Each state's images (images, 3, H, W) in [-1, 1] from ONE VAE-decoder call (diffusers decodes
    ``latents / scaling_factor``). The states must share one image size."""
    if not states:
        return []
    start = time.perf_counter()
    latents = torch.cat([s.latents for s in states])  # type: ignore[misc]
    latents = latents / generator.scaling_factor + getattr(generator, "shift_factor", 0.0)  # 0 for SD
    images = run_chunked(generator.vae_decoder, {"latent": latents})["image"]
    ms = (time.perf_counter() - start) * 1e3
    out, offset = [], 0
    for s in states:
        out.append(images[offset:offset + s.images])
        offset += s.images
        s.vae_decode_ms = ms
    return out


__all__ = ["SampleState", "combine_guidance", "decode", "denoise_loop", "denoise_step", "encode_prompts",
           "init_latents", "nonfinite_rows", "prepare", "unet_step"]
