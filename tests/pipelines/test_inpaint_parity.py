"""Inpainting parity with diffusers' own inpaint pipelines on the same weights, tokenizers, schedulers
and seeds (CPU, fp32), built from the presets' modules as test_generator_parity.py builds them.

diffusers gets one copy of the input image and mask per generated image (a list), so that its
generator ``i`` draws image ``i``'s posterior samples, as fastgen's per-image seeds do; with
``padding_mask_crop`` (which takes one PIL image) the cases run one image.

Measured on a 2-core x86-64 CPU (torch 2.13.0, onnxruntime 1.31.1, diffusers 0.42.1), PSNR in dB
over [0, 1] pixels (cosine >= 1 - 2e-11 everywhere), 4 steps at strength 1, 8 at 0.6, 2 prompts x 2
images, guidance with a negative prompt, a 72x80 input resized to 64x64:

| case                                                   | torch    | onnxruntime |
|--------------------------------------------------------|----------|-------------|
| SD, 9-channel UNet (tiny-inpaint), strength 1 / 0.6    | 132.3 / 126.6 | 131.5 / 126.4 |
| SD, regular UNet (tiny, blending), strength 1          | 129.0    | 129.1       |
| SD, regular UNet, strength 0.6, mask blur 3            | 122.9    | 121.9       |
| SDXL, 9-channel UNet (tiny-sdxl-inpaint), 1 / 0.6+blur | 132.6 / 129.2 | 131.7 / 127.3 |
| padding_mask_crop 6 (96x80 input), decoded latents     | 128.8 to 130.5 | 128.7 to 130.6 |

The floors are test_generator_parity's: torch >= 100 dB, onnxruntime >= 90 dB, cosine >= 0.99999.
padding_mask_crop's output is a PIL image pasted into the input image (as diffusers' own): there,
the latents decoded by the same VAE meet the floors, and the pasted images differ by at most one
8-bit level (rounding of the last float bits).
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


def input_image(width: int = 72, height: int = 80):
    """A smooth gradient with texture, of an odd size (the pipelines resize it)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 3, y * 3, (x + y) * 2], axis=-1).astype(np.float64)
    return Image.fromarray(np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8), "RGB")


def input_mask(width: int = 72, height: int = 80, box=(20, 16, 52, 50), disc: bool = True):
    """White (regenerate) inside ``box`` (and a lighter disc), black elsewhere, a grey line near 0.5."""
    from PIL import Image, ImageDraw

    mask = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(mask)
    draw.rectangle(box, fill=255)
    if disc:
        draw.ellipse((4, 56, 20, 72), fill=200)
    draw.line((box[0] - 2, box[1], box[0] - 2, box[3]), fill=110)  # near the 0.5 threshold
    return mask


_REFERENCES: dict = {}


def _reference(key, make):
    if key not in _REFERENCES:
        _REFERENCES[key] = make()
    return _REFERENCES[key]


def _sd_pipe(models_for, gen, preset):
    import diffusers

    from fastgen.pipelines.sampling import make_scheduler

    m = models_for(preset)
    pipe = diffusers.StableDiffusionInpaintPipeline(
        vae=m["vae-decoder"], text_encoder=m["text-encoder"], tokenizer=gen.text_encoder.tokenizer, unet=m["unet"],
        scheduler=make_scheduler(None, gen.scheduler_config), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sdxl_pipe(models_for, gen, preset):
    import diffusers

    from fastgen.pipelines.sampling import make_scheduler

    m = models_for(preset)
    pipe = diffusers.StableDiffusionXLInpaintPipeline(
        vae=m["vae-decoder"], text_encoder=m["text-encoder"], text_encoder_2=m["text-encoder-2"],
        tokenizer=gen.text_encoder.tokenizer, tokenizer_2=gen.text_encoder_2.tokenizer, unet=m["unet"],
        scheduler=make_scheduler(None, gen.scheduler_config), force_zeros_for_empty_prompt=True,
        add_watermarker=False, requires_aesthetics_score=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


CASES = {
    # name: (preset, sdxl, strength, mask blur, steps, guidance)
    "sd-9ch-full": ("tiny-inpaint", False, 1.0, 0, 4, 7.5),
    "sd-9ch-0.6": ("tiny-inpaint", False, 0.6, 0, 8, 7.5),
    "sd-4ch-full": ("tiny", False, 1.0, 0, 4, 7.5),
    "sd-4ch-0.6-blur": ("tiny", False, 0.6, 3, 8, 7.5),
    "sdxl-9ch-full": ("tiny-sdxl-inpaint", True, 1.0, 0, 4, 5.0),
    "sdxl-9ch-0.6": ("tiny-sdxl-inpaint", True, 0.6, 2, 8, 5.0),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_inpaint_matches_diffusers(generator_for, models_for, backend, case):
    preset, sdxl, strength, blur, steps, guidance = CASES[case]
    gen = generator_for(preset, backend)
    image, mask = input_image(), input_mask()
    rows = len(PROMPTS) * PER_PROMPT

    def make():
        pipe = (_sdxl_pipe if sdxl else _sd_pipe)(models_for, gen, preset)
        ref_mask = pipe.mask_processor.blur(mask, blur_factor=blur) if blur else mask
        return pipe(PROMPTS, image=[image] * rows, mask_image=[ref_mask] * rows, strength=strength,
                    negative_prompt=[NEGATIVE] * len(PROMPTS), num_images_per_prompt=PER_PROMPT,
                    num_inference_steps=steps, guidance_scale=guidance, height=64, width=64,
                    generator=_generators(SEEDS, PER_PROMPT), output_type="np").images

    ref = _reference(case, make)
    out = gen.generate(PROMPTS, image=image, mask_image=mask, strength=strength, mask_blur=blur, seeds=SEEDS,
                       steps=steps, guidance_scale=guidance, num_images_per_prompt=PER_PROMPT,
                       negative_prompt=NEGATIVE, output_type="np", height=64, width=64, progress=False)
    _check(out.images, ref, backend, f"inpaint {case}")
    assert out.extras["mode"] == "inpaint" and out.seeds == [3, 4, 11, 12]
    # The tail of the schedule that strength keeps (PNDM's schedule has one timestep more).
    from fastgen.pipelines.sampling import img2img_timesteps, make_scheduler, set_timesteps

    scheduler = make_scheduler(None, gen.scheduler_config)
    set_timesteps(scheduler, steps)
    assert len(out.latencies.denoising_step_ms) == len(img2img_timesteps(scheduler, steps, strength))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("preset", "blur"), [("tiny-inpaint", 2), ("tiny", 0)])
def test_padding_mask_crop_matches_diffusers(generator_for, models_for, backend, preset, blur):
    """Crop to the mask's box (padding 6, grown to the output's square), generate 64x64, paste back
    into the 96x80 input through the (blurred) mask; strength 0.8, one image."""
    gen = generator_for(preset, backend)
    image, mask = input_image(96, 80), input_mask(96, 80, box=(58, 10, 80, 30), disc=False)
    kwargs = dict(strength=0.8, num_inference_steps=5, guidance_scale=7.5, height=64, width=64)
    captured: dict = {}

    def make():
        pipe = _sd_pipe(models_for, gen, preset)
        ref_mask = pipe.mask_processor.blur(mask, blur_factor=blur) if blur else mask

        def keep_latents(pipe_, step, t, tensors):  # the final latents, before the paste-back
            captured["latents"] = tensors["latents"]
            return {}

        pil = pipe(PROMPTS[0], image=image, mask_image=ref_mask, padding_mask_crop=6, negative_prompt=NEGATIVE,
                   generator=[torch.Generator().manual_seed(5)], output_type="pil", callback_on_step_end=keep_latents,
                   **kwargs).images[0]
        return pil, captured["latents"], ref_mask

    ref_pil, ref_latents, ref_mask = _reference(("crop", preset), make)
    common = dict(image=image, mask_image=mask, padding_mask_crop=6, mask_blur=blur, seeds=[5], steps=5,
                  strength=0.8, guidance_scale=7.5, height=64, width=64, negative_prompt=NEGATIVE, progress=False)
    latents = gen.generate(PROMPTS[0], output_type="latent", **common).images
    vae = models_for(preset)["vae-decoder"]

    def decode(z):
        with torch.no_grad():
            return (vae.decode(z / gen.scaling_factor).sample * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()

    _check(decode(latents), decode(ref_latents), backend, f"padding_mask_crop {preset} (decoded latents)")
    out = gen.generate(PROMPTS[0], output_type="pil", **common).images[0]
    assert out.size == image.size == ref_pil.size
    ours, theirs = np.asarray(out, dtype=np.int16), np.asarray(ref_pil, dtype=np.int16)
    assert np.abs(ours - theirs).max() <= 1 and (ours != theirs).mean() < 0.01
    # Outside the crop box and the mask, the input image itself.
    from fastgen.pipelines.inpaint import crop_region

    x1, y1, x2, y2 = crop_region(ref_mask, 64, 64, 6)
    kept = np.asarray(image)[:, :x1]
    assert x1 > 0 and np.array_equal(np.asarray(out)[:, :x1], kept)
    uint8 = gen.generate(PROMPTS[0], output_type="uint8", **common).images
    assert uint8.shape == (1, 80, 96, 3) and np.array_equal(uint8[0], np.asarray(out))
