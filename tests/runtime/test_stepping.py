"""fastgen.pipelines.stepping: requests that join and leave a shared UNet batch at any step give what
Generator.generate gives for each alone (SD and SDXL), and one request's failure stays its own."""

from __future__ import annotations

import pytest
import torch

from fastgen.engines.config import BuildConfig
from fastgen.errors import InvalidArgumentError, UnsupportedError
from fastgen.export.config import ExportConfig
from fastgen.pipelines import stepping
from fastgen.pipelines.config import GenerateConfig
from fastgen.pipelines.generator import Generator

REQUESTS = [
    ("a red sports car", dict(steps=4, seed=11, scheduler="euler-ancestral")),
    ("", dict(steps=3, seed=12, guidance_scale=1.0)),
    ("luxury watch", dict(steps=5, seed=13, scheduler="dpm++", num_images_per_prompt=2, negative_prompt="dull")),
    ("a cozy coffee shop", dict(steps=2, seed=14, scheduler="ddim", eta=0.5)),
]


def run_staggered(gen: Generator, requests) -> list[stepping.SampleState]:
    """Request i joins at step i (its prompt encoded with the others joining then); each leaves when done."""
    states = [stepping.prepare(gen, p, GenerateConfig(**cfg)) for p, cfg in requests]
    pending, active, cache = list(states), [], {}
    with torch.inference_mode():
        while pending or active:
            joining = pending[:1] if active else pending[:2]  # two join together at the start
            pending = pending[len(joining):]
            if joining:
                stepping.encode_prompts(gen, joining)
                stepping.init_latents(gen, joining)
                active += joining
            assert stepping.denoise_step(gen, active, feeds_cache=cache) == [None] * len(active)
            active = [s for s in active if not s.done]
    return states


@pytest.mark.parametrize("preset", ["tiny", "tiny-sdxl"])
def test_staggered_batches_equal_solo_runs(tiny_generator, preset):
    gen = tiny_generator() if preset == "tiny" else Generator.from_pretrained(
        preset, backend="torch", device="cpu", build_config=BuildConfig(export=ExportConfig(verify="opt")))
    states = run_staggered(gen, REQUESTS)
    for (prompt, cfg), state in zip(REQUESTS, states):
        alone = gen.generate(prompt, output_type="latent", progress=False, **cfg)
        assert state.seeds == alone.seeds and state.index == len(alone.latencies.denoising_step_ms)
        torch.testing.assert_close(state.latents, alone.images, atol=2e-4, rtol=0)
    decoded = stepping.decode(gen, states)
    for (prompt, cfg), image in zip(REQUESTS, decoded):
        alone = gen.generate(prompt, output_type="np", progress=False, **cfg).images
        torch.testing.assert_close(image.permute(0, 2, 3, 1).mul(0.5).add(0.5).clamp(0, 1),
                                   torch.from_numpy(alone), atol=1e-4, rtol=0)


def test_rows_count_guidance_and_images(tiny_generator):
    gen = tiny_generator()
    guided = stepping.prepare(gen, "x", GenerateConfig(num_images_per_prompt=3, seed=1))
    plain = stepping.prepare(gen, "x", GenerateConfig(guidance_scale=1.0, seed=1))
    assert (guided.rows, guided.images, plain.rows) == (6, 3, 1) and guided.seeds == [1, 2, 3]
    assert isinstance(stepping.prepare(gen, "x").seeds[0], int)  # no seed: a random one, reported


def test_a_failing_scheduler_step_fails_only_its_request(tiny_generator):
    gen = tiny_generator()
    states = [stepping.prepare(gen, p, GenerateConfig(steps=3, seed=i)) for i, p in enumerate("abc")]
    with torch.inference_mode():
        stepping.encode_prompts(gen, states)
        stepping.init_latents(gen, states)
        before = states[1].latents.clone()

        def broken(*args, **kwargs):
            raise RuntimeError("scheduler bug")

        states[1].scheduler.step = broken
        errors = stepping.denoise_step(gen, states)
    assert errors[0] is None and errors[2] is None and isinstance(errors[1], RuntimeError)
    assert [s.index for s in states] == [1, 0, 1] and torch.equal(states[1].latents, before)


def test_one_size_per_call_and_checks(tiny_generator):
    gen = tiny_generator()
    small = stepping.prepare(gen, "a", GenerateConfig(height=32, width=32, seed=1))
    large = stepping.prepare(gen, "a", GenerateConfig(seed=1))
    with pytest.raises(InvalidArgumentError, match="one image size"):
        stepping.denoise_step(gen, [small, large])
    with pytest.raises(UnsupportedError):
        stepping.prepare(gen, "a", image="some.png")
    with pytest.raises(InvalidArgumentError, match="seed"):
        stepping.prepare(gen, "a", seed=-1)
    with pytest.raises(InvalidArgumentError, match="steps"):
        stepping.prepare(gen, "a", GenerateConfig(scheduler="lcm", steps=5000))
    assert stepping.denoise_step(gen, []) == [] and stepping.decode(gen, []) == []


def test_image_to_image_steps_equal_generate(tiny_generator):
    import numpy as np
    from PIL import Image

    gen = tiny_generator()
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8))
    cfg = GenerateConfig(steps=5, seed=7, strength=0.6, num_images_per_prompt=2, scheduler="euler-ancestral",
                         output_type="latent")
    alone = gen.generate("a cat", image=image, config=cfg, progress=False)
    state = stepping.prepare(gen, "a cat", cfg, image=image)
    # The image's size (rounded down to what the models take); int(5 * 0.6) steps.
    assert (state.height, state.width, state.total_steps) == (alone.extras["height"], alone.extras["width"], 3)
    with torch.inference_mode():
        stepping.encode_prompts(gen, [state])
        stepping.init_latents(gen, [state])
        while not state.done:
            assert stepping.denoise_step(gen, [state]) == [None]
    assert state.vae_encode_ms > 0 and torch.equal(state.latents, alone.images)


def test_combine_guidance():
    uncond, text = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    weights = torch.tensor([1.0, 7.5]).view(2, 1, 1, 1)
    out = stepping.combine_guidance(uncond, text, weights)
    torch.testing.assert_close(out[0], text[0])  # guidance 1: the conditional prediction
    assert torch.equal(out[1], uncond[1] + 7.5 * (text[1] - uncond[1]))
    assert torch.equal(stepping.combine_guidance(uncond, text, 7.5)[1], out[1])
