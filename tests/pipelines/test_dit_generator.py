"""fastgen.Generator on SD3, FLUX and PixArt-Sigma (tiny presets, torch backend): per-image seeds, family
defaults, the T5 length, engine-directory folders, bad input as one-line errors, the CLI.

Parity with diffusers is tests/pipelines/test_dit_parity.py; the runtime tests/runtime/test_dit_runtime.py.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from fastgen.errors import InvalidArgumentError, UnsupportedError
from fastgen.pipelines.config import GenerateConfig
from fastgen.pipelines.generator import Generator

FAMILIES = ["sd3", "flux", "pixart"]
A, B = "a lighthouse at dusk", "a bowl of ramen"
FAST = {"steps": 3, "progress": False}
_GENERATORS: dict = {}


@pytest.fixture(scope="module")
def dit(fast_build):
    """``dit(family, backend="torch")``: the tiny preset's Generator, built once per module."""

    def get(family: str, backend: str = "torch") -> Generator:
        if (family, backend) not in _GENERATORS:
            _GENERATORS[family, backend] = Generator.from_pretrained(f"tiny-{family}", backend=backend, device="cpu",
                                                                     build_config=fast_build)
        return _GENERATORS[family, backend]

    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_each_image_depends_on_its_own_seed_only(dit, family):
    """Prompt-major images, image j of a prompt from seed + j, equal to that prompt alone (true CFG rows
    for FLUX, so the unconditional layout is exercised for every family)."""
    gen = dit(family)
    extra = {"negative_prompt": "ugly", "true_cfg_scale": 2.0} if family == "flux" else {"negative_prompt": "ugly"}
    both = gen.generate([A, B], seeds=[5, 9], num_images_per_prompt=2, output_type="np", **FAST, **extra)
    assert both.seeds == [5, 6, 9, 10] and both.prompt_indices == [0, 0, 1, 1]
    alone = gen.generate(B, seed=9, num_images_per_prompt=2, output_type="np", **FAST, **extra)
    np.testing.assert_allclose(both.images[2:], alone.images, atol=1e-5, rtol=0)
    second = gen.generate(B, seed=10, output_type="np", **FAST, **extra)
    np.testing.assert_allclose(both.images[3:], second.images, atol=1e-5, rtol=0)
    assert not np.allclose(both.images[0], both.images[1])  # different seeds, different pictures
    assert both.extras["pipeline"] == family


@pytest.mark.parametrize(("family", "channels", "scheduler"), [
    ("sd3", 16, "FlowMatchEulerDiscreteScheduler"), ("flux", 16, "FlowMatchEulerDiscreteScheduler"),
    ("pixart", 4, "DPMSolverMultistepScheduler")])
def test_family_defaults_latents_and_repr(dit, family, channels, scheduler):
    gen = dit(family)
    out = gen.generate(A, seed=1, output_type="latent", **FAST)
    assert out.images.shape == (1, channels, 8, 8)  # 64x64 pixels, the presets' default size
    assert out.extras["guidance_scale"] == {"sd3": 7.0, "flux": 3.5, "pixart": 4.5}[family]
    assert out.extras["scheduler"] == scheduler and family in repr(gen)
    assert gen.transformer is gen.unet and gen.latent_channels == channels
    assert set(gen.torch_modules()) >= {"unet", "vae_decoder", "text_encoder"}


def test_sd_default_guidance_is_unchanged():
    assert GenerateConfig().guidance_scale is None
    assert GenerateConfig().resolved("sd").guidance_scale == 7.5
    assert GenerateConfig(guidance_scale=2.0).resolved("flux").guidance_scale == 2.0


@pytest.mark.parametrize("family", FAMILIES)
def test_max_sequence_length_is_the_t5_length(dit, family, monkeypatch):
    gen = dit(family)
    t5 = gen.prompt_encoder.t5[0]
    seen: list = []
    original = type(t5).__call__

    def spy(self, inputs=None, **kwargs):
        if self is t5:
            seen.append(tuple((inputs or kwargs)["input_ids"].shape))
        return original(self, inputs, **kwargs)

    monkeypatch.setattr(type(t5), "__call__", spy)
    default = gen.generate(A, seed=2, output_type="np", **FAST).images
    short = gen.generate(A, seed=2, max_sequence_length=32, output_type="np", **FAST).images
    assert [s[1] for s in seen] == [{"sd3": 256, "flux": 512, "pixart": 300}[family], 32]
    if family != "pixart":  # PixArt masks the padding: only the prompt's tokens count, so the length does not
        assert not np.allclose(default, short)
    else:
        np.testing.assert_allclose(default, short, atol=2e-3)


def test_flux_true_cfg_needs_a_negative_prompt_and_distilled_guidance_changes_the_image(dit):
    gen = dit("flux")
    base = gen.generate(A, seed=3, output_type="np", **FAST).images
    no_negative = gen.generate(A, seed=3, true_cfg_scale=3.0, output_type="np", **FAST).images
    np.testing.assert_array_equal(base, no_negative)  # as FluxPipeline: no negative prompt, no true CFG
    assert not np.allclose(base, gen.generate(A, seed=3, guidance_scale=6.0, output_type="np", **FAST).images)
    cfg = gen.generate(A, seed=3, true_cfg_scale=3.0, negative_prompt="", output_type="np", **FAST).images
    assert not np.allclose(base, cfg)


def test_sd3_img2img_strength_zero_keeps_the_image_path(dit):
    from PIL import Image

    gen = dit("sd3")
    image = Image.fromarray(np.full((64, 64, 3), 128, np.uint8), "RGB")
    out = gen.generate(A, image=image, strength=0.0, seed=1, output_type="np", **FAST)
    assert out.latencies.denoising_step_ms == () and out.extras["mode"] == "img2img"
    assert out.images.shape == (1, 64, 64, 3)


def test_bad_input_one_line_errors(dit):
    from PIL import Image

    flux, sd3 = dit("flux"), dit("sd3")
    image = Image.new("RGB", (64, 64))
    cases = [
        (lambda: flux.generate(A, scheduler="ddim", **FAST), InvalidArgumentError, "flow-matching"),
        (lambda: GenerateConfig(max_sequence_length=513), InvalidArgumentError, "integers from 1 to 512"),
        (lambda: GenerateConfig(max_sequence_length=0), InvalidArgumentError, "max-sequence-length"),
        (lambda: GenerateConfig(true_cfg_scale=-1.0), InvalidArgumentError, "true-cfg-scale"),
        # tiny-sd3's transformer takes up to 589 tokens: 77 CLIP + 512 T5; a narrower profile refuses.
        (lambda: _narrow_sd3(sd3).generate(A, max_sequence_length=300, **FAST), InvalidArgumentError,
         "1 to 256 (the engines' profiles)"),
        (lambda: sd3.generate(A, image=image, mask_image=image, **FAST), UnsupportedError, "inpainting"),
        (lambda: sd3.generate(A, height=72, width=64, **FAST), InvalidArgumentError, "height"),
        (lambda: Generator(unet=sd3.unet, transformer=sd3.unet, vae_decoder=sd3.vae_decoder,
                           text_encoder=sd3.text_encoder), InvalidArgumentError, "one denoiser"),
        (lambda: Generator(transformer=flux.unet, vae_decoder=flux.vae_decoder, text_encoder=flux.text_encoder,
                           text_encoder_2=flux.text_encoder_2, text_encoder_3=flux.text_encoder_2),
         InvalidArgumentError, "only SD3"),
        (lambda: Generator(transformer=flux.unet, vae_decoder=flux.vae_decoder, text_encoder=flux.text_encoder),
         InvalidArgumentError, "CLIP-L and T5"),
    ]
    for call, kind, needle in cases:
        with pytest.raises(kind) as info:
            call()
        message = str(info.value)
        assert needle in message and "\n" not in message, message


def _narrow_sd3(sd3: Generator) -> Generator:
    """tiny-sd3 whose transformer's profile takes at most 77 + 256 text tokens."""
    from fastgen.models.spec import DimRange, ShapeProfile

    class Narrow:
        def __init__(self, engine) -> None:
            self._engine = engine
            dims = dict(engine.spec.profile.dims, seq=DimRange(77, 333, 333))
            self.spec = dataclasses.replace(engine.spec, profile=ShapeProfile(dims))

        def __getattr__(self, name):
            return getattr(self._engine, name)

        def __call__(self, inputs):
            return self._engine(inputs)

    return Generator(transformer=Narrow(sd3.unet), vae_decoder=sd3.vae_decoder, text_encoder=sd3.text_encoder,
                     text_encoder_2=sd3.text_encoder_2, text_encoder_3=sd3.text_encoder_3)


def test_generator_from_engine_directories(dit, fast_build, tmp_path, monkeypatch):
    """A folder of ``fastgen build`` engine directories with ``transformer/`` (no PyTorch model loaded)."""
    import fastgen
    import fastgen.models

    preset = dit("flux", "onnxruntime")
    for name in ("transformer", "vae-decoder", "text-encoder", "text-encoder-2"):
        fastgen.build("tiny-flux", component=name, config=dataclasses.replace(fast_build, device="cpu"),
                      out=tmp_path / "engines" / name)

    def no_models(*args, **kwargs):
        raise AssertionError("a generator from engine directories must not load a PyTorch model")

    monkeypatch.setattr(fastgen.models, "load_component", no_models)
    from_dirs = Generator.from_pretrained(tmp_path / "engines")
    assert from_dirs.pipeline == "flux" and from_dirs.unet.backend == "onnxruntime" and from_dirs.shift_factor > 0
    kwargs = {"seed": 4, "num_images_per_prompt": 2, "output_type": "np", **FAST}
    np.testing.assert_array_equal(from_dirs.generate(A, **kwargs).images, preset.generate(A, **kwargs).images)


def test_cli_generate_tiny_flux(tmp_path):
    """``fastgen generate --model tiny-flux --prompt ... --steps 2`` writes PNGs and results.json; the DiT
    flags come from GenerateConfig; a sampler a flow model cannot take is exit code 2 in one line."""
    from click.testing import CliRunner
    from PIL import Image

    from fastgen.cli.generate import generate

    base = ["--model", "tiny-flux", "--prompt", "a prompt", "--steps", "2", "--backend", "torch", "--device", "cpu",
            "--no-progress"]
    out = tmp_path / "out"
    result = CliRunner().invoke(generate, [*base, "-n", "2", "--seed", "5", "--max-sequence-length", "64",
                                           "--true-cfg-scale", "2", "--negative-prompt", "dark", "--out", str(out)])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "results.json").read_text())
    assert summary["seeds"] == [5, 6] and summary["pipeline"] == "flux"
    assert summary["guidance_scale"] == 3.5 and summary["config"]["max_sequence_length"] == 64
    assert summary["config"]["true_cfg_scale"] == 2.0
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 2 and Image.open(pngs[0]).size == (64, 64)
    # The command raises the one-line error (fastgen.cli.main turns it into exit code 2), writing nothing.
    bad = CliRunner().invoke(generate, [*base, "--scheduler", "ddim", "--out", str(tmp_path / "bad")])
    assert isinstance(bad.exception, InvalidArgumentError) and "flow-matching" in str(bad.exception)
    assert "\n" not in str(bad.exception) and not (tmp_path / "bad").exists()


def test_latents_are_float32_on_the_generator_device(dit):
    out = dit("pixart").generate([A, B], seed=0, output_type="latent", **FAST)
    assert out.images.dtype == torch.float32 and out.images.device.type == "cpu"


def test_lora_on_a_dit_is_refused_in_one_line(tmp_path):
    from fastgen.errors import UnsupportedError
    from fastgen.pipelines.generator import Generator

    gen = Generator.from_pretrained("tiny-pixart", backend="torch", device="cpu")
    with pytest.raises(UnsupportedError, match="LoRA adapters on a pixart generator") as err:
        gen.load_lora(tmp_path / "x.safetensors")
    assert "\n" not in str(err.value)
