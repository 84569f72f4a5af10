"""The default calibration of a build without ``calibration=``: found through the plugin registry
(``fastgen.core.plugins``), denoising loops for SD UNets with today's statistics, synthetic otherwise."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import fastgen
from fastgen.core import plugins
from fastgen.errors import InvalidArgumentError
from fastgen.quant import calibrate
from fastgen.quant.components import default_calibration, synthetic_calibration


def test_registry_register_entries_load():
    plugins.register("test-group", "b", "fastgen.quant.components:synthetic_calibration")
    plugins.register("test-group", "a", "fastgen.core.plugins:entries")
    try:
        assert plugins.entries("test-group") == {"b": "fastgen.quant.components:synthetic_calibration",
                                                 "a": "fastgen.core.plugins:entries"}  # registration order
        assert plugins.load(plugins.entries("test-group")["b"]) is synthetic_calibration
    finally:
        plugins.unregister("test-group", "a")
        plugins.unregister("test-group", "b")
    assert plugins.entries("test-group") == {} and plugins.entries("never-registered") == {}
    for bad in ("os:system", "fastgen.core.plugins", ":entries", "fastgen.core.plugins:", 3):
        with pytest.raises(InvalidArgumentError, match="target"):
            plugins.register("test-group", "x", bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="cannot be loaded"):
        plugins.load("fastgen.core.plugins:no_such_function")
    with pytest.raises(InvalidArgumentError, match="callable"):
        plugins.load("fastgen.core.plugins:ALLOWED_PREFIX")


def test_import_fastgen_registers_the_sd_unet_source_cheaply():
    code = ("import sys, fastgen; from fastgen.core import plugins; "
            "print(plugins.entries('calibration')); print(any(m.startswith(('torch', 'fastgen.pipelines')) "
            "for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == "{'sd-unet': 'fastgen.pipelines.calibration:sd_unet_calibration'}"
    assert out[1] == "False"  # strings only: nothing imported
    from fastgen.pipelines.calibration import sd_unet_calibration

    assert plugins.load(plugins.entries("calibration")["sd-unet"]) is sd_unet_calibration


def _reference_loop(comp, *, height: int, width: int, steps: int, seeds=(101, 102)):
    """The SD-UNet calibration loop as the accuracy report wrote it before the loops were unified:
    diffusers' text-to-image loop, by hand, over the component's module."""
    from fastgen.pipelines.sampling import make_scheduler, set_timesteps

    def loop(module):
        for seed in seeds:
            sched = make_scheduler(None, comp.metadata.scheduler)
            set_timesteps(sched, steps)
            gen = torch.Generator().manual_seed(seed)
            latents = torch.randn(1, comp.spec.inputs[0].shape[1], height // 8, width // 8, generator=gen)
            latents = latents * sched.init_noise_sigma
            dim = next(t for t in comp.spec.inputs if t.name == "encoder_hidden_states").shape[-1]
            gen = torch.Generator().manual_seed(seed + 7919)
            cond, uncond = torch.randn(1, 77, dim, generator=gen), torch.randn(1, 77, dim, generator=gen)
            embeds = torch.cat([uncond, cond])
            with torch.inference_mode():
                for t in sched.timesteps:
                    sample = sched.scale_model_input(torch.cat([latents, latents]), t)
                    (noise,) = module(sample, t.reshape(1).to(torch.float32).repeat(2), embeds)
                    noise_uncond, noise_text = noise.chunk(2)
                    noise = noise_uncond + 7.5 * (noise_text - noise_uncond)
                    latents = sched.step(noise, t, latents, return_dict=False)[0]

    return loop


def test_default_calibration_of_the_tiny_unet_is_the_denoising_loops():
    comp = fastgen.load_component("tiny", "unet")
    loop = default_calibration(comp)
    assert callable(loop)  # not the synthetic batches
    stats = calibrate(comp.module, loop)
    dims = comp.spec.profile.dims
    reference = calibrate(comp.module, _reference_loop(comp, height=dims["height"].opt, width=dims["width"].opt,
                                                       steps=5))
    assert stats.keys() == reference.keys() and len(stats) > 10
    for name in stats:
        assert torch.equal(stats[name], reference[name]), name


def test_default_calibration_of_other_components_is_synthetic():
    comp = fastgen.load_component("tiny", "classifier")
    batches = default_calibration(comp)
    expected = synthetic_calibration(comp)
    assert len(batches) == len(expected) == 4
    assert all(torch.equal(a, b) for x, y in zip(batches, expected) for a, b in zip(x, y))
