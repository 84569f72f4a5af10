"""Parity with diffusers' own pipelines on the same weights, tokenizers, schedulers and seeds (CPU, fp32).

The diffusers pipelines are built from the very ``Component.model`` objects of the preset, the
tokenizers the engines carry and the scheduler fastgen makes; both sides get one
``torch.Generator().manual_seed(seed + j)`` per image and return ``output_type="np"``.

Measured on a 2-core x86-64 CPU (torch 2.13.0, onnxruntime 1.31.1, diffusers 0.42.1), range over
the cases of each group (PSNR in dB over [0, 1] pixels; cosine over [-1, 1] pixels), 6 to 10 steps:

| case                                                  | torch backend                 | onnxruntime backend           |
|-------------------------------------------------------|-------------------------------|-------------------------------|
| SD txt2img, 2 prompts x 2, guidance 7.5 + negative,   | 133.2 to 136.2 dB,            | 128.7 to 134.0 dB,            |
|   pndm / euler / ddim / dpm++ / lcm / euler-ancestral | cosine >= 1 - 1e-12           | cosine >= 1 - 3e-12           |
| SD img2img, strength 0.6, euler / ddim                | 130.4 to 131.0 dB, 1 - 2e-12  | 128.3 to 129.1 dB, 1 - 3e-12  |
| SDXL txt2img, zeroed or given negative                | identical (inf dB, 1.0)       | 133.4 to 134.1 dB, 1 - 1e-12  |

(SD on the torch backend is not bit-identical because fastgen encodes the prompts and the negative
prompt in one text-encoder batch: the negative's embedding comes out one ulp from diffusers' own
batch of it.) The bounds below leave margin for other CPUs'
SIMD paths, as a last-bit difference in one UNet call grows over the steps: torch >= 100 dB,
onnxruntime >= 90 dB, cosine >= 0.99999 for both.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of images in [0, 1] (inf when identical)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of images in [0, 1] taken back to the decoder's [-1, 1] (so mid-grey is 0)."""
    a64, b64 = a.astype(np.float64).ravel() * 2 - 1, b.astype(np.float64).ravel() * 2 - 1
    denom = np.linalg.norm(a64) * np.linalg.norm(b64)
    return 1.0 if denom == 0 else float(a64 @ b64 / denom)

BOUNDS = {"torch": 100.0, "onnxruntime": 90.0}
MIN_COSINE = 0.99999
BACKENDS = ["torch", "onnxruntime"]
PROMPTS = ["a red sports car on a mountain road", "minimalist poster of a running shoe"]
NEGATIVE = "blurry, low quality"
SEEDS = [3, 11]
PER_PROMPT = 2
STEPS = 6


def _generators(seeds, per_prompt):
    return [torch.Generator().manual_seed(s + j) for s in seeds for j in range(per_prompt)]


def _check(ours: np.ndarray, ref: np.ndarray, backend: str, label: str) -> tuple[float, float]:
    assert ours.shape == ref.shape and ours.dtype == ref.dtype == np.float32
    # Not a degenerate picture: the comparison means something.
    assert ref.std() > 0.02, (label, ref.std())
    p, c = psnr(ours, ref), cosine(ours, ref)
    print(f"{label} [{backend}]: PSNR {p:.1f} dB, cosine {c:.12f}")
    assert p >= BOUNDS[backend], (label, backend, p)
    assert c >= MIN_COSINE, (label, backend, c)
    return p, c


def _sd_pipeline(models_for, gen, scheduler_name, cls_name="StableDiffusionPipeline"):
    import diffusers

    from fastgen.pipelines.sampling import make_scheduler

    m = models_for("tiny")
    cls = getattr(diffusers, cls_name)
    pipe = cls(vae=m["vae-decoder"], text_encoder=m["text-encoder"], tokenizer=gen.text_encoder.tokenizer,
               unet=m["unet"], scheduler=make_scheduler(scheduler_name, gen.scheduler_config),
               safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


_REFERENCES: dict = {}


def _reference(key, make):
    """diffusers' images depend on neither backend: computed once per case."""
    if key not in _REFERENCES:
        _REFERENCES[key] = make()
    return _REFERENCES[key]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scheduler", [None, "euler", "ddim", "dpm++", "lcm", "euler-ancestral"])
def test_sd_txt2img_matches_diffusers(generator_for, models_for, backend, scheduler):
    """2 prompts x 2 images, guidance 7.5 with a negative prompt. ``None``: the model's own (PNDM).

    LCM runs on the plain SD UNet (LCM's guidance embedding needs ``time_cond_proj_dim``, which the
    adapters refuse), with LCMScheduler swapped into StableDiffusionPipeline on the diffusers side.
    """
    gen = generator_for("tiny", backend)

    def make():
        pipe = _sd_pipeline(models_for, gen, scheduler)
        return pipe(PROMPTS, negative_prompt=[NEGATIVE] * len(PROMPTS), num_images_per_prompt=PER_PROMPT,
                    num_inference_steps=STEPS, guidance_scale=7.5, height=64, width=64,
                    generator=_generators(SEEDS, PER_PROMPT), output_type="np").images

    ref = _reference(("txt2img", scheduler), make)
    out = gen.generate(PROMPTS, seeds=SEEDS, steps=STEPS, guidance_scale=7.5, num_images_per_prompt=PER_PROMPT,
                       negative_prompt=NEGATIVE, scheduler=scheduler, output_type="np", height=64, width=64,
                       progress=False)
    _check(out.images, ref, backend, f"SD txt2img {scheduler or 'pndm (default)'}")
    assert out.seeds == [3, 4, 11, 12] and out.prompts == [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2


def _input_image():
    from PIL import Image

    rng = np.random.default_rng(0)
    # A smooth gradient with some texture: something a VAE encodes meaningfully.
    y, x = np.mgrid[0:64, 0:64]
    base = np.stack([x * 4, y * 4, (x + y) * 2], axis=-1).astype(np.float64)
    pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scheduler", ["euler", "ddim"])
def test_sd_img2img_matches_diffusers(generator_for, models_for, backend, scheduler):
    """Strength 0.6 on a 64x64 image, guidance with a negative prompt, 2 prompts x 2 images."""
    gen = generator_for("tiny", backend)
    image = _input_image()
    steps = 10

    def make():
        pipe = _sd_pipeline(models_for, gen, scheduler, "StableDiffusionImg2ImgPipeline")
        return pipe(PROMPTS, image=image, strength=0.6, negative_prompt=[NEGATIVE] * len(PROMPTS),
                    num_images_per_prompt=PER_PROMPT, num_inference_steps=steps, guidance_scale=7.5,
                    generator=_generators(SEEDS, PER_PROMPT), output_type="np").images

    ref = _reference(("img2img", scheduler), make)
    out = gen.generate(PROMPTS, image=image, strength=0.6, seeds=SEEDS, steps=steps, guidance_scale=7.5,
                       num_images_per_prompt=PER_PROMPT, negative_prompt=NEGATIVE, scheduler=scheduler,
                       output_type="np", progress=False)
    _check(out.images, ref, backend, f"SD img2img {scheduler}")
    # Strength 0.6 of 10 steps runs the last 6.
    assert len(out.latencies.denoising_step_ms) == 6 and out.latencies.vae_encode_ms > 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("negative", [None, NEGATIVE])
def test_sdxl_txt2img_matches_diffusers(generator_for, models_for, backend, negative):
    """SDXL conditioning: both encoders' penultimate states, the pooled projection, time ids; no
    negative prompt means zero negative embeddings (force_zeros_for_empty_prompt)."""
    import diffusers

    gen = generator_for("tiny-sdxl", backend)
    assert gen.pipeline == "sdxl" and gen.force_zeros_for_empty_prompt

    def make():
        from fastgen.pipelines.sampling import make_scheduler

        m = models_for("tiny-sdxl")
        pipe = diffusers.StableDiffusionXLPipeline(
            vae=m["vae-decoder"], text_encoder=m["text-encoder"], text_encoder_2=m["text-encoder-2"],
            tokenizer=gen.text_encoder.tokenizer, tokenizer_2=gen.text_encoder_2.tokenizer, unet=m["unet"],
            scheduler=make_scheduler(None, gen.scheduler_config), force_zeros_for_empty_prompt=True,
            add_watermarker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe(PROMPTS, negative_prompt=[negative] * len(PROMPTS) if negative else None,
                    num_images_per_prompt=PER_PROMPT, num_inference_steps=STEPS, guidance_scale=5.0,
                    height=64, width=64, generator=_generators(SEEDS, PER_PROMPT), output_type="np").images

    ref = _reference(("sdxl", negative), make)
    out = gen.generate(PROMPTS, seeds=SEEDS, steps=STEPS, guidance_scale=5.0, num_images_per_prompt=PER_PROMPT,
                       negative_prompt=negative, output_type="np", progress=False)
    _check(out.images, ref, backend, f"SDXL txt2img negative={negative!r}")
