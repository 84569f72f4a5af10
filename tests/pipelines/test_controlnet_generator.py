"""Generator with ControlNets: where the nets come from (preset, controlnet= argument, engine folders),
the per-call settings' checks, and the residual batching rules (fastgen.pipelines.controlnet)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from fastgen.errors import InvalidArgumentError, UnsupportedError
from fastgen.pipelines.config import GenerateConfig

RUN = dict(steps=3, seed=4, height=64, width=64, output_type="np", progress=False)


def edges(w: int = 72, h: int = 80) -> Image.Image:
    img = Image.new("RGB", (w, h), (0, 0, 0))
    ImageDraw.Draw(img).ellipse((8, 10, w - 12, h - 6), outline=(255, 255, 255), width=3)
    return img


@pytest.mark.parametrize(("kwargs", "needle"), [
    (dict(control_guidance_start=0.5, control_guidance_end=0.5), "control-guidance-start"),
    (dict(control_guidance_start=-0.1), "control-guidance-start"),
    (dict(control_guidance_end=(1.0, 1.2)), "control-guidance-end[1]"),
    (dict(control_guidance_start=(0.0, 0.1), control_guidance_end=(1.0, 0.9, 0.8)), "control-guidance-end has 3"),
    (dict(control_guidance_start=(0.0, 0.7), control_guidance_end=0.6), "less than control-guidance-end"),
    (dict(controlnet_conditioning_scale=float("nan")), "controlnet-conditioning-scale"),
    (dict(controlnet_conditioning_scale=()), "controlnet-conditioning-scale"),
    (dict(controlnet_conditioning_scale="1"), "controlnet-conditioning-scale"),
    (dict(guess_mode=1), "guess-mode"),
])
def test_config_checks_the_control_settings_in_one_line(kwargs, needle):
    with pytest.raises(InvalidArgumentError) as info:
        GenerateConfig(**kwargs)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_config_normalises_lists_to_tuples():
    cfg = GenerateConfig(controlnet_conditioning_scale=[np.float32(0.5), 1], control_guidance_end=[0.9, 1.0])
    assert cfg.controlnet_conditioning_scale == (0.5, 1.0) and cfg.control_guidance_end == (0.9, 1.0)
    assert cfg.to_dict()["controlnet_conditioning_scale"] in ([0.5, 1.0], (0.5, 1.0))


def test_controlnet_argument_on_a_plain_preset_equals_the_controlnet_preset(generator_for):
    """tiny + controlnet="tiny-controlnet": the controlled UNet adapted from tiny's unet (same weights)."""
    from fastgen.pipelines.generator import Generator

    gen = Generator.from_pretrained("tiny", backend="torch", device="cpu", controlnet="tiny-controlnet")
    assert gen.unet.spec.component == "unet-controlled" and len(gen.controlnets) == 1
    assert gen.scheduler_config == generator_for("tiny-controlnet", "torch").scheduler_config
    ours = gen.generate("a cat", control_image=edges(), controlnet_conditioning_scale=0.8, **RUN).images
    ref = generator_for("tiny-controlnet", "torch").generate("a cat", control_image=edges(),
                                                             controlnet_conditioning_scale=0.8, **RUN).images
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)


def test_engine_folder_with_a_controlled_unet(generator_for, tmp_path):
    """A folder of built engines: unet-controlled/ stands in for unet/, controlnet/ beside it."""
    import fastgen
    from fastgen.pipelines.generator import Generator

    for component in ("unet-controlled", "controlnet", "vae-decoder", "text-encoder"):
        fastgen.build("tiny-controlnet", component=component, backend="torch", device="cpu", out=tmp_path / component)
    gen = Generator.from_pretrained(tmp_path, device="cpu")
    assert gen.unet.spec.component == "unet-controlled" and len(gen.controlnets) == 1
    ours = gen.generate("a dog", control_image=edges(), **RUN).images
    ref = generator_for("tiny-controlnet", "torch").generate("a dog", control_image=edges(), **RUN).images
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)
    with pytest.raises(InvalidArgumentError, match="engine folders"):
        Generator.from_pretrained(tmp_path, device="cpu", controlnet="tiny-controlnet")


def test_bad_calls_fail_in_one_line(generator_for):
    gen = generator_for("tiny-controlnet", "torch")
    cases = [
        (dict(control_image=[edges(), edges(), edges()]), InvalidArgumentError, "1 image or one per prompt"),
        (dict(control_image=edges(), controlnet_conditioning_scale=(0.5, 0.6)), InvalidArgumentError,
         "one value per ControlNet (1)"),
        (dict(control_image=edges(), image=edges(64, 64), mask_image=Image.new("L", (64, 64), 255)),
         UnsupportedError, "inpainting"),
        (dict(control_image="/nonexistent/edges.png"), InvalidArgumentError, "control-image"),
    ]
    for kwargs, error, needle in cases:
        with pytest.raises(error) as info:
            gen.generate(["a", "b"], **{**RUN, **kwargs})
        assert needle in str(info.value) and "\n" not in str(info.value), kwargs
    with pytest.raises(InvalidArgumentError, match="no ControlNet"):
        generator_for("tiny", "torch").generate("a", control_image=edges(), **RUN)


def test_a_controlnet_needs_the_controlled_unet(generator_for):
    from fastgen.pipelines.generator import Generator

    plain, controlled = generator_for("tiny", "torch"), generator_for("tiny-controlnet", "torch")
    with pytest.raises(InvalidArgumentError, match="unet-controlled"):
        Generator(unet=plain.unet, vae_decoder=plain.vae_decoder, text_encoder=plain.text_encoder,
                  controlnet=controlled.controlnets)
    sdxl = generator_for("tiny-sdxl-controlnet", "torch")
    with pytest.raises(InvalidArgumentError, match="controlnet\\[0\\]"):
        Generator(unet=controlled.unet, vae_decoder=plain.vae_decoder, text_encoder=plain.text_encoder,
                  controlnet=sdxl.controlnets)


def test_multi_controlnet_image_layouts(generator_for):
    """Two nets: one image per net for every prompt, or per prompt a list with one image per net."""
    from fastgen.pipelines.generator import Generator

    base = generator_for("tiny-controlnet", "torch")
    gen = Generator(unet=base.unet, vae_decoder=base.vae_decoder, text_encoder=base.text_encoder,
                    controlnet=[base.controlnets[0], base.controlnets[0]])
    a, b = edges(), edges(64, 96)
    shared = gen.generate(["x", "y"], control_image=[a, b], **RUN).images
    nested = gen.generate(["x", "y"], control_image=[[a, b], [a, b]], **RUN).images
    np.testing.assert_allclose(shared, nested, atol=1e-6, rtol=0)
    # The same net twice at scale s equals it once at 2s (the residuals are summed).
    once = base.generate(["x", "y"], control_image=a, controlnet_conditioning_scale=2.0, **RUN).images
    twice = gen.generate(["x", "y"], control_image=[a, a], **RUN).images
    np.testing.assert_allclose(once, twice, atol=1e-4, rtol=0)
    with pytest.raises(InvalidArgumentError, match="one per ControlNet"):
        gen.generate("x", control_image=[a, b, a], **RUN)
    with pytest.raises(InvalidArgumentError, match="one list per prompt"):
        gen.generate(["x", "y"], control_image=[[a, b]], **RUN)
