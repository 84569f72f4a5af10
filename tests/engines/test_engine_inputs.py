"""Engine.run input validation: the same one-line errors on every backend."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastgen.engines.ort_backend import OrtEngine
from fastgen.engines.torch_backend import TorchEngine
from fastgen.errors import InvalidArgumentError


@pytest.fixture(params=["torch", "onnxruntime"])
def engines(request, conv, tokens, onnx_export, tmp_path):
    if request.param == "torch":
        return TorchEngine(conv), TorchEngine(tokens)
    return (OrtEngine(onnx_export(conv, tmp_path / "c.onnx"), conv.spec),
            OrtEngine(onnx_export(tokens, tmp_path / "t.onnx"), tokens.spec))


def good_conv():
    return {"image": torch.randn(2, 3, 8, 12), "scale": torch.ones(2)}


@pytest.mark.parametrize(("change", "match"), [
    (lambda d: d.pop("scale"), r"invalid input name 'scale': missing"),
    (lambda d: d.update(extra=torch.zeros(1)), r"invalid input name 'extra': not an input"),
    (lambda d: d.update(image=torch.randn(2, 3, 8)), r"invalid image shape \(2, 3, 8\).*rank 4"),
    (lambda d: d.update(image=torch.randn(2, 4, 8, 12)), r"invalid image shape.*axis 1 is fixed at 3"),
    (lambda d: d.update(scale=torch.ones(3)), r"invalid scale shape \(3,\).*'batch' is 2 in another input"),
    (lambda d: d.update(scale=[1.0, 1.0]), r"invalid scale 'list'"),
])
def test_bad_inputs_raise(engines, change, match):
    engine, _ = engines
    inputs = good_conv()
    change(inputs)
    with pytest.raises(InvalidArgumentError, match=match) as info:
        engine.run(inputs)
    assert "\n" not in str(info.value)


def test_float_for_int_input(engines):
    _, engine = engines
    with pytest.raises(InvalidArgumentError, match=r"invalid ids dtype 'torch.float32'.*int64"):
        engine.run(ids=torch.zeros(2, 5), mask=torch.ones(2, 5, dtype=torch.int64))
    with pytest.raises(InvalidArgumentError, match=r"invalid mask dtype.*int64"):
        engine.run(ids=torch.zeros(2, 5, dtype=torch.int64), mask=np.ones((2, 5), np.float32))


def test_int_for_float_input(engines):
    engine, _ = engines
    with pytest.raises(InvalidArgumentError, match=r"invalid image dtype 'torch.int64'.*floating point"):
        engine.run(image=torch.zeros(2, 3, 8, 12, dtype=torch.int64), scale=torch.ones(2))


def test_good_inputs_in_any_form(engines):
    engine, tok_engine = engines
    inputs = good_conv()
    want = engine.run(inputs)
    # keyword form, numpy, float64 (cast to the engine's float dtype)
    got = engine.run(image=inputs["image"].numpy(), scale=inputs["scale"].double())
    for name in want:
        assert torch.equal(got[name], want[name])
    out = tok_engine.run({"ids": np.zeros((1, 3), np.int64)}, mask=np.ones((1, 3), np.int32))
    assert out["pooled"].shape == (1, 8)


def test_strict_profile_engines_refuse_out_of_range_sizes(conv):
    class Strict(TorchEngine):
        strict_profile = True

    engine = Strict(conv)
    engine.run(conv.spec.sample_inputs({"batch": 4, "height": 32, "width": 8}))
    with pytest.raises(InvalidArgumentError, match=r"invalid batch 5.*1 to 4"):
        engine.run(conv.spec.sample_inputs({"batch": 5}))
    # A non-strict engine runs outside the profile.
    assert TorchEngine(conv).run(conv.spec.sample_inputs({"batch": 5}))["pooled"].shape == (5, 4)
