"""Generator, Scorer and Runtime on TensorRT engines (a TensorRT 11 stand-in on the CPU), like on the others.

The stand-in executes each plan's ONNX graph with onnxruntime, so the pipelines on TensorRT engines
must reproduce the onnxruntime backend's images and scores: what differs is only the backend's
binding of inputs, outputs, shapes and profiles, which is what is under test.
"""

from __future__ import annotations

import numpy as np
import pytest

from fastgen.engines.cache import EngineCache
from fastgen.engines.config import BuildConfig
from fastgen.export.config import ExportConfig
from fastgen.pipelines.config import GenerateConfig
from fastgen.pipelines.generator import Generator
from fastgen.pipelines.scorer import Scorer
from fastgen.runtime import GenerateRequest, Runtime

FAST = ExportConfig(verify="opt")


@pytest.mark.parametrize("trt", [11], indirect=True, ids=["trt11"])
def test_generator_and_runtime_on_tensorrt_engines(trt, tmp_path):
    cache = EngineCache(tmp_path / "cache")
    on_trt = Generator.from_pretrained("tiny", backend="tensorrt", device="cpu", cache=cache,
                                       build_config=BuildConfig(backend="tensorrt", export=FAST))
    on_ort = Generator.from_pretrained("tiny", backend="onnxruntime", device="cpu", cache=cache,
                                       build_config=BuildConfig(export=FAST))
    assert on_trt.unet.backend == "tensorrt" and on_trt.text_encoder.backend == "tensorrt"
    want = on_ort.generate(["a red car", "a dog"], steps=3, seed=5, output_type="np", progress=False).images
    got = on_trt.generate(["a red car", "a dog"], steps=3, seed=5, output_type="np", progress=False).images
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    with Runtime(on_trt) as rt:  # step-level batching over TensorRT engines: unchanged
        futures = [rt.submit(GenerateRequest(p, GenerateConfig(steps=3, seed=5, output_type="np")))
                   for p in ("a red car", "a dog")]
        served = np.concatenate([f.result(120).images for f in futures])
    np.testing.assert_allclose(served, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("trt", [11], indirect=True, ids=["trt11"])
def test_scorer_on_tensorrt_engines(trt, tmp_path):
    cache = EngineCache(tmp_path / "cache")
    texts = ["buy now", "a photo of a red sports car on a mountain road", "x"]
    on_trt = Scorer.from_pretrained("tiny", "text-classifier", backend="tensorrt", device="cpu", cache=cache)
    on_ort = Scorer.from_pretrained("tiny", "text-classifier", backend="onnxruntime", device="cpu", cache=cache)
    for got, want in zip(on_trt.score_texts(texts), on_ort.score_texts(texts), strict=True):
        np.testing.assert_allclose(got.logits, want.logits, atol=1e-5, rtol=0)
