"""fastgen.Runtime: inpainting requests equal Generator.generate alone, share UNet calls with text-to-image
and image-to-image requests on a regular UNet, batch among themselves on an inpainting UNet, and fail
alone on bad input."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from fastgen.errors import InvalidArgumentError
from fastgen.pipelines.config import GenerateConfig
from fastgen.runtime import GenerateRequest, Runtime

pytestmark = pytest.mark.usefixtures("no_leaked_threads")
TIMEOUT = 120


def picture(seed: int, h: int = 64, w: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def mask(h: int = 64, w: int = 64, box=(10, 12, 40, 50)) -> Image.Image:
    m = Image.new("L", (w, h), 0)
    ImageDraw.Draw(m).rectangle(box, fill=255)
    return m


@pytest.fixture(scope="module")
def inpaint_generator():
    from fastgen.engines.config import BuildConfig
    from fastgen.export.config import ExportConfig
    from fastgen.pipelines.generator import Generator

    return Generator.from_pretrained("tiny-inpaint", backend="torch", device="cpu",
                                     build_config=BuildConfig(export=ExportConfig(verify="opt")))


def _run(gen, cases):
    rt = Runtime(gen, start=False, max_step_rows=16)
    futures = [rt.submit(GenerateRequest(p, GenerateConfig(output_type="np", **cfg), image=image, mask_image=m))
               for p, image, m, cfg in cases]
    rt.start()
    results = [f.result(TIMEOUT) for f in futures]
    stats = rt.stats()
    rt.shutdown()
    for (prompt, image, m, cfg), result in zip(cases, results):
        alone = gen.generate(prompt, image=image, mask_image=m, output_type="np", progress=False, **cfg)
        np.testing.assert_allclose(result.images, alone.images, atol=1e-4, rtol=0)
        assert result.seeds == alone.seeds and result.extras["mode"] == alone.extras["mode"]
        assert len(result.latencies.denoising_step_ms) == len(alone.latencies.denoising_step_ms)
    return results, stats


def test_regular_unet_shares_steps_with_txt2img_and_img2img(tiny_generator):
    """A 4-channel UNet: inpainting (latent blending), text-to-image and image-to-image requests of one
    size run in the same UNet calls, each giving what it gives alone."""
    gen = tiny_generator()
    cases = [
        ("a cat", picture(1), mask(), dict(steps=5, seed=7, strength=1.0, scheduler="euler")),
        ("a dog", None, None, dict(steps=4, seed=8)),
        ("a bird", picture(2), None, dict(steps=5, seed=9, strength=0.6)),
        ("", picture(3), mask(box=(0, 0, 20, 63)), dict(steps=6, seed=10, strength=0.5, scheduler="ddim",
                                                        num_images_per_prompt=2, mask_blur=2)),
    ]
    results, stats = _run(gen, cases)
    assert [r.extras["mode"] for r in results] == ["inpaint", "txt2img", "img2img", "inpaint"]
    assert stats["steps"]["64x64"]["rows"]["p99"] > 4  # more than one request's rows in a call


def test_inpainting_unet_batches_inpaint_requests_and_refuses_others(inpaint_generator):
    gen = inpaint_generator
    big = picture(4, 80, 96)
    cases = [
        ("a cat", picture(1), mask(), dict(steps=4, seed=7, strength=1.0)),
        ("a dog", picture(2), mask(box=(30, 0, 63, 63)), dict(steps=5, seed=8, strength=0.7, guidance_scale=1.0)),
        # padding_mask_crop: generated at 64x64, pasted back into the 96x80 input
        ("a shoe", big, mask(80, 96, box=(50, 20, 70, 40)), dict(steps=4, seed=9, strength=1.0, height=64, width=64,
                                                                 padding_mask_crop=4, mask_blur=1)),
    ]
    results, stats = _run(gen, cases)
    assert results[2].images.shape == (1, 80, 96, 3)
    assert stats["steps"]["64x64"]["rows"]["p99"] > 2
    rt = Runtime(gen, start=False)
    try:
        for request, needle in [
            (GenerateRequest("x", GenerateConfig(steps=2)), "inpainting UNet"),
            (GenerateRequest("x", GenerateConfig(steps=2), image=picture(1)), "inpainting UNet"),
            (GenerateRequest("x", GenerateConfig(steps=2), mask_image=mask()), "needs the input image"),
            (GenerateRequest("x", GenerateConfig(steps=2), image=picture(1), mask_image=mask(32, 32)),
             "input image's size"),
            (GenerateRequest("x", GenerateConfig(steps=2), image=picture(1), mask_image=np.zeros((4, 4), np.float32)),
             "mask_image"),
        ]:
            with pytest.raises(InvalidArgumentError, match=needle) as info:
                rt.submit(request)
            assert "\n" not in str(info.value)
    finally:
        rt.shutdown()
