"""fastgen.Runtime's step-level batching over SD3, FLUX and PixArt-Sigma requests (tiny presets, torch
backend): requests of two resolutions, joining at different steps, share transformer calls and each
gets the images it gets alone (Generator.generate)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from fastgen.pipelines.config import GenerateConfig
from fastgen.pipelines.generator import Generator
from fastgen.runtime import GenerateRequest, Runtime

pytestmark = pytest.mark.usefixtures("no_leaked_threads")
TIMEOUT = 120
_GENERATORS: dict = {}

# (prompt, config): two sizes, different step counts, guided and unguided, 1 or 2 images.
EARLY = [
    ("a red sports car", dict(steps=4, seed=1)),
    ("luxury watch on black marble", dict(steps=3, seed=2, num_images_per_prompt=2, negative_prompt="blurry")),
    ("a cozy coffee shop", dict(steps=4, seed=3, height=48, width=80, guidance_scale=1.0)),
]
# Submitted once the transformer has run twice: they join mid-flight; one with its own T5 length.
LATE = [
    ("fresh orange juice", dict(steps=3, seed=4)),
    ("a foggy harbour", dict(steps=2, seed=5, height=48, width=80, negative_prompt="")),
    ("snowy mountains", dict(steps=2, seed=6, max_sequence_length=48)),
]
# FLUX's guided rows are true CFG: on with a negative prompt and true_cfg_scale > 1.
FLUX_EXTRA = {"true_cfg_scale": 2.5}


def _generator(family: str) -> Generator:
    from fastgen.engines.config import BuildConfig
    from fastgen.export.config import ExportConfig

    if family not in _GENERATORS:
        _GENERATORS[family] = Generator.from_pretrained(f"tiny-{family}", backend="torch", device="cpu",
                                                        build_config=BuildConfig(export=ExportConfig(verify="opt")))
    return _GENERATORS[family]


class Recording:
    """A transformer engine recording each call's (rows, height) and telling when it ran twice."""

    def __init__(self, engine) -> None:
        self._engine = engine
        self.calls: list[tuple[int, int]] = []
        self.twice = threading.Event()

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def __call__(self, inputs=None, **kwargs):
        inputs = {**(inputs or {}), **kwargs}
        self.calls.append((int(inputs["sample"].shape[0]), int(inputs["sample"].shape[2])))
        if len(self.calls) >= 2:
            self.twice.set()
        return self._engine(inputs)


@pytest.mark.parametrize("family", ["sd3", "flux", "pixart"])
def test_requests_joining_at_different_steps_equal_solo_runs(family):
    gen = _generator(family)
    extra = FLUX_EXTRA if family == "flux" else {}
    recording = Recording(gen.unet)
    batched = Generator(transformer=recording, vae_decoder=gen.vae_decoder, text_encoder=gen.text_encoder,
                        text_encoder_2=gen.text_encoder_2, text_encoder_3=gen.text_encoder_3)
    with Runtime(batched, max_step_rows=32) as rt:
        futures = [rt.submit(GenerateRequest(p, GenerateConfig(output_type="np", **cfg, **extra))) for p, cfg in EARLY]
        assert recording.twice.wait(TIMEOUT)
        futures += [rt.submit(GenerateRequest(p, GenerateConfig(output_type="np", **cfg, **extra))) for p, cfg in LATE]
        results = [f.result(TIMEOUT) for f in futures]
        buckets = set(rt.stats()["steps"])
    for (prompt, cfg), result in zip(EARLY + LATE, results):
        n = cfg.get("num_images_per_prompt", 1)
        assert result.seeds == [cfg["seed"] + j for j in range(n)] and result.extras["pipeline"] == family
        alone = gen.generate(prompt, output_type="np", progress=False, **cfg, **extra)
        assert len(result.latencies.denoising_step_ms) == len(alone.latencies.denoising_step_ms)
        np.testing.assert_allclose(result.images, alone.images, atol=1e-4, rtol=0)
    # Both sizes ran, each in its own calls; some call ran more rows than any one request has (shared),
    # and the 64x64 calls changed their row count as requests joined and left.
    print(f"{family}: buckets {sorted(buckets)}, transformer calls (rows, latent height) {recording.calls}")
    assert {"64x64", "48x80"} <= buckets
    rows_64 = [rows for rows, h in recording.calls if h == 8]
    assert max(rows_64) > 4 and len(set(rows_64)) > 1
    assert {h for _, h in recording.calls} == {8, 6}


def test_text_length_buckets_run_the_base_weights():
    """A DiT bucket's T5 length is not a weight selection: the swap-hold policy sees base weights."""
    from fastgen.runtime.step_policy import weights_of

    assert weights_of((64, 64)) is None
    assert weights_of((64, 64, ("text_tokens", 128))) is None
    selection = object()
    assert weights_of((64, 64, selection)) is selection
    assert weights_of((64, 64, selection, ("text_tokens", 128))) is selection
