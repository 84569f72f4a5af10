"""``fastgen.Generator``: text-to-image and image-to-image over engines, diffusers-exact on the same weights.

The pipeline is diffusers' Stable Diffusion / SDXL one, step for step (encode prompts and negatives,
prepare latents, ``scheduler.set_timesteps``, one UNet call per step for both halves of
classifier-free guidance, ``scheduler.step``, VAE decode), with every model call on an
:class:`~fastgen.engines.base.Engine` of any backend and per-image seeds: image ``j`` of a prompt with
seed ``s`` is drawn from ``torch.Generator().manual_seed(s + j)`` whatever else is in the batch.
:meth:`Generator.generate` drives the step machinery of :mod:`fastgen.pipelines.stepping` (one state
per prompt, all of them in every UNet call), the same steps the batched runtime takes.

Best-of-N: ``generate(..., candidates=N, scorer=S, keep=k)`` makes N variants per prompt (seeds
``seed .. seed + N - 1``), scores them with ``S.score_images(list of PIL images) -> list[Score]``
(``Score.probs``: label -> probability) and keeps the k best per prompt; a two-tower CLIP / SigLIP scorer
scores each candidate against its own prompt instead (:mod:`fastgen.pipelines.best_of`).
"""

from __future__ import annotations

import copy
import logging
import math
import os
import secrets
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch

from fastgen.errors import InvalidArgumentError, NumericalError
from fastgen.models.metadata import UNetMetadata, VaeMetadata
from fastgen.models.spec import parse_dim
from fastgen.pipelines import best_of as ranking
from fastgen.pipelines import controlnet as control
from fastgen.pipelines import dit_sampling, stepping
from fastgen.pipelines import inpaint as inpainting
from fastgen.pipelines import vae_images as imaging
from fastgen.pipelines.adapters import AdapterMethods
from fastgen.pipelines.conditioning import PromptEncoder
from fastgen.pipelines.config import (
    GenerateConfig,
    GenerationResult,
    Latencies,
    check_image_memory,
    check_seed,
    check_text,
)
from fastgen.pipelines.dit_conditioning import DIT_PIPELINES, DitPromptEncoder
from fastgen.pipelines.sampling import make_scheduler, set_timesteps

logger = logging.getLogger(__name__)

#: Engine directory names of a generator folder (``fastgen build ... --out DIR/<name>``).
COMPONENTS = ("text-encoder", "text-encoder-2", "text-encoder-3", "unet", "transformer", "vae-decoder", "vae-encoder")
PIPELINES = ("sd", "sdxl", *DIT_PIPELINES)

_M = TypeVar("_M", UNetMetadata, VaeMetadata)


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1e3


class Generator(AdapterMethods):
    """Stable Diffusion (1.x/2.x), SDXL, SD3/3.5, FLUX.1 or PixArt-Sigma generation from component engines.

    SD3/FLUX/PixArt (:mod:`fastgen.pipelines.dit_conditioning`, :mod:`fastgen.pipelines.dit_sampling`):
    the denoiser is a ``transformer`` engine (also reachable as ``unet``, which the step machinery
    uses); SD3 takes a third text encoder (T5, optional), FLUX CLIP + T5, PixArt T5 alone.

    ``unet``, ``vae_decoder``, ``text_encoder`` (and ``text_encoder_2`` for SDXL, ``vae_encoder``
    for image-to-image) are engines: anything called with a dict of named tensors that returns one,
    with ``spec``, ``metadata`` and (text encoders) ``tokenizer``. ``tokenizer``/``tokenizer_2``,
    ``scheduler_config`` (a diffusers scheduler config dict), ``scaling_factor`` (the VAE's),
    ``pipeline`` (``sd``/``sdxl``) and ``force_zeros_for_empty_prompt`` default to what the engines
    carry (``engine.tokenizer``, ``unet.metadata.scheduler``, ``vae_decoder.metadata.scaling_factor``,
    ``unet.metadata.pipeline``, :meth:`~fastgen.models.metadata.UNetMetadata.zeros_for_empty_prompt`).
    ``vae_encoder`` may also be a zero-argument callable returning the engine, built on first use.
    """

    def __init__(self, *, unet: Any = None, vae_decoder: Any, text_encoder: Any = None, text_encoder_2: Any = None,
                 vae_encoder: Any = None, tokenizer: Any = None, tokenizer_2: Any = None,
                 scheduler_config: dict[str, Any] | None = None, scaling_factor: float | None = None,
                 pipeline: str | None = None, force_zeros_for_empty_prompt: bool | None = None,
                 controlnet: Any = None, transformer: Any = None, text_encoder_3: Any = None,
                 tokenizer_3: Any = None, shift_factor: float | None = None) -> None:
        if (unet is None) == (transformer is None):
            raise InvalidArgumentError("unet", None if unet is None else "a unet and a transformer",
                                       reason="pass one denoiser engine: unet, or transformer (SD3, FLUX, PixArt)")
        unet = unet if unet is not None else transformer
        if "encoder_hidden_states" not in unet.spec.input_names:
            raise InvalidArgumentError("unet", unet.spec.model_type or unet.spec.component,
                                       reason="a text-conditioned UNet (UNet2DConditionModel) engine is needed")
        self.unet = unet
        self.vae_decoder = vae_decoder
        self._vae_encoder = vae_encoder
        unet_meta, vae_meta = _metadata(unet, UNetMetadata), _metadata(vae_decoder, VaeMetadata)
        self.pipeline = pipeline or unet_meta.pipeline or (
            "sdxl" if "text_embeds" in unet.spec.input_names else "sd")
        # A transformer (SD3/FLUX/PixArt inputs) runs a DiT pipeline, a UNet an SD/SDXL one.
        dit = unet_meta.pipeline in DIT_PIPELINES or bool(
            {"pooled_projections", "encoder_attention_mask"} & set(unet.spec.input_names))
        allowed = DIT_PIPELINES if dit else ("sd", "sdxl")
        if self.pipeline not in allowed:
            raise InvalidArgumentError("pipeline", self.pipeline, allowed)
        self.scheduler_config = dict(scheduler_config or copy.deepcopy(unet_meta.scheduler) or {})
        if not self.scheduler_config:
            raise InvalidArgumentError("scheduler_config", None, reason="the unet engine carries none: pass "
                                       "a diffusers scheduler config (scheduler_config.json as a dict)")
        factor = scaling_factor if scaling_factor is not None else vae_meta.scaling_factor
        if factor is None:
            raise InvalidArgumentError("scaling_factor", None, reason="the vae-decoder engine carries none: pass "
                                       "the VAE's scaling_factor (0.18215 for SD 1.x, 0.13025 for SDXL)")
        self.scaling_factor = float(factor)
        shift = shift_factor if shift_factor is not None else getattr(vae_meta, "shift_factor", None)
        #: The VAE's latent shift (SD3/FLUX): latents = scaling_factor * (posterior - shift_factor); 0 for SD.
        self.shift_factor = float(shift or 0.0)
        self.force_zeros_for_empty_prompt = bool(
            force_zeros_for_empty_prompt if force_zeros_for_empty_prompt is not None
            else unet_meta.zeros_for_empty_prompt(self.pipeline))
        encoders = [(e, tok if tok is not None else getattr(e, "tokenizer", None))
                    for e, tok in ((text_encoder, tokenizer), (text_encoder_2, tokenizer_2),
                                   (text_encoder_3, tokenizer_3)) if e is not None]
        if self.pipeline == "sd" and text_encoder_2 is not None:
            raise InvalidArgumentError("text_encoder_2", text_encoder_2.spec.component,
                                       reason="an SD 1.x/2.x UNet takes one text encoder")
        if text_encoder_3 is not None and self.pipeline != "sd3":
            raise InvalidArgumentError("text_encoder_3", text_encoder_3.spec.component,
                                       reason="only SD3 takes a third text encoder")
        self.prompt_encoder: Any = (DitPromptEncoder(self.pipeline, encoders, unet) if self.pipeline in DIT_PIPELINES
                                    else PromptEncoder(self.pipeline, encoders))
        self.text_encoder, self.text_encoder_2, self.text_encoder_3 = text_encoder, text_encoder_2, text_encoder_3
        sample = unet.spec.inputs[unet.spec.input_names.index("sample")]
        #: The UNet's input channels: the latent channels, or 2 * those + 1 for an inpainting UNet
        #: (latents, mask, masked-image latents); the latents are what it predicts noise for.
        self.unet_in_channels = int(sample.shape[1])
        outputs = unet.spec.outputs
        noise = outputs[unet.spec.output_names.index("noise_pred")] if "noise_pred" in unet.spec.output_names \
            else sample
        self.latent_channels = int(noise.shape[1])
        parsed = parse_dim(sample.shape[2])
        self.latent_factor = parsed[1] if parsed else 1
        #: ControlNet engines (``controlnet``: one or a list; the unet must be ``unet-controlled``).
        self.controlnets = control.check_nets(unet, controlnet)

    # --- construction --------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, model: str | os.PathLike, *, backend: str = "onnxruntime", device: str = "auto",
                        precision: str = "fp32", cache: Any = None, profile: Any = None,
                        build_config: Any = None, quantization: Any = None, progress: bool = False,
                        controlnet: Any = None) -> Generator:
        """Build (cached) or load the engines of ``model`` and make a generator of them.

        ``model``: a preset (``tiny``, ``tiny-sdxl``, ``sd15``, ``sdxl``), a local diffusers pipeline
        folder, or a folder of engine directories made by ``fastgen build`` (``unet/``,
        ``vae-decoder/``, ``text-encoder/``... each with a ``manifest.json``; then no PyTorch model is
        loaded and ``backend``/``precision``/``profile`` are the engines' own). ``profile``: shape
        ranges for all components (``batch=1:2:8,height=512``: each component takes the dims it has).
        ``build_config``: a :class:`~fastgen.BuildConfig` for the other build settings (export,
        runtime); the keyword arguments override its fields. ``quantization`` (or
        ``build_config.quantization``): a ``fastgen.quant`` preset name or config applied to the UNet
        only, where nearly all the compute is; the text encoders and the VAE stay in float.
        ``controlnet``: ControlNet(s) (docs/controlnet.md): a preset or folder with a ``controlnet``
        component, a ControlNet engine or engine folder, or a list; a model with its own ControlNet
        (``tiny-controlnet``) uses it by default. The UNet is then built as ``unet-controlled``.
        """
        from fastgen.engines.loading import load_engine

        path = Path(model).expanduser() if isinstance(model, (str, os.PathLike)) else None
        found = _engine_folder(path) if path is not None and path.is_dir() else None
        if found is not None:
            if quantization not in (None, "none"):
                raise InvalidArgumentError("quantization", str(quantization), ("none",),
                                           reason=f"{path} holds built engines; quantize when building them")
            dev = None if device == "auto" else device
            execution = build_config.execution if build_config is not None else None
            engines = {name: load_engine(p, device=dev, execution=execution) for name, p in found.items()
                       if name != "vae-encoder"}
            lazy = found.get("vae-encoder")
            vae_encoder = (lambda: load_engine(lazy, device=dev, execution=execution)) if lazy is not None else None
            logger.info("generator from engine directories in %s: %s", path, ", ".join(found))
            engines.update(control.net_engines(model, controlnet, None,
                                               lambda p: load_engine(p, device=dev, execution=execution)))
        else:
            engines, vae_encoder = _build_engines(model, backend=backend, device=device, precision=precision,
                                                  cache=cache, profile=profile, build_config=build_config,
                                                  quantization=quantization, progress=progress, controlnet=controlnet)
        if "unet" not in engines and "transformer" in engines:  # SD3, FLUX, PixArt
            engines["unet"] = engines.pop("transformer")
        missing = [n for n in ("unet", "vae-decoder") if n not in engines]
        if missing:
            raise InvalidArgumentError("model", os.fspath(model), reason=f"has no {missing[0]} component")
        return cls(unet=engines["unet"], vae_decoder=engines["vae-decoder"], text_encoder=engines.get("text-encoder"),
                   text_encoder_2=engines.get("text-encoder-2"), text_encoder_3=engines.get("text-encoder-3"),
                   vae_encoder=vae_encoder, controlnet=control.take_nets(engines))

    @property
    def transformer(self) -> Any:
        """The denoiser engine of an SD3, FLUX or PixArt generator (the same engine as ``unet``)."""
        return self.unet

    @property
    def vae_encoder(self) -> Any:
        """The VAE encoder engine (built or loaded on first use when it was given lazily), or None."""
        if callable(self._vae_encoder) and not hasattr(self._vae_encoder, "spec"):
            self._vae_encoder = self._vae_encoder()
        return self._vae_encoder

    @property
    def default_size(self) -> tuple[int, int]:
        """(height, width) at the UNet profile's opt."""
        dims = self.unet.spec.profile.dims
        return dims["height"].opt, dims["width"].opt

    # --- checks ----------------------------------------------------------------------------------

    def check_size(self, height: int, width: int, engines: Sequence[Any]) -> None:
        """Raise a one-line error unless every engine of ``engines`` takes (height, width) images."""
        for engine in engines:
            engine.spec.check_dims({"height": height, "width": width})
            if getattr(engine, "strict_profile", False):
                for name, size in (("height", height), ("width", width)):
                    rng = engine.spec.profile.dims[name]
                    if not rng.min <= size <= rng.max:
                        raise InvalidArgumentError(name, size, f"{rng.min} to {rng.max} (the "
                                                   f"{engine.spec.component} engine's profile)")

    def image_size(self, cfg: GenerateConfig, init_images: list | None = None) -> tuple[int, int]:
        """(height, width) of a request: ``cfg``'s, else (image-to-image) the first input image's rounded
        down to what the models accept, else the UNet profile's opt."""
        height, width = cfg.height, cfg.width
        if init_images is not None:
            # diffusers' img2img takes the image's size, rounded down to what the models accept.
            unit_h, unit_w = (math.lcm(self.unet.spec.multiples.get(n, 1), self.latent_factor)
                              for n in ("height", "width"))
            w0, h0 = init_images[0].size
            height = height or imaging.round_down(h0, unit_h)
            width = width or imaging.round_down(w0, unit_w)
            if not height or not width:
                raise InvalidArgumentError("image", f"{w0}x{h0} pixels", f"at least {unit_w}x{unit_h} pixels")
        opt_h, opt_w = self.default_size
        return height or opt_h, width or opt_w

    # --- generation ------------------------------------------------------------------------------

    def generate(self, prompts: str | Sequence[str], *, image: Any = None, config: GenerateConfig | None = None,
                 progress: bool = True, seeds: Sequence[int] | None = None, candidates: int | None = None,
                 scorer: Any = None, keep: int = 1, rank_by: str | Callable[[Any], float] | None = None,
                 mask_image: Any = None, control_image: Any = None, **overrides: Any) -> GenerationResult:
        """Generate images for ``prompts`` (a string or a list of them; empty strings are allowed).

        ``image``: image-to-image from one image for every prompt, or a list with one per prompt (PIL
        images, paths, uint8 (H, W, 3) arrays). ``config`` and keyword ``overrides`` (its field names:
        ``steps=30, guidance_scale=5``) set the sampling. ``seeds``: one seed per prompt (overrides
        ``config.seed``). ``candidates``/``scorer``/``keep``/``rank_by``: best-of-N (module docstring);
        ``rank_by`` is a label of the scorer (default: its first) or a function of a ``Score``.
        ``mask_image``: inpainting of ``image`` (white: regenerate, black: keep), one mask or one per
        prompt, each the size of its image (:mod:`fastgen.pipelines.inpaint`; options
        ``strength``, ``mask_blur``, ``padding_mask_crop``). ``control_image``: ControlNet condition
        image(s), :func:`fastgen.pipelines.controlnet.load_images` (options ``controlnet_conditioning_scale``,
        ``control_guidance_start``/``end``, ``guess_mode``).
        """
        start = time.perf_counter()
        cfg = (config or GenerateConfig()).replace(**overrides) if overrides else (config or GenerateConfig())
        prompts = _check_prompts(prompts)
        best_of = ranking.check_best_of(candidates, scorer, keep, rank_by, cfg)
        per_prompt = candidates if best_of else cfg.num_images_per_prompt
        seeds = _prompt_seeds(cfg, seeds, len(prompts), per_prompt)
        # An unknown scheduler, or a step count it refuses, fails before any work (DiT: in prepare, whose
        # schedule depends on the image size).
        if not dit_sampling.is_dit(self):
            set_timesteps(make_scheduler(cfg.scheduler, self.scheduler_config), cfg.steps)
        init_images = imaging.load_images(image, len(prompts)) if image is not None else None
        if mask_image is not None and init_images is None:
            raise InvalidArgumentError("mask_image", "a mask", reason="inpainting needs the input image too")
        masks = inpainting.load_masks(mask_image, len(prompts)) if mask_image is not None else None
        if init_images is not None and self.vae_encoder is None:
            raise InvalidArgumentError("image", "an image", reason="this generator has no vae-encoder engine")
        controls = control.load_images(self, control_image, len(prompts))  # per prompt, per net
        height, width = self.image_size(cfg, init_images if init_images is not None else control.size_source(controls))
        self.check_size(height, width, [self.unet, self.vae_decoder] +
                        ([self.vae_encoder] if init_images is not None else []))
        check_image_memory(len(prompts) * per_prompt, height, width, per_prompt=per_prompt,
                           argument="candidates" if best_of else "num-images-per-prompt")

        # Prompt-major rows, as diffusers orders num_images_per_prompt: prompt 0's images first.
        prompt_indices = [p for p in range(len(prompts)) for _ in range(per_prompt)]
        image_seeds = [seeds[p] + j for p in range(len(prompts)) for j in range(per_prompt)]
        sources = inpainting.prepare_sources(init_images, masks, height, width, cfg) if masks is not None else None
        states = [stepping.prepare(self, prompt, cfg, seed=seeds[p], size=(height, width), images=per_prompt,
                                   image=init_images[p] if init_images is not None else None,
                                   mask=sources[p] if sources is not None else None,
                                   control=controls[p] if controls is not None else None)
                  for p, prompt in enumerate(prompts)]
        with torch.inference_mode():
            latents, decoded, timings = self._run(states, cfg, progress)
        scores = rank_values = None
        row_sources = inpainting.row_sources(states)  # padding_mask_crop pastes each row back into its image
        if best_of:
            t0 = time.perf_counter()
            chosen, scores, rank_values = ranking.best_of(decoded, prompt_indices, per_prompt, scorer, keep, rank_by,
                                                          prompts=prompts)
            timings["scoring_ms"] = _ms(t0)
            decoded = decoded[chosen]
            row_sources = [row_sources[i] for i in chosen]
            prompt_indices = [prompt_indices[i] for i in chosen]
            image_seeds = [image_seeds[i] for i in chosen]
        images = latents if cfg.output_type == "latent" else inpainting.to_output(decoded, row_sources, cfg.output_type)
        latencies = Latencies(**timings, total_ms=_ms(start))
        return GenerationResult(images=images, prompts=[prompts[p] for p in prompt_indices], seeds=image_seeds,
                                prompt_indices=prompt_indices, latencies=latencies, config=cfg, scores=scores,
                                rank_values=rank_values,
                                extras={"height": height, "width": width, "pipeline": self.pipeline,
                                        "guidance_scale": cfg.resolved(self.pipeline).guidance_scale,
                                        "scheduler": cfg.scheduler or self.scheduler_config.get("_class_name"),
                                        "mode": ("inpaint" if masks is not None else
                                                 "img2img" if init_images is not None else "txt2img")})

    __call__ = generate

    def inpaint(self, prompts: str | Sequence[str], image: Any, mask_image: Any, *,
                strength: float | None = None, config: GenerateConfig | None = None,
                **kwargs: Any) -> GenerationResult:
        """Inpainting: :meth:`generate` with ``image`` and ``mask_image`` (white: regenerate, black:
        keep). ``strength``: default ``config``'s, else 1 as diffusers' inpaint pipelines (the masked
        part from pure noise; :meth:`generate`'s default is image-to-image's 0.8)."""
        if strength is None and config is None:
            strength = 1.0
        if strength is not None:
            kwargs["strength"] = strength
        return self.generate(prompts, image=image, mask_image=mask_image, config=config, **kwargs)

    def _run(self, states: list[stepping.SampleState], cfg: GenerateConfig, progress: bool):
        """The stepping machinery from the first step to the last, all states in every UNet call.

        Returns (latents, decoded images or None, stage timings in ms).
        """
        timings: dict[str, Any] = {}
        timings["text_encoding_ms"] = stepping.encode_prompts(self, states)
        stepping.init_latents(self, states)
        if states[0].image is not None:
            timings["vae_encode_ms"] = states[0].vae_encode_ms
        t0 = time.perf_counter()
        stepping.denoise_loop(self.unet, states, progress=progress)
        timings["denoising_ms"] = _ms(t0)
        timings["denoising_step_ms"] = tuple(states[0].step_ms)
        latents = torch.cat([s.latents for s in states])  # type: ignore[misc]
        decoded = None
        if cfg.output_type != "latent":
            decoded = torch.cat(stepping.decode(self, states))
            timings["vae_decode_ms"] = states[0].vae_decode_ms
            _check_decoded(decoded, states)
        return latents, decoded, timings

    def torch_modules(self) -> dict[str, torch.nn.Module | None]:
        """The PyTorch modules this generator's engines run, by component name (``unet``,
        ``vae_decoder``, ``text_encoder``, ``text_encoder_2``, ``vae_encoder``). A VAE encoder given
        lazily and not built yet maps to None (listing does not build it). Engines that run no
        PyTorch module (onnxruntime, TensorRT) contribute nothing; an engine running several modules
        gives ``name.key`` entries."""
        engines = {"unet": self.unet, "vae_decoder": self.vae_decoder, "text_encoder": self.text_encoder,
                   "text_encoder_2": self.text_encoder_2, "text_encoder_3": self.text_encoder_3,
                   "vae_encoder": self._vae_encoder}
        out: dict[str, torch.nn.Module | None] = {}
        for name, engine in engines.items():
            if engine is None:
                continue
            if not hasattr(engine, "spec"):  # a lazily given encoder: built on first image-to-image use
                out[name] = None
                continue
            modules = dict(getattr(engine, "torch_modules", lambda: {})())
            if len(modules) == 1:
                out[name] = next(iter(modules.values()))
            else:
                out.update({f"{name}.{key}": module for key, module in modules.items()})
        return out

    def close(self) -> None:
        """Release the engines' backend resources."""
        for engine in (self.unet, self.vae_decoder, self.text_encoder, self.text_encoder_2, self.text_encoder_3,
                       self._vae_encoder, *self.controlnets):
            if engine is not None and hasattr(engine, "close"):
                engine.close()

    def __repr__(self) -> str:
        backend = getattr(self.unet, "backend", "?")
        return f"<Generator {self.pipeline} on {backend} engines, scheduler {self.scheduler_config.get('_class_name')}>"


# --- helpers ---------------------------------------------------------------------------------------

def _metadata(engine: Any, kind: type[_M]) -> _M:
    """``engine.metadata`` when it is of ``kind``, else ``kind``'s empty metadata (nothing recorded: an
    engine-like object without metadata, or an engine of a custom component name)."""
    metadata = getattr(engine, "metadata", None)
    return metadata if isinstance(metadata, kind) else kind()


def _check_prompts(prompts: Any) -> list[str]:
    """A list of prompts; a bad one is named by its index (``prompts[1]``)."""
    if isinstance(prompts, str):
        return [check_text("prompts[0]", prompts)]
    if isinstance(prompts, (bytes, bytearray)) or not isinstance(prompts, Sequence) or not prompts:
        shown = type(prompts).__name__ if isinstance(prompts, (bytes, bytearray)) or not isinstance(
            prompts, Sequence) else list(prompts)
        raise InvalidArgumentError("prompts", shown, "a string or a non-empty list of strings")
    return [check_text(f"prompts[{i}]", p) for i, p in enumerate(prompts)]


def _prompt_seeds(cfg: GenerateConfig, seeds: Sequence[int] | None, count: int, per_prompt: int) -> list[int]:
    """One base seed per prompt; image j of a prompt uses base + j, so base + per_prompt - 1 must be a seed."""
    if seeds is None:
        if cfg.seed is not None:
            return [check_seed(cfg.seed, per_prompt)] * count  # per_prompt: best-of-N's candidates too
        return [secrets.randbelow(2**31) for _ in range(count)]
    if hasattr(seeds, "tolist") and getattr(seeds, "ndim", None) == 1:  # a numpy array or a tensor of seeds
        seeds = seeds.tolist()
    if isinstance(seeds, (int, str, bytes)) or not isinstance(seeds, Sequence) or len(seeds) != count:
        shown = seeds if isinstance(seeds, (int, str)) else type(seeds).__name__
        raise InvalidArgumentError("seeds", shown, f"a list of {count} seeds, one per prompt")
    return [check_seed(s, per_prompt, f"seeds[{i}]") for i, s in enumerate(seeds)]


def _check_decoded(decoded: torch.Tensor, states: Sequence[stepping.SampleState]) -> None:
    """A NaN or an infinity in the VAE decoder's output fails the call, naming the first prompt and
    image it is in (state i is prompt i; its images are consecutive rows)."""
    bad = imaging.nonfinite_rows(decoded)
    if not bad:
        return
    row, offset = bad[0], 0
    for p, s in enumerate(states):
        if row < offset + s.images:
            raise NumericalError(f"the VAE decoder returned non-finite pixels (NaN or inf) for prompt {p}, image "
                                 f"{row - offset} (seed {s.seeds[row - offset]}); {len(bad)} of {len(decoded)} "
                                 "images are affected")
        offset += s.images
    raise NumericalError(f"the VAE decoder returned non-finite pixels (NaN or inf) for image(s) {bad}")


def _engine_folder(path: Path) -> dict[str, Path] | None:
    """A ``fastgen build`` folder's engine directories (:func:`control.engine_folder`); with a ``transformer/``
    instead of a ``unet/`` (SD3, FLUX, PixArt) too. None when it is not such a folder."""
    found = control.engine_folder(path, COMPONENTS)
    if found is None and (path / "transformer" / "manifest.json").is_file():
        found = {name: path / name for name in COMPONENTS if (path / name / "manifest.json").is_file()}
    return found


def _filter_profile(profile: Any, symbols: set[str]):
    """The part of a pipeline-wide profile that concerns one component (None when nothing does)."""
    dims = {k: v for k, v in profile.dims.items() if k in symbols} if profile is not None else {}
    return type(profile)(dims) if dims else None


def _build_engines(model: Any, *, backend: str, device: str, precision: str, cache: Any, profile: Any,
                   build_config: Any, quantization: Any, progress: bool, controlnet: Any = None
                   ) -> tuple[dict[str, Any], Callable[[], Any] | None]:
    """Build (or fetch from the cache) the generation components' engines; the VAE encoder lazily."""
    import dataclasses

    from fastgen.engines.build import build
    from fastgen.engines.config import BuildConfig
    from fastgen.models import load_component, model_components
    from fastgen.models.spec import ShapeProfile

    config = dataclasses.replace(build_config or BuildConfig(), backend=backend, device=device, precision=precision,
                                 profile=None)
    if quantization is not None:
        config = dataclasses.replace(config, quantization=quantization)
    # Quantization is for the denoiser: it is where the compute is, and the text encoders' and the
    # VAE's errors are not averaged out by later steps.
    unet_quantization, config = config.quantization, dataclasses.replace(config, quantization="none")
    if isinstance(profile, str):
        profile = ShapeProfile.parse(profile)
    available = [c for c in COMPONENTS if c in model_components(model)]
    controlled = control.wanted(model, controlnet)  # then the UNet taking ControlNet residuals
    components = {name: control.load_controlled_unet(model) if controlled and name == "unet" else
                  load_component(model, name) for name in available if name != "vae-encoder"}
    if profile is not None:
        known = set().union(*(c.spec.symbols for c in components.values()))
        unknown = sorted(set(profile.dims) - known)
        if unknown:
            raise InvalidArgumentError("profile", unknown[0], sorted(known))

    def build_one(comp) -> Any:
        sub = _filter_profile(profile, comp.spec.symbols)
        quant = unet_quantization if comp.name in ("unet", "unet-controlled", "transformer") else "none"
        return build(comp, config=dataclasses.replace(config, profile=sub, quantization=quant), cache=cache,
                     progress=progress)

    engines = {name: build_one(comp) for name, comp in components.items()}
    from fastgen.engines.loading import load_engine

    engines.update(control.net_engines(model, controlnet, build_one, lambda p: load_engine(p, device=(
        None if device == "auto" else device))) if controlled else {})
    vae_encoder = None
    if "vae-encoder" in available:
        vae_encoder = lambda: build_one(load_component(model, "vae-encoder"))  # noqa: E731
    return engines, vae_encoder
