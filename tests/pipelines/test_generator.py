"""fastgen.Generator: seeds per image, output types, config validation, errors, best-of-N, engine folders."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from fastgen.errors import InvalidArgumentError
from fastgen.pipelines.config import GenerateConfig, GenerationResult
from fastgen.pipelines.generator import Generator

A, B, C = "a cozy coffee shop interior", "luxury watch on black marble", "a golden retriever on a beach"
FAST = {"steps": 4, "progress": False}


@pytest.fixture(scope="module")
def gen(generator_for) -> Generator:
    return generator_for("tiny", "torch")


# --- config ---------------------------------------------------------------------------------------

def test_config_defaults_docs_and_round_trip():
    from fastgen.core.config import field_docs

    cfg = GenerateConfig()
    assert (cfg.steps, cfg.scheduler, cfg.output_type, cfg.num_images_per_prompt, cfg.seed) == (20, None, "pil", 1, None)
    docs = field_docs(GenerateConfig)
    assert set(docs) == {f.name for f in dataclasses.fields(GenerateConfig)} and all(docs.values())
    again = GenerateConfig.from_dict(GenerateConfig(steps=3, scheduler="ddim", seed=4).to_dict())
    assert again == GenerateConfig(steps=3, scheduler="ddim", seed=4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.steps = 3  # type: ignore[misc]


@pytest.mark.parametrize(("field", "value", "needle"), [
    ("steps", 0, "integers from 1 to 1000"),
    ("steps", 2.5, "integers from 1 to 1000"),
    ("strength", 1.5, "from 0.0 to 1.0"),
    ("strength", -0.1, "from 0.0 to 1.0"),
    ("guidance_scale", -1.0, ">= 0.0"),
    ("guidance_scale", float("nan"), ">= 0.0"),
    ("num_images_per_prompt", 0, "integers >= 1"),
    ("seed", -1, "integers from 0"),
    ("height", 0, "integers >= 1"),
    ("scheduler", "heun", "euler, euler-ancestral, ddim, dpm++, lcm, pndm"),
    ("output_type", "jpeg", "pil, np, uint8, latent"),
])
def test_config_validation_one_line(field, value, needle):
    with pytest.raises(InvalidArgumentError) as err:
        GenerateConfig(**{field: value})
    message = str(err.value)
    assert "\n" not in message and needle in message and field.replace("_", "-") in message


# --- seeds ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("scheduler", ["euler", "euler-ancestral", "ddim"])
def test_same_seed_same_image_whatever_the_batch(gen, scheduler):
    """Prompt A with seed 5 alone, then in the middle of a batch with B and C (other seeds, two images
    each): the same image. Euler-ancestral also draws noise at every step, from each image's generator."""
    alone = gen.generate(A, seed=5, scheduler=scheduler, output_type="np", **FAST)
    batch = gen.generate([B, A, C], seeds=[1, 5, 9], num_images_per_prompt=2, scheduler=scheduler,
                         output_type="np", **FAST)
    assert batch.seeds == [1, 2, 5, 6, 9, 10] and batch.prompts == [B, B, A, A, C, C]
    assert batch.prompt_indices == [0, 0, 1, 1, 2, 2]
    np.testing.assert_allclose(batch.images[2], alone.images[0], atol=1e-5, rtol=0)
    # Image j of a prompt is that prompt with seed + j.
    sixth = gen.generate(A, seed=6, scheduler=scheduler, output_type="np", **FAST)
    np.testing.assert_allclose(batch.images[3], sixth.images[0], atol=1e-5, rtol=0)
    assert np.abs(batch.images[2] - batch.images[3]).max() > 0.05  # other seed, other image


def test_random_seeds_are_reported_and_reproduce(gen):
    first = gen.generate([A, B], output_type="np", **FAST)
    assert len(first.seeds) == 2 and all(isinstance(s, int) for s in first.seeds)
    again = gen.generate([A, B], seeds=first.seeds, output_type="np", **FAST)
    np.testing.assert_allclose(again.images, first.images, atol=1e-6, rtol=0)


def test_empty_prompt_is_allowed_and_differs_from_a_prompt(gen):
    out = gen.generate(["", A], seed=2, output_type="np", **FAST)
    assert out.images.shape == (2, 64, 64, 3) and np.abs(out.images[0] - out.images[1]).max() > 1e-3


# --- outputs --------------------------------------------------------------------------------------

def test_output_types_agree(gen):
    from PIL import Image

    kwargs = {"seed": 7, "num_images_per_prompt": 2, **FAST}
    as_np = gen.generate(A, output_type="np", **kwargs)
    as_u8 = gen.generate(A, output_type="uint8", **kwargs)
    as_pil = gen.generate(A, output_type="pil", **kwargs)
    latent = gen.generate(A, output_type="latent", **kwargs)
    assert as_np.images.dtype == np.float32 and as_np.images.shape == (2, 64, 64, 3)
    assert 0 <= as_np.images.min() and as_np.images.max() <= 1
    assert as_u8.images.dtype == np.uint8 and as_u8.images.shape == (2, 64, 64, 3)
    # uint8 is round(x * 255) of the np output, up to the [-1, 1] -> [0, 1] rounding (one level).
    assert np.abs(as_u8.images.astype(np.int16) - np.round(as_np.images * 255)).max() <= 1
    assert all(isinstance(i, Image.Image) and i.size == (64, 64) and i.mode == "RGB" for i in as_pil.images)
    np.testing.assert_array_equal(np.stack([np.asarray(i) for i in as_pil.images]), as_u8.images)
    assert isinstance(latent.images, torch.Tensor) and latent.images.shape == (2, 4, 8, 8)
    assert latent.latencies.vae_decode_ms == 0
    decoded = gen.vae_decoder({"latent": latent.images / gen.scaling_factor})["image"]
    np.testing.assert_allclose((decoded * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy(), as_np.images,
                               atol=1e-6, rtol=0)


def test_result_latencies_and_summary(gen):
    out = gen.generate([A, B], seed=1, steps=5, scheduler="euler", progress=False, output_type="np")
    assert isinstance(out, GenerationResult) and len(out) == 2
    lat = out.latencies
    assert len(lat.denoising_step_ms) == 5 and all(ms > 0 for ms in lat.denoising_step_ms)
    assert lat.text_encoding_ms > 0 and lat.vae_decode_ms > 0 and lat.denoising_ms >= sum(lat.denoising_step_ms)
    assert lat.total_ms >= lat.text_encoding_ms + lat.denoising_ms + lat.vae_decode_ms
    summary = out.to_dict()
    assert summary["seeds"] == [1, 1] and summary["config"]["steps"] == 5 and summary["scores"] is None
    assert summary["height"] == summary["width"] == 64 and summary["mode"] == "txt2img"
    # PNDM (the tiny model's own scheduler) runs one timestep more than asked: diffusers' schedule.
    assert len(gen.generate(A, seed=1, steps=5, progress=False, output_type="latent").latencies.denoising_step_ms) == 6


def test_size_defaults_to_the_profile_opt_and_other_sizes(gen):
    assert gen.default_size == (64, 64)
    out = gen.generate(A, seed=0, height=32, width=48, output_type="uint8", **FAST)
    assert out.images.shape == (1, 32, 48, 3)


class CountingEngine:
    """An engine proxy recording the batch of every call."""

    def __init__(self, engine):
        self.engine = engine
        self.rows: list[int] = []

    def __call__(self, inputs):
        self.rows.append(next(iter(inputs.values())).shape[0])
        return self.engine(inputs)

    def __getattr__(self, name):
        return getattr(self.engine, name)


def test_guidance_rows_and_one_unet_call_per_step(gen):
    unet = CountingEngine(gen.unet)
    counted = Generator(unet=unet, vae_decoder=gen.vae_decoder, text_encoder=gen.text_encoder)
    counted.generate([A, B], seed=0, guidance_scale=7.5, steps=3, scheduler="euler", progress=False,
                     output_type="latent")
    assert unet.rows == [4, 4, 4]  # unconditional and conditional rows of 2 images in one call per step
    unet.rows.clear()
    # Guidance 1 or less: no unconditional pass (diffusers' rule).
    counted.generate([A, B], seed=0, guidance_scale=1.0, steps=3, scheduler="euler", progress=False,
                     output_type="latent")
    assert unet.rows == [2, 2, 2]


def test_config_object_and_overrides(gen):
    cfg = GenerateConfig(steps=3, seed=9, output_type="np")
    a = gen.generate(A, config=cfg, progress=False)
    b = gen.generate(A, config=GenerateConfig(steps=50), steps=3, seed=9, output_type="np", progress=False)
    np.testing.assert_array_equal(a.images, b.images)
    assert b.config == cfg


# --- image to image -------------------------------------------------------------------------------

def _png(tmp_path, size=(64, 64), name="in.png"):
    from PIL import Image

    rng = np.random.default_rng(1)
    path = tmp_path / name
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def test_img2img_inputs_and_strength(gen, tmp_path):
    path = _png(tmp_path)
    from PIL import Image

    pil = Image.open(path)
    by_path = gen.generate(A, image=path, seed=3, strength=0.5, scheduler="euler", output_type="np", **FAST)
    by_pil = gen.generate(A, image=pil, seed=3, strength=0.5, scheduler="euler", output_type="np", **FAST)
    by_array = gen.generate(A, image=np.asarray(pil), seed=3, strength=0.5, scheduler="euler", output_type="np",
                            **FAST)
    np.testing.assert_array_equal(by_path.images, by_pil.images)
    np.testing.assert_array_equal(by_path.images, by_array.images)
    assert by_path.to_dict()["mode"] == "img2img" and len(by_path.latencies.denoising_step_ms) == 2
    # Strength 0: nothing is denoised; the image goes through the VAE only.
    kept = gen.generate(A, image=path, seed=3, strength=0.0, output_type="np", **FAST)
    assert kept.latencies.denoising_step_ms == ()
    # One image per prompt, and the image's own size rounded down to the UNet's multiple (16).
    odd = _png(tmp_path, size=(70, 40), name="odd.png")
    two = gen.generate([A, B], image=[path, odd], seed=3, output_type="uint8", height=64, width=64, **FAST)
    assert two.images.shape == (2, 64, 64, 3)
    own = gen.generate(A, image=odd, seed=3, output_type="uint8", **FAST)
    assert own.images.shape == (1, 32, 64, 3)


def test_img2img_encodes_each_distinct_image_once(gen, tmp_path):
    encoder = CountingEngine(gen.vae_encoder)
    counted = Generator(unet=gen.unet, vae_decoder=gen.vae_decoder, text_encoder=gen.text_encoder,
                        vae_encoder=encoder)
    path = _png(tmp_path)
    shared = counted.generate([A, B], image=path, seed=1, num_images_per_prompt=2, output_type="np", **FAST)
    assert encoder.rows == [1]
    each = gen.generate([A, B], image=[path, path], seed=1, num_images_per_prompt=2, output_type="np", **FAST)
    np.testing.assert_allclose(shared.images, each.images, atol=1e-5, rtol=0)  # batch 1 vs 2 encoder runs


# --- errors ---------------------------------------------------------------------------------------

def _one_line(exc_info, *needles):
    message = str(exc_info.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, message


def test_bad_input_one_line_errors(gen, tmp_path):
    with pytest.raises(InvalidArgumentError) as err:
        gen.generate([], **FAST)
    _one_line(err, "prompts")
    with pytest.raises(InvalidArgumentError) as err:
        gen.generate([A, 3], **FAST)
    _one_line(err, "prompt", "3")
    with pytest.raises(InvalidArgumentError) as err:
        gen.generate(A, steps=0, progress=False)
    _one_line(err, "steps")
    with pytest.raises(InvalidArgumentError) as err:
        gen.generate(A, strength=1.2, **FAST)
    _one_line(err, "strength")
    with pytest.raises(InvalidArgumentError) as err:
        gen.generate(A, height=72, **FAST)
    _one_line(err, "height", "72", "multiples of 16")
    with pytest.raises(InvalidArgumentError) as err:
        gen.generate(A, scheduler="k-lms", **FAST)
    _one_line(err, "scheduler", "dpm++")
    with pytest.raises(InvalidArgumentError) as err:
        gen.generate(A, steps=60, scheduler="lcm", progress=False)  # LCM distils 50 steps at most
    _one_line(err, "steps", "60", "LCMScheduler")
    for scheduler in ("pndm", "ddim"):  # their schedules at 1000 steps start at timestep 1000 of 0..999
        with pytest.raises(InvalidArgumentError) as err:
            gen.generate(A, steps=1000, scheduler=scheduler, progress=False)
        _one_line(err, "steps", "1000", "timestep 1000")
    with pytest.raises(InvalidArgumentError) as err:
        gen.generate(A, sampler="euler", **FAST)
    _one_line(err, "sampler", "guidance_scale")
    with pytest.raises(InvalidArgumentError) as err:
        gen.generate([A, B], seeds=[1], **FAST)
    _one_line(err, "seeds", "2 seeds")
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not a png")
    for bad in (not_an_image, tmp_path / "missing.png"):
        with pytest.raises(InvalidArgumentError) as err:
            gen.generate(A, image=bad, **FAST)
        _one_line(err, "image", str(bad))
    with pytest.raises(InvalidArgumentError) as err:
        gen.generate(A, image=np.zeros((8, 8), dtype=np.float32), **FAST)
    _one_line(err, "image")


# --- best of N ------------------------------------------------------------------------------------

@dataclasses.dataclass
class FakeScore:
    probs: dict


class BrightnessScorer:
    """Stands in for fastgen.pipelines.scorer.Scorer: 'bright' = mean pixel value."""

    labels = ["bright", "dark"]

    def __init__(self):
        self.seen = 0

    def score_images(self, images):
        self.seen += len(images)
        out = []
        for img in images:
            v = float(np.asarray(img, dtype=np.float64).mean() / 255)
            out.append(FakeScore({"bright": v, "dark": 1 - v}))
        return out


def test_best_of_n_keeps_the_best_per_prompt(gen):
    scorer = BrightnessScorer()
    every = gen.generate([A, B], seed=20, num_images_per_prompt=5, output_type="uint8", **FAST)
    brightness = every.images.reshape(2, 5, -1).astype(np.float64).mean(-1) / 255  # (prompt, candidate)
    best = gen.generate([A, B], seed=20, candidates=5, scorer=scorer, keep=2, output_type="uint8", **FAST)
    assert scorer.seen == 10 and best.images.shape == (4, 64, 64, 3)
    for p in range(2):
        order = np.argsort(-brightness[p], kind="stable")[:2]
        assert best.seeds[2 * p: 2 * p + 2] == [20 + int(j) for j in order]
        assert best.prompt_indices[2 * p: 2 * p + 2] == [p, p]
        np.testing.assert_array_equal(best.images[2 * p], every.images[5 * p + order[0]])
        assert best.rank_values[2 * p] >= best.rank_values[2 * p + 1]
        assert math.isclose(best.rank_values[2 * p], brightness[p, order[0]], rel_tol=1e-9)
    assert [s.probs["bright"] for s in best.scores] == best.rank_values
    assert best.latencies.scoring_ms > 0
    # rank_by another label, or a function of the score, reverses the order here.
    dark = gen.generate([A], seed=20, candidates=5, scorer=scorer, keep=1, rank_by="dark", output_type="uint8", **FAST)
    assert dark.seeds == [20 + int(np.argmin(brightness[0]))]
    fn = gen.generate([A], seed=20, candidates=5, scorer=scorer, rank_by=lambda s: -s.probs["bright"],
                      output_type="uint8", **FAST)
    assert fn.seeds == dark.seeds
    assert gen.generate([A], seed=20, candidates=5, scorer=scorer, **FAST).to_dict()["scores"][0]["probs"]


def test_best_of_n_errors(gen):
    scorer = BrightnessScorer()
    for kwargs, needle in [({"candidates": 3}, "scorer"),
                           ({"candidates": 3, "scorer": scorer, "keep": 4}, "keep"),
                           ({"candidates": 0, "scorer": scorer}, "candidates"),
                           ({"candidates": 3, "scorer": scorer, "rank_by": "pretty"}, "bright, dark"),
                           ({"candidates": 3, "scorer": scorer, "num_images_per_prompt": 2}, "keep"),
                           ({"candidates": 3, "scorer": scorer, "output_type": "latent"}, "latent")]:
        with pytest.raises(InvalidArgumentError) as err:
            gen.generate(A, **kwargs, **FAST)
        _one_line(err, needle)
    assert scorer.seen == 0  # refused before any work


# --- construction ---------------------------------------------------------------------------------

def test_generator_from_engine_directories_matches_the_preset(generator_for, fast_build, tmp_path, monkeypatch):
    import fastgen
    import fastgen.models

    preset = generator_for("tiny", "onnxruntime")
    for name in ("unet", "vae-decoder", "vae-encoder", "text-encoder"):
        fastgen.build("tiny", component=name, config=dataclasses.replace(fast_build, device="cpu"),
                      out=tmp_path / "engines" / name)

    def no_models(*args, **kwargs):
        raise AssertionError("a generator from engine directories must not load a PyTorch model")

    monkeypatch.setattr(fastgen.models, "load_component", no_models)
    from_dirs = Generator.from_pretrained(tmp_path / "engines")
    assert from_dirs.unet.backend == "onnxruntime" and from_dirs._vae_encoder is not None
    kwargs = {"seed": 4, "num_images_per_prompt": 2, "output_type": "np", **FAST}
    np.testing.assert_array_equal(from_dirs.generate([A, B], **kwargs).images, preset.generate([A, B], **kwargs).images)
    image = _png(tmp_path)
    np.testing.assert_array_equal(from_dirs.generate(A, image=image, **kwargs).images,
                                  preset.generate(A, image=image, **kwargs).images)


def test_constructor_takes_engines_and_explicit_settings(generator_for):
    base = generator_for("tiny", "torch")
    bare = Generator(unet=base.unet, vae_decoder=base.vae_decoder, text_encoder=base.text_encoder,
                     tokenizer=base.text_encoder.tokenizer, scheduler_config=dict(base.scheduler_config),
                     scaling_factor=base.scaling_factor, pipeline="sd")
    assert bare.vae_encoder is None
    kwargs = {"seed": 1, "output_type": "np", **FAST}
    np.testing.assert_array_equal(bare.generate(A, **kwargs).images, base.generate(A, **kwargs).images)
    with pytest.raises(InvalidArgumentError) as err:
        bare.generate(A, image=np.zeros((64, 64, 3), dtype=np.uint8), **FAST)
    _one_line(err, "vae-encoder")
    with pytest.raises(InvalidArgumentError) as err:
        Generator(unet=base.unet, vae_decoder=base.vae_decoder, text_encoder=base.text_encoder, pipeline="sd3")
    _one_line(err, "pipeline", "sd, sdxl")


def test_from_pretrained_profile_is_split_by_component(tmp_path):
    from fastgen.engines.cache import EngineCache

    cache = EngineCache(tmp_path / "cache")
    gen = Generator.from_pretrained("tiny", backend="torch", device="cpu", cache=cache,
                                    profile="batch=1:2:4,height=32:64:64")
    assert gen.unet.spec.profile.dims["batch"].max == 4 and gen.unet.spec.profile.dims["height"].max == 64
    assert gen.text_encoder.spec.profile.dims["batch"].max == 4 and "height" not in gen.text_encoder.spec.profile.dims
    # 3 images x 2 (guidance) = 6 UNet rows, run as chunks of at most 4.
    assert gen.generate([A, B, C], seed=0, output_type="uint8", **FAST).images.shape == (3, 64, 64, 3)
    with pytest.raises(InvalidArgumentError) as err:
        Generator.from_pretrained("tiny", backend="torch", device="cpu", cache=cache, profile="frames=1:2:4")
    _one_line(err, "profile", "frames")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_cuda_torch_generator_matches_cpu(generator_for, fast_build):
    """The same seeds on a GPU give the CPU's images: the noise is drawn on the CPU either way.
    (cuDNN may use TF32 convolutions, hence a PSNR bound rather than equality; unverified here.)"""
    gpu = Generator.from_pretrained("tiny", backend="torch", device="cuda", build_config=fast_build)
    assert gpu.unet.device.type == "cuda"
    kwargs = {"seed": 5, "num_images_per_prompt": 2, "scheduler": "euler-ancestral", "output_type": "np", **FAST}
    ours = gpu.generate([A, B], **kwargs).images
    ref = generator_for("tiny", "torch").generate([A, B], **kwargs).images
    mse = float(np.mean((ours.astype(np.float64) - ref) ** 2))
    assert mse == 0 or 10 * np.log10(1 / mse) >= 35


def test_torch_modules_by_component_without_loading_the_vae_encoder(generator_for):
    gen = generator_for("tiny", "torch")
    lazy = Generator(unet=gen.unet, vae_decoder=gen.vae_decoder, text_encoder=gen.text_encoder,
                     vae_encoder=lambda: pytest.fail("torch_modules must not build a lazy vae-encoder"))
    modules = lazy.torch_modules()
    assert set(modules) == {"unet", "vae_decoder", "text_encoder", "vae_encoder"}
    assert modules.pop("vae_encoder") is None  # held, not built
    assert modules["unet"] is gen.unet.component.model and modules["vae_decoder"] is gen.vae_decoder.component.model
    assert all(isinstance(m, torch.nn.Module) for m in modules.values())
    loaded = Generator(unet=gen.unet, vae_decoder=gen.vae_decoder, text_encoder=gen.text_encoder,
                       vae_encoder=gen.vae_encoder)
    assert loaded.torch_modules()["vae_encoder"] is gen.vae_encoder.component.model
    assert generator_for("tiny", "onnxruntime").torch_modules() == {}  # no PyTorch module runs there
