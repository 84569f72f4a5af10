"""Generator.generate(image=, mask_image=) and Generator.inpaint: per-image seeds, strength, what a
black mask keeps, per-prompt masks, and one-line errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastgen.errors import InvalidArgumentError

FAST = {"steps": 4, "progress": False, "height": 64, "width": 64}


def _image(width=72, height=80):
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width]
    return Image.fromarray(np.stack([x * 3, y * 3, (x + y) * 2], -1).astype(np.uint8), "RGB")


def _mask(width=72, height=80, box=(20, 16, 52, 50), fill=255):
    from PIL import Image, ImageDraw

    mask = Image.new("L", (width, height), 0)
    ImageDraw.Draw(mask).rectangle(box, fill=fill)
    return mask


@pytest.mark.parametrize("preset", ["tiny", "tiny-inpaint"])
def test_each_image_depends_on_its_own_seed(generator_for, preset):
    gen = generator_for(preset, "torch")
    both = gen.generate(["a cat", "a dog"], image=_image(), mask_image=_mask(), seeds=[4, 9], strength=0.7,
                        num_images_per_prompt=2, output_type="latent", **FAST)
    alone = gen.generate("a dog", image=_image(), mask_image=_mask(), seed=10, strength=0.7, output_type="latent",
                         **FAST)
    torch.testing.assert_close(both.images[3:4], alone.images, atol=2e-4, rtol=0)
    assert both.seeds == [4, 5, 9, 10] and both.extras["mode"] == "inpaint"


def test_black_mask_keeps_the_image_latents(generator_for, models_for):
    """Regular UNet: where the mask is black, the final latents are the input image's posterior
    sample (the first draw of the image's own generator)."""
    from fastgen.pipelines import vae_images

    gen = generator_for("tiny", "torch")
    image = _image(64, 64)
    out = gen.generate("x", image=image, mask_image=_mask(64, 64, (0, 0, 0, 0), fill=0), seed=7, strength=1.0,
                       output_type="latent", **FAST)
    vae = models_for("tiny")["vae-decoder"]
    with torch.no_grad():
        dist = vae.encode(vae_images.to_pixels([image], 64, 64)).latent_dist
    expected = dist.sample(torch.Generator().manual_seed(7)) * gen.scaling_factor
    torch.testing.assert_close(out.images, expected, atol=1e-5, rtol=0)


def test_inpaint_method_defaults_to_strength_one(generator_for):
    gen = generator_for("tiny-inpaint", "torch")
    full = gen.inpaint("x", _image(), _mask(), seed=1, **FAST)
    assert full.config.strength == 1.0 and len(full.latencies.denoising_step_ms) == 5  # PNDM: one more
    part = gen.inpaint("x", _image(), _mask(), seed=1, strength=0.5, **FAST)
    assert len(part.latencies.denoising_step_ms) == 3  # the last 2 of 4, and PNDM's extra one
    from fastgen.pipelines.config import GenerateConfig

    kept = gen.inpaint("x", _image(), _mask(), config=GenerateConfig(strength=0.5, seed=1, **{
        k: v for k, v in FAST.items() if k != "progress"}), progress=False)
    np.testing.assert_array_equal(np.asarray(kept.images[0]), np.asarray(part.images[0]))
    assert len(gen.inpaint("x", _image(), _mask(), seed=1, strength=0.0, **FAST).latencies.denoising_step_ms) == 0


def test_one_mask_per_prompt(generator_for):
    gen = generator_for("tiny-inpaint", "torch")
    masks = [_mask(), _mask(box=(0, 0, 30, 30))]
    both = gen.inpaint(["a", "a"], _image(), masks, seeds=[3, 3], output_type="latent", **FAST)
    second = gen.inpaint("a", _image(), masks[1], seed=3, output_type="latent", **FAST)
    torch.testing.assert_close(both.images[1:], second.images, atol=2e-4, rtol=0)
    assert not torch.allclose(both.images[0], both.images[1])  # the mask matters
    with pytest.raises(InvalidArgumentError, match="mask_image.*3 masks"):
        gen.inpaint(["a", "b"], _image(), masks + masks[:1], **FAST)


def test_default_size_is_the_image_rounded_down(generator_for):
    gen = generator_for("tiny-inpaint", "torch")
    out = gen.inpaint("x", _image(72, 80), _mask(72, 80), seed=1, steps=2, progress=False)
    assert out.images[0].size == (64, 80)


def test_errors_are_one_line(generator_for):
    inpainting, regular = generator_for("tiny-inpaint", "torch"), generator_for("tiny", "torch")
    cases = [
        (lambda: inpainting.generate("x", **FAST), "mask_image.*inpainting UNet \\(9 input channels\\)"),
        (lambda: inpainting.generate("x", image=_image(), **FAST), "mask_image.*inpainting UNet"),
        (lambda: regular.generate("x", mask_image=_mask(), **FAST), "mask_image.*needs the input image"),
        (lambda: regular.generate("x", padding_mask_crop=4, **FAST), "padding-mask-crop.*only for inpainting"),
        (lambda: regular.generate("x", image=_image(), mask_blur=2, **FAST), "mask-blur.*only for inpainting"),
        (lambda: regular.inpaint("x", _image(), _mask(10, 10), **FAST), "mask_image.*input image's size"),
        (lambda: regular.inpaint("x", _image(), "/no/such/mask.png", **FAST), "mask_image"),
    ]
    for call, needle in cases:
        with pytest.raises(InvalidArgumentError, match=needle) as info:
            call()
        assert "\n" not in str(info.value)
