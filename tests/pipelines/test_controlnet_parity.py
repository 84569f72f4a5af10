"""ControlNet parity with diffusers' own ControlNet pipelines on the same weights, tokenizers, schedulers
and seeds (CPU, fp32), built from the presets' modules as test_inpaint_parity.py builds them.

The ControlNets are the ``tiny-controlnet`` / ``tiny-sdxl-controlnet`` presets' (random residual
projections, so the residuals are not zero) and, for multi-ControlNet, a second one from seed 1.
Condition images are 72x80 (odd for the UNet: both sides resize them with Lanczos to 64x64).

Measured on a 2-core x86-64 CPU (torch 2.13.0, onnxruntime 1.31.1, diffusers 0.42.1), PSNR in dB
over [0, 1] pixels, 2 prompts x 2 images, guidance 7.5 (SDXL 5) with a negative prompt:

| case                                                              | torch  | onnxruntime |
|-------------------------------------------------------------------|--------|-------------|
| single net, scale 0.7, window 0.1-0.8, 8 steps, one image per prompt | 136.4 | 133.9      |
| multi-ControlNet, scales 0.6 / 1.1, windows 0-1 / 0.25-0.75       | 136.2  | 133.3       |
| guess mode, scale 0.9, guided / unguided (guidance 1)             | 134.5 / inf | 133.1 / 135.0 |
| SDXL, scale 0.8, window 0-0.9                                     | 135.5  | 134.7       |
| size from a 96x80 condition image (no height/width), one image    | inf    | 133.6       |
| image-to-image (ControlNetImg2Img), strength 0.6, window 0-0.5    | 131.1  | 129.2       |

Cosine >= 1 - 2e-12 everywhere. Without condition images the same generators are below 50 dB from
each reference (asserted), so the nets' contribution is what is compared.
The floors are test_generator_parity's: torch >= 100 dB, onnxruntime >= 90 dB, cosine >= 0.99999.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

BOUNDS = {"torch": 100.0, "onnxruntime": 90.0}
MIN_COSINE = 0.99999
BACKENDS = ["torch", "onnxruntime"]
PROMPTS = ["a red sports car on a mountain road", "minimalist poster of a running shoe"]
NEGATIVE = "blurry, low quality"
SEEDS = [3, 11]
PER_PROMPT = 2


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = a.astype(np.float64).ravel() * 2 - 1, b.astype(np.float64).ravel() * 2 - 1
    denom = np.linalg.norm(a64) * np.linalg.norm(b64)
    return 1.0 if denom == 0 else float(a64 @ b64 / denom)


def _check(ours: np.ndarray, ref: np.ndarray, backend: str, label: str) -> None:
    assert ours.shape == ref.shape and ours.dtype == ref.dtype == np.float32
    assert ref.std() > 0.02, (label, ref.std())
    p, c = psnr(ours, ref), cosine(ours, ref)
    print(f"{label} [{backend}]: PSNR {p:.1f} dB, cosine {c:.12f}")
    assert p >= BOUNDS[backend], (label, backend, p)
    assert c >= MIN_COSINE, (label, backend, c)


def _generators(seeds, per_prompt):
    return [torch.Generator().manual_seed(s + j) for s in seeds for j in range(per_prompt)]


def control_image(kind: int = 0, width: int = 72, height: int = 80):
    """A condition image of an odd size: shapes (kind 0), or a smooth depth-like gradient (kind 1)."""
    from PIL import Image, ImageDraw

    if kind == 1:
        y, x = np.mgrid[0:height, 0:width]
        depth = (255 * (x + 2 * y) / (width + 2 * height)).astype(np.uint8)
        return Image.fromarray(depth, "L")
    img = Image.new("RGB", (width, height), (0, 0, 0))
    draw = ImageDraw.Draw(img)
    draw.rectangle((10, 12, 40, 50), outline=(255, 255, 255), width=2)
    draw.ellipse((30, 30, 66, 74), outline=(255, 255, 255), width=2)
    return img


_REFERENCES: dict = {}
_MULTI: dict = {}


def _reference(key, make):
    if key not in _REFERENCES:
        _REFERENCES[key] = make()
    return _REFERENCES[key]


def _net_module(preset: str, seed: int):
    from fastgen.models import load_component

    return load_component(preset, "controlnet", seed=seed).model


def _pipe(models_for, gen, preset, sdxl, nets):
    import diffusers

    from fastgen.pipelines.sampling import make_scheduler

    m = models_for(preset)
    common = dict(vae=m["vae-decoder"], text_encoder=m["text-encoder"], tokenizer=gen.text_encoder.tokenizer,
                  unet=m["unet"], controlnet=nets if len(nets) > 1 else nets[0],
                  scheduler=make_scheduler(None, gen.scheduler_config))
    if sdxl:
        pipe = diffusers.StableDiffusionXLControlNetPipeline(
            text_encoder_2=m["text-encoder-2"], tokenizer_2=gen.text_encoder_2.tokenizer,
            force_zeros_for_empty_prompt=True, add_watermarker=False, **common)
    else:
        pipe = diffusers.StableDiffusionControlNetPipeline(safety_checker=None, feature_extractor=None,
                                                           requires_safety_checker=False, **common)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _multi_generator(generator_for, backend):
    """tiny-controlnet's engines with a second ControlNet (seed 1) built on the same backend."""
    if backend not in _MULTI:
        from fastgen.engines.build import build
        from fastgen.engines.config import BuildConfig
        from fastgen.export.config import ExportConfig
        from fastgen.models import load_component
        from fastgen.pipelines.generator import Generator

        base = generator_for("tiny-controlnet", backend)
        second = build(load_component("tiny-controlnet", "controlnet", seed=1),
                       config=BuildConfig(export=ExportConfig(verify="opt")), backend=backend, device="cpu")
        _MULTI[backend] = Generator(unet=base.unet, vae_decoder=base.vae_decoder, text_encoder=base.text_encoder,
                                    controlnet=[base.controlnets[0], second])
    return _MULTI[backend]


CASES = {
    # name: (preset, sdxl, nets, per-prompt images, options, steps, guidance)
    "single": ("tiny-controlnet", False, 1, True,
               dict(controlnet_conditioning_scale=0.7, control_guidance_start=0.1, control_guidance_end=0.8), 8, 7.5),
    "multi": ("tiny-controlnet", False, 2, False,
              dict(controlnet_conditioning_scale=[0.6, 1.1], control_guidance_start=[0.0, 0.25],
                   control_guidance_end=[1.0, 0.75]), 8, 7.5),
    "guess": ("tiny-controlnet", False, 1, False, dict(controlnet_conditioning_scale=0.9, guess_mode=True), 5, 7.5),
    "guess-unguided": ("tiny-controlnet", False, 1, False, dict(guess_mode=True), 4, 1.0),
    "sdxl": ("tiny-sdxl-controlnet", True, 1, False,
             dict(controlnet_conditioning_scale=0.8, control_guidance_end=0.9), 6, 5.0),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_controlnet_matches_diffusers(generator_for, models_for, backend, case):
    preset, sdxl, num_nets, per_prompt_images, options, steps, guidance = CASES[case]
    gen = _multi_generator(generator_for, backend) if num_nets == 2 else generator_for(preset, backend)
    assert gen.unet.spec.component == "unet-controlled" and len(gen.controlnets) == num_nets
    if num_nets == 2:
        image = [control_image(0), control_image(1)]  # one per net, for every prompt
    elif per_prompt_images:
        image = [control_image(0), control_image(1)]  # one per prompt
    else:
        image = control_image(0)

    def make():
        nets = [_net_module(preset, seed) for seed in range(num_nets)]
        pipe = _pipe(models_for, gen, preset, sdxl, nets)
        return pipe(PROMPTS, image=image, negative_prompt=[NEGATIVE] * len(PROMPTS), num_images_per_prompt=PER_PROMPT,
                    num_inference_steps=steps, guidance_scale=guidance, height=64, width=64,
                    generator=_generators(SEEDS, PER_PROMPT), output_type="np", **options).images

    ref = _reference(case, make)
    ours_options = {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}
    out = gen.generate(PROMPTS, control_image=image, seeds=SEEDS, steps=steps, guidance_scale=guidance,
                       num_images_per_prompt=PER_PROMPT, negative_prompt=NEGATIVE, output_type="np", height=64,
                       width=64, progress=False, **ours_options)
    _check(out.images, ref, backend, f"controlnet {case}")
    assert out.seeds == [3, 4, 11, 12] and out.extras["mode"] == "txt2img"
    # The nets matter: without condition images the same generator (zero residuals) is far off.
    plain = gen.generate(PROMPTS, seeds=SEEDS, steps=steps, guidance_scale=guidance, num_images_per_prompt=PER_PROMPT,
                         negative_prompt=NEGATIVE, output_type="np", height=64, width=64, progress=False)
    assert psnr(plain.images, ref) < 50, (case, psnr(plain.images, ref))


@pytest.mark.parametrize("backend", BACKENDS)
def test_controlnet_takes_the_control_image_size(generator_for, models_for, backend):
    """No height/width: the condition image's size (96x80, what the UNet takes), as diffusers."""
    gen = generator_for("tiny-controlnet", backend)
    image = control_image(0, width=96, height=80)

    def make():
        pipe = _pipe(models_for, gen, "tiny-controlnet", False, [_net_module("tiny-controlnet", 0)])
        return pipe(PROMPTS[0], image=image, num_inference_steps=4, guidance_scale=7.5,
                    generator=_generators([5], 1), output_type="np", controlnet_conditioning_scale=1.2).images

    ref = _reference(("size", 96, 80), make)
    out = gen.generate(PROMPTS[0], control_image=image, seeds=[5], steps=4, guidance_scale=7.5, output_type="np",
                       controlnet_conditioning_scale=1.2, progress=False)
    assert out.images.shape == ref.shape == (1, 80, 96, 3)
    _check(out.images, ref, backend, "controlnet size from the condition image")


@pytest.mark.parametrize("backend", BACKENDS)
def test_controlnet_img2img_matches_diffusers(generator_for, models_for, backend):
    """Image-to-image with a ControlNet (StableDiffusionControlNetImg2ImgPipeline): strength 0.6 of 10
    steps, window 0-0.5 of the steps run, a 64x64 input image and a 72x80 condition image."""
    import diffusers
    from PIL import Image

    from fastgen.pipelines.sampling import make_scheduler

    gen = generator_for("tiny-controlnet", backend)
    y, x = np.mgrid[0:64, 0:64]
    init = Image.fromarray(np.stack([x * 4, y * 4, (x + y) * 2], axis=-1).astype(np.uint8), "RGB")
    options = dict(controlnet_conditioning_scale=0.8, control_guidance_end=0.5)

    def make():
        m = models_for("tiny-controlnet")
        pipe = diffusers.StableDiffusionControlNetImg2ImgPipeline(
            vae=m["vae-decoder"], text_encoder=m["text-encoder"], tokenizer=gen.text_encoder.tokenizer, unet=m["unet"],
            controlnet=_net_module("tiny-controlnet", 0), scheduler=make_scheduler(None, gen.scheduler_config),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe(PROMPTS, image=[init] * len(PROMPTS) * PER_PROMPT, control_image=control_image(0), strength=0.6,
                    negative_prompt=[NEGATIVE] * len(PROMPTS), num_images_per_prompt=PER_PROMPT, num_inference_steps=10,
                    guidance_scale=7.5, height=64, width=64, generator=_generators(SEEDS, PER_PROMPT),
                    output_type="np", **options).images

    ref = _reference("img2img", make)
    out = gen.generate(PROMPTS, image=init, control_image=control_image(0), strength=0.6, seeds=SEEDS, steps=10,
                       guidance_scale=7.5, num_images_per_prompt=PER_PROMPT, negative_prompt=NEGATIVE, height=64,
                       width=64, output_type="np", progress=False, **options)
    _check(out.images, ref, backend, "controlnet img2img")
    from fastgen.pipelines.sampling import img2img_timesteps, set_timesteps

    scheduler = make_scheduler(None, gen.scheduler_config)
    set_timesteps(scheduler, 10)  # PNDM's tail of strength 0.6 has 7 timesteps
    assert out.extras["mode"] == "img2img"
    assert len(out.latencies.denoising_step_ms) == len(img2img_timesteps(scheduler, 10, 0.6)) == 7
