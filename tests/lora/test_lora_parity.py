"""LoRA generation parity with diffusers' own pipeline (``load_lora_weights`` + ``set_adapters``) on the
tiny preset, same weights, tokenizer, scheduler and seeds, on the torch and onnxruntime backends.

The LoRA files are written by peft / diffusers (``save_lora_weights``) with random low-rank weights on
the UNet's attention projections and the text encoder's; the kohya file is the same weights renamed.
The diffusers pipeline runs on copies of the preset's models (its PEFT layers must not touch the
engines'). The PSNR / cosine floors are those of tests/pipelines/test_generator_parity.py.
Measured (2-core x86-64 CPU, torch 2.13, onnxruntime 1.32, diffusers 0.42.1, peft 0.21.2), see the
report in docs/lora.md.
"""

from __future__ import annotations

import copy

import lora_files
import numpy as np
import pytest
import torch

BOUNDS = {"torch": 100.0, "onnxruntime": 90.0}
MIN_COSINE = 0.99999
PROMPTS = ["a red sports car on a mountain road", "minimalist poster of a running shoe"]
SEEDS = [3, 11]
STEPS = 5


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = a.astype(np.float64).ravel() * 2 - 1, b.astype(np.float64).ravel() * 2 - 1
    return float(a64 @ b64 / (np.linalg.norm(a64) * np.linalg.norm(b64)))


@pytest.fixture(scope="module")
def files(models_for, lora_dir):
    models = models_for("tiny")
    a = lora_files.save_diffusers_lora(lora_dir / "style-a", models, rank=4, alpha=8, seed=1)
    b = lora_files.save_diffusers_lora(lora_dir / "style-b", models, rank=3, alpha=3, seed=5, convert=True)
    return {"a": a, "b": b, "kohya-a": lora_files.to_kohya(a, lora_dir / "kohya-a.safetensors")}


_REFS: dict = {}


def _reference(models_for, gen, files, adapters: tuple, weights: tuple):
    """diffusers' images with these adapters at these weights (computed once per case)."""
    key = (adapters, weights)
    if key not in _REFS:
        import diffusers

        from fastgen.pipelines.sampling import make_scheduler

        m = copy.deepcopy(models_for("tiny"))
        pipe = diffusers.StableDiffusionPipeline(
            vae=m["vae-decoder"], text_encoder=m["text-encoder"], tokenizer=gen.text_encoder.tokenizer, unet=m["unet"],
            scheduler=make_scheduler(None, gen.scheduler_config), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        for name in adapters:
            pipe.load_lora_weights(str(files[name]), adapter_name=name.replace("-", "_"))
        if adapters:
            pipe.set_adapters([n.replace("-", "_") for n in adapters], adapter_weights=list(weights))
        gens = [torch.Generator().manual_seed(s) for s in SEEDS]
        _REFS[key] = pipe(PROMPTS, num_inference_steps=STEPS, guidance_scale=7.5, height=64, width=64,
                          generator=gens, output_type="np").images
    return _REFS[key]


def _ours(gen):
    return gen.generate(PROMPTS, seeds=SEEDS, steps=STEPS, guidance_scale=7.5, height=64, width=64,
                        output_type="np", progress=False).images


def _check(ours, ref, backend, label):
    assert ref.std() > 0.02
    p, c = psnr(ours, ref), cosine(ours, ref)
    print(f"{label} [{backend}]: PSNR {p:.1f} dB, cosine {c:.12f}")
    assert p >= BOUNDS[backend], (label, p)
    assert c >= MIN_COSINE, (label, c)


CASES = [
    ("one LoRA, scale 0.7", ("a",), (0.7,)),
    ("two LoRAs, 0.8 and -0.6", ("a", "b"), (0.8, -0.6)),
    ("kohya file, scale 1.3", ("kohya-a",), (1.3,)),
]


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_lora_generation_matches_diffusers(generator_for, models_for, files, backend):
    gen = generator_for("tiny", backend)
    base = _ours(gen)
    try:
        for label, adapters, weights in CASES:
            for name in adapters:
                if name not in gen.active_adapters:
                    gen.load_lora(files[name], name=name)
            gen.set_adapters(list(adapters), weights)
            ours = _ours(gen)
            ref = _reference(models_for, gen, files, adapters, weights)
            _check(ours, ref, backend, label)
            # The LoRA changes the picture by far more than the backends differ.
            assert psnr(ours, base) < 60, label
        gen.set_adapters([])  # swapped back to the base weights: the base images, bit for bit
        np.testing.assert_array_equal(_ours(gen), base)
    finally:
        gen.unload_lora()
    np.testing.assert_array_equal(_ours(gen), base)
