"""Issue 15 (hardening): numerics and pipeline inputs, probed as a hostile user would: int8
quantization that never hides NaN, non-finite weights refused, non-finite model outputs (UNet, VAE,
logits) failing only their own request, seeds, prompts and texts validated, calibration checked before
any work, and counts no machine could serve (steps, images per call) refused up front.

The generator and scorers are small fakes (``conftest.py``: the real specs' shapes, arithmetic instead
of models), so the file runs in seconds; any call that could hang runs in a thread with a hard timeout
(``hangs.within``), so a regression fails instead of hanging CI. Images and videos are in
``test_images.py``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from pipeline_fakes import CLASSIFIER_SPEC, GEN, POISON, SCHEDULER, UNET_SPEC, one_line_error, refused

from fastgen.errors import FastgenError, NumericalError
from fastgen.pipelines import stepping, vae_images
from fastgen.pipelines.config import MAX_SEED, GenerateConfig

# --- 1. int8 quantization never hides NaN ----------------------------------------------------------

def test_int8_per_token_keeps_a_non_finite_row_nan_and_finite_rows_bit_identical():
    from fastgen.ops import quant as q

    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(0))
    wq, ws = q.quantize_weight(torch.randn(8, 32, generator=torch.Generator().manual_seed(1)), dtype="int8")
    clean_q, clean_s = q.quantize_per_token(x, backend="reference")
    clean = q.int8_gemm(clean_q, clean_s, wq, ws, out_dtype=torch.float32, backend="reference")
    for bad in (float("nan"), float("inf"), float("-inf")):
        y = x.clone()
        y[1, 5] = bad
        xq, xs = q.quantize_per_token(y, backend="reference")
        assert torch.isnan(xs[1]) and torch.equal(xs[[0, 2, 3]], clean_s[[0, 2, 3]])
        assert torch.equal(xq[[0, 2, 3]], clean_q[[0, 2, 3]])
        out = q.int8_gemm(xq, xs, wq, ws, out_dtype=torch.float32, backend="reference")
        assert torch.isnan(out[1]).all() and torch.equal(out[[0, 2, 3]], clean[[0, 2, 3]])
    zero = q.quantize_per_token(torch.zeros(2, 8), backend="reference")[1]
    assert torch.equal(zero, torch.ones(2))  # an all-zero row keeps scale 1


@pytest.mark.parametrize("preset", ["dynamic", "static"])
def test_quantized_linear_propagates_a_nan_row(preset):
    from fastgen.quant import calibrate, quantize_
    from fastgen.quant.config import Int8DynamicConfig, Int8StaticConfig

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 8))
    x = torch.randn(3, 16)
    config = Int8DynamicConfig(skip=()) if preset == "dynamic" else Int8StaticConfig(skip=())
    if preset == "static":
        calibrate(net, [x])
    quantize_(net, config)
    clean = net(x)
    for bad in (float("nan"), float("inf")):
        y = x.clone()
        y[2, 3] = bad
        out = net(y)
        assert torch.isnan(out[2]).all() and torch.equal(out[:2], clean[:2])


def test_non_finite_weights_are_refused_naming_the_layer():
    from fastgen.ops import quant as q
    from fastgen.quant import quantize_
    from fastgen.quant.config import Int4WeightOnlyConfig, Int8DynamicConfig

    for bad in (float("nan"), float("inf")):
        net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
        with torch.no_grad():
            net[1].weight[3, 2] = bad
        for config in (Int8DynamicConfig(skip=()), Int4WeightOnlyConfig(skip=(), group_size=32)):
            refused(lambda n=net, c=config: quantize_(n, c), "'1'", "non-finite")
            assert type(net[0]) is torch.nn.Linear  # nothing replaced
        refused(lambda w=net[1].weight: q.quantize_weight(w, dtype="int8"), "non-finite")


# --- 2. non-finite model outputs are errors, per request -------------------------------------------

def test_nan_unet_fails_naming_step_and_prompt(gen):
    ok = gen.generate(["fine", "also fine"], seed=1, **GEN)
    assert len(ok.images) == 2
    refused(lambda: gen.generate(["fine", f"a {POISON} prompt"], seed=1, **GEN), "prompt 1", "step 1",
            error=NumericalError)
    assert issubclass(NumericalError, FastgenError)  # the CLI's one-line error path


def test_unet_step_reports_only_the_affected_request(gen):
    """What the batched runtime relies on: one state's NaN is that state's error, the others advance."""
    states = [stepping.prepare(gen, p, GenerateConfig(steps=2, height=32, width=32), seed=3)
              for p in ("fine", POISON, "fine too")]
    stepping.encode_prompts(gen, states)
    stepping.init_latents(gen, states)
    before = states[1].latents.clone()
    errors = stepping.denoise_step(gen, states)
    assert errors[0] is None and errors[2] is None and isinstance(errors[1], NumericalError)
    assert [s.index for s in states] == [1, 0, 1] and torch.equal(states[1].latents, before)
    rows = torch.zeros(5, 2, 2)
    rows[3, 1, 0] = float("inf")
    assert stepping.nonfinite_rows(rows) == [3] and stepping.nonfinite_rows(rows[:3]) == []


def test_runtime_fails_only_the_request_that_went_nan(gen):
    import fastgen
    from fastgen.runtime import GenerateRequest

    cfg = GenerateConfig(steps=2, height=32, width=32, seed=4, output_type="uint8")
    with fastgen.Runtime(gen) as rt:
        futures = [rt.submit(GenerateRequest(p, cfg)) for p in ("fine", f"a {POISON} prompt", "also fine")]
        errors = [f.exception(timeout=30) for f in futures]
    assert errors[0] is None and errors[2] is None and isinstance(errors[1], NumericalError)
    one_line_error(errors[1], "step 1")
    assert futures[0].result().images.shape == (1, 32, 32, 3)


def test_nan_vae_output_fails_naming_the_prompt(make_generator):
    bad = make_generator(vae_nan_rows=(2,))  # the first image of the second prompt
    refused(lambda: bad.generate(["a", "b"], seed=1, num_images_per_prompt=2, **GEN), "prompt 1",
            "VAE decoder", error=NumericalError)
    decoded = torch.zeros(2, 3, 4, 4)
    decoded[1, 0, 0, 0] = float("nan")
    for output_type in ("pil", "np", "uint8"):  # the runtime converts each request's images alone
        refused(lambda t=output_type: vae_images.to_output(decoded, t), "image(s) 1", error=NumericalError)


def test_nan_logits_fail_naming_the_input(image_scorer):
    white, dark = np.full((16, 16, 3), 255, np.uint8), np.zeros((16, 16, 3), np.uint8)
    assert len(image_scorer.score_images([white, white])) == 2
    refused(lambda: image_scorer.score_images([white, white, dark], batch_size=2), "images[2]",
            error=NumericalError)
    rows = image_scorer.score_rows(torch.tensor([[0.0, 1.0, 2.0], [float("nan"), 0.0, 0.0]]))
    assert rows[0].label == "label_2" and isinstance(rows[1], NumericalError)


# --- 3. seeds, prompts, texts, calibration ---------------------------------------------------------

def test_numpy_integer_seeds_are_seeds(gen):
    want = gen.generate("a", seed=3, output_type="latent", **GEN)
    for kwargs in ({"seed": np.int64(3)}, {"seeds": [np.int32(3)]}, {"seeds": np.array([3])},
                   {"config": GenerateConfig(seed=np.uint8(3))}):
        got = gen.generate("a", output_type="latent", **GEN, **kwargs)
        assert torch.equal(got.images, want.images) and got.seeds == [3] and type(got.seeds[0]) is int
        json.dumps(got.to_dict())  # numpy ints would not serialise
    state = stepping.prepare(gen, "a", GenerateConfig(steps=1), seed=np.int64(5))
    assert state.seeds == [5] and type(state.seeds[0]) is int


def test_every_reported_seed_is_a_valid_seed(gen, image_scorer):
    refused(lambda: GenerateConfig(seed=MAX_SEED, num_images_per_prompt=2), "seed", str(MAX_SEED - 1))
    result = gen.generate("a", seed=MAX_SEED - 1, num_images_per_prompt=2, output_type="latent", **GEN)
    assert result.seeds == [MAX_SEED - 1, MAX_SEED]
    for s in result.seeds:
        GenerateConfig(seed=s)  # what was reported is accepted back
    for kwargs in ({"seeds": [MAX_SEED], "num_images_per_prompt": 2},
                   {"seed": MAX_SEED, "candidates": 2, "scorer": image_scorer}):
        refused(lambda kw=kwargs: gen.generate("a", **GEN, **kw), "seed")
    refused(lambda: stepping.prepare(gen, "a", GenerateConfig(steps=1), seed=MAX_SEED, images=2), "seed")


def test_bad_prompts_name_their_index(gen):
    for prompts, needle in ((["a", None], "prompts[1]"), (["a", "b", 3], "prompts[2]"), (b"abc", "prompts"),
                            (["ok", "bad \udcff utf-8"], "prompts[1]"), (["x" * 2_000_000], "prompts[0]")):
        refused(lambda prompts=prompts: gen.generate(prompts, seed=1, **GEN), needle)
    for negative in ("\ud800", "n" * 2_000_000):
        refused(lambda n=negative: GenerateConfig(negative_prompt=n), "negative-prompt")
    refused(lambda: stepping.prepare(gen, "lone \udcff", GenerateConfig(steps=1)), "prompt")
    assert len(gen.generate("nul \x00 inside", seed=1, **GEN).images) == 1  # NUL is a character like others
    for field, value in (("guidance_scale", float("inf")), ("guidance_scale", float("-inf")),
                         ("guidance_scale", -0.5), ("strength", 1.0001), ("strength", -1e-9),
                         ("strength", float("nan")), ("eta", float("inf"))):
        refused(lambda kw={field: value}: GenerateConfig(**kw), field.replace("_", "-"))


def test_texts_with_lone_surrogates_or_huge_are_refused(text_scorer):
    assert len(text_scorer.score_texts(["fine", "nul \x00 too"])) == 2
    for texts, needle in ((["ok", "bad \udcff"], "texts[1]"), (["y" * 2_000_000], "texts[0]")):
        refused(lambda texts=texts: text_scorer.score_texts(texts), needle)
    prep = text_scorer.text_preprocessor  # the runtime's path: encode at submission
    refused(lambda: prep.encode("\ud800"), "surrogate")
    refused(lambda: prep.encode_batch(["ok", "\ud800"]), "texts[1]")


class _Counting(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(16, 3)
        self.calls = 0

    def forward(self, pixel_values):
        self.calls += 1
        return (self.fc(pixel_values.mean(dim=(2, 3)).repeat(1, 6)[:, :16]),)


def test_calibration_is_validated_before_any_work():
    from fastgen.models.component import Component
    from fastgen.quant.components import quantize_component
    from fastgen.quant.config import Int8StaticConfig

    module = _Counting()
    comp = Component("classifier", module, CLASSIFIER_SPEC, module)
    good = torch.randn(2, 3, 16, 16)
    config, first = Int8StaticConfig(skip=()), "calibration[0]"
    cases = [([], "calibration"), (42, "calibration"), ([(good, good)], first), ([("x",)], first),
             ([good, torch.randn(2, 3, 16)], "calibration[1]"), ([good.long()], first),
             ([{"pixels": good}], first), ([torch.randn(2, 3, 8, 8)], first),
             ([torch.full((1, 3, 16, 16), float("nan"))], first)]
    for calibration, needle in cases:
        refused(lambda c=calibration: quantize_component(comp, config, calibration=c), needle)
        assert module.calls == 0  # refused before the first forward pass
    quantized = quantize_component(comp, config, calibration=iter([(good,), {"pixel_values": good}]))
    assert module.calls == 0 and quantized.module.calls == 2  # a one-shot iterator still calibrates


def test_unet_calibration_loop_checks_its_arguments_up_front():
    from fastgen.models.component import Component
    from fastgen.models.metadata import UNetMetadata
    from fastgen.pipelines.calibration import denoise, unet_calibration_loop

    comp = Component("unet", torch.nn.Identity(), UNET_SPEC, torch.nn.Identity(),
                     metadata=UNetMetadata(scheduler=SCHEDULER))
    for kwargs, needle in (({"height": 40, "width": 32, "steps": 2}, "height"),
                           ({"height": 32, "width": 32, "steps": 0}, "steps"),
                           ({"height": 32, "width": 32, "steps": 2, "seeds": ()}, "seeds"),
                           ({"height": 32, "width": 32, "steps": 2, "seeds": (1, "2")}, "seeds")):
        refused(lambda kwargs=kwargs: unet_calibration_loop(comp, **kwargs), needle)  # before any loop runs
    for kwargs, needle in (({"batch": 0}, "batch"), ({"guidance": float("nan")}, "guidance"),
                           ({"seed": -1}, "seed")):
        refused(lambda kw=kwargs: denoise(comp.module, comp, height=32, width=32, steps=1, **kw), needle)


# --- 4. counts no machine could serve: steps, and images per call ----------------------------------

def test_step_counts_above_the_cap_are_refused(gen):
    """``steps=10**9`` (a typo) asked the scheduler for a billion-entry schedule: refused at once."""
    from fastgen.pipelines.config import MAX_STEPS

    assert MAX_STEPS == 1000 and GenerateConfig(steps=MAX_STEPS).steps == MAX_STEPS
    for bad in (MAX_STEPS + 1, 10**9, np.int64(MAX_STEPS + 1)):
        refused(lambda b=bad: GenerateConfig(steps=b), "steps", "1000")
    refused(lambda: gen.generate("a", seed=1, **{**GEN, "steps": 10**9}), "steps", "1000")


def test_image_counts_no_machine_could_hold_are_refused_before_any_work(gen, image_scorer, monkeypatch):
    """Every image of a call is decoded in one float32 batch: ``num_images_per_prompt=10**9`` asked for
    terabytes and was killed by the kernel. Now refused before any engine runs, naming the count."""
    monkeypatch.setattr("fastgen.models.spec.memory_limit_bytes", lambda: 1 << 30)  # the same on every machine
    assert len(gen.generate("a", seed=1, num_images_per_prompt=2, **GEN).images) == 2  # what fits still runs

    def never(inputs):
        raise AssertionError("an engine ran before the image count was checked")

    for engine in (gen.text_encoder, gen.unet, gen.vae_decoder):
        monkeypatch.setattr(engine, "fn", never)
    refused(lambda: gen.generate("a", seed=1, num_images_per_prompt=10**6, **GEN), "num-images-per-prompt",
            "memory")
    refused(lambda: gen.generate(["a"] * 100, seed=1, num_images_per_prompt=1000, **GEN),  # 100000 in all
            "num-images-per-prompt", "memory")
    refused(lambda: gen.generate("a", seed=1, candidates=10**6, scorer=image_scorer, **GEN), "candidates",
            "memory")
