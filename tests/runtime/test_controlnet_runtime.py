"""fastgen.Runtime: ControlNet requests equal Generator.generate alone while sharing UNet calls with each
other (different images, scales, windows, guess mode, image-to-image) and with plain requests, which
get zero residuals (the plain UNet's result); bad input fails at submission in one line."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from fastgen.errors import InvalidArgumentError
from fastgen.pipelines.config import GenerateConfig
from fastgen.runtime import GenerateRequest, Runtime

pytestmark = pytest.mark.usefixtures("no_leaked_threads")
TIMEOUT = 120


def _fast_build():
    from fastgen.engines.config import BuildConfig
    from fastgen.export.config import ExportConfig

    return BuildConfig(export=ExportConfig(verify="opt"))


def edges(seed: int, w: int = 72, h: int = 80) -> Image.Image:
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (w, h), (0, 0, 0))
    draw = ImageDraw.Draw(img)
    for _ in range(4):
        x, y = (int(v) for v in rng.integers(0, min(w, h) - 20, 2))
        draw.rectangle((x, y, x + 18, y + 18), outline=(255, 255, 255), width=2)
    return img


def picture(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def controlnet_generator():
    from fastgen.pipelines.generator import Generator

    return Generator.from_pretrained("tiny-controlnet", backend="torch", device="cpu", build_config=_fast_build())


def _run(gen, cases):
    """Submit every case before the runtime starts (so they share steps), then compare each with a solo run."""
    rt = Runtime(gen, start=False, max_step_rows=32)
    futures = [rt.submit(GenerateRequest(p, GenerateConfig(output_type="np", **cfg), image=image,
                                         control_image=control)) for p, image, control, cfg in cases]
    rt.start()
    results = [f.result(TIMEOUT) for f in futures]
    stats = rt.stats()
    rt.shutdown()
    for (prompt, image, control, cfg), result in zip(cases, results):
        alone = gen.generate(prompt, image=image, control_image=control, output_type="np", progress=False, **cfg)
        np.testing.assert_allclose(result.images, alone.images, atol=1e-4, rtol=0)
        assert result.seeds == alone.seeds and result.extras["mode"] == alone.extras["mode"]
    return results, stats


def test_controlnet_requests_batch_with_each_other_and_plain_ones(controlnet_generator, tiny_generator):
    gen = controlnet_generator
    size = dict(height=64, width=64)
    cases = [
        ("a cat", None, edges(1), dict(steps=6, seed=7, controlnet_conditioning_scale=0.7,
                                       control_guidance_start=0.1, control_guidance_end=0.8, **size)),
        ("a dog", None, edges(2), dict(steps=5, seed=8, controlnet_conditioning_scale=1.3, guess_mode=True, **size)),
        ("a bird", None, None, dict(steps=4, seed=9, **size)),  # plain: zero residuals
        ("a shoe", picture(3), edges(3), dict(steps=6, seed=10, strength=0.6, guidance_scale=1.0,
                                              num_images_per_prompt=2, **size)),
        ("", None, edges(4), dict(steps=5, seed=11, scheduler="ddim", controlnet_conditioning_scale=0.0, **size)),
    ]
    results, stats = _run(gen, cases)
    assert [r.extras["mode"] for r in results] == ["txt2img", "txt2img", "txt2img", "img2img", "txt2img"]
    assert stats["steps"]["64x64"]["rows"]["p99"] > 4  # more than one request's rows in a call
    # Zero residuals give the plain UNet's images: the same weights as the tiny preset's plain unet.
    plain = tiny_generator().generate("a bird", steps=4, seed=9, output_type="np", progress=False, **size)
    np.testing.assert_allclose(results[2].images, plain.images, atol=1e-5, rtol=0)
    # Scale 0 turns the net off: the plain result too, and a scaled request differs from it.
    plain0 = tiny_generator().generate("", steps=5, seed=11, scheduler="ddim", output_type="np", progress=False, **size)
    np.testing.assert_allclose(results[4].images, plain0.images, atol=1e-5, rtol=0)
    assert np.abs(results[0].images - gen.generate("a cat", steps=6, seed=7, output_type="np", progress=False,
                                                   **size).images).max() > 0.01


def test_size_from_the_control_image(controlnet_generator):
    """No height/width: each request takes its condition image's size (its own bucket)."""
    cases = [("a cat", None, edges(1, 96, 80), dict(steps=3, seed=1)),
             ("a dog", None, edges(2, 64, 48), dict(steps=3, seed=2))]
    results, stats = _run(controlnet_generator, cases)
    assert [r.images.shape for r in results] == [(1, 80, 96, 3), (1, 48, 64, 3)]
    assert {"80x96", "48x64"} <= set(stats["steps"])


def test_two_nets_with_different_scales_share_steps(controlnet_generator):
    from fastgen.engines.build import build
    from fastgen.models import load_component
    from fastgen.pipelines.generator import Generator

    base = controlnet_generator
    second = build(load_component("tiny-controlnet", "controlnet", seed=1), config=_fast_build(), backend="torch",
                   device="cpu")
    gen = Generator(unet=base.unet, vae_decoder=base.vae_decoder, text_encoder=base.text_encoder,
                    controlnet=[base.controlnets[0], second])
    size = dict(height=64, width=64)
    cases = [
        ("a cat", None, [edges(1), edges(2)], dict(steps=4, seed=1, controlnet_conditioning_scale=(0.5, 1.2), **size)),
        ("a dog", None, [edges(3), edges(4)], dict(steps=5, seed=2, control_guidance_start=(0.0, 0.4),
                                                   control_guidance_end=(0.6, 1.0), **size)),
        ("a bird", None, None, dict(steps=4, seed=3, **size)),
    ]
    _, stats = _run(gen, cases)
    assert stats["steps"]["64x64"]["rows"]["p99"] > 4


@pytest.mark.parametrize(("control", "needle"), [
    ("/nonexistent/edges.png", "control-image"),
    ([edges(1), edges(2)], "1 image or one per prompt"),
    (np.zeros((8, 8, 4), dtype=np.uint8), "control-image"),
])
def test_bad_control_images_fail_at_submission(controlnet_generator, control, needle):
    rt = Runtime(controlnet_generator, start=False)
    try:
        with pytest.raises(InvalidArgumentError) as info:
            rt.submit(GenerateRequest("x", GenerateConfig(steps=2), control_image=control))
        assert needle in str(info.value) and "\n" not in str(info.value)
    finally:
        rt.shutdown()


def test_generator_without_controlnet_refuses_control_images(tiny_generator):
    rt = Runtime(tiny_generator(), start=False)
    try:
        with pytest.raises(InvalidArgumentError, match="no ControlNet"):
            rt.submit(GenerateRequest("x", GenerateConfig(steps=2), control_image=edges(1)))
    finally:
        rt.shutdown()
