"""benchmark(): result structure, batch handling and profile checks (no timing assertions)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fastgen.engines.bench import BenchResult, batch_symbol, benchmark
from fastgen.engines.ort_backend import OrtEngine
from fastgen.engines.torch_backend import TorchEngine
from fastgen.errors import InvalidArgumentError
from fastgen.models.component import Component
from fastgen.models.spec import ExportSpec, ShapeProfile, TensorSpec


class Counting(TorchEngine):
    """Records the shapes it is run at."""

    def _run(self, inputs):
        self.seen.append({n: tuple(t.shape) for n, t in inputs.items()})
        return super()._run(inputs)


@pytest.fixture
def conv_engine(conv):
    engine = Counting(conv)
    engine.seen = []
    return engine


def test_results_structure(conv_engine):
    reported = []
    results = benchmark(conv_engine, batches=[1, 3], shape={"height": 16}, warmup=2, iters=5, progress=reported.append)
    assert reported == results and [r.batch for r in results] == [1, 3]
    for r in results:
        assert isinstance(r, BenchResult) and r.iters == 5
        assert r.shape == {"batch": r.batch, "height": 16, "width": 16}  # width at the profile's opt
        assert 0 < r.p50_ms <= r.p90_ms <= r.p99_ms
        assert r.throughput == pytest.approx(r.batch / (r.mean_ms / 1e3))
        d = r.to_dict()
        assert set(d) == {"shape", "batch", "iters", "p50_ms", "p90_ms", "p99_ms", "mean_ms", "throughput"}
    # 2 warm-up + 5 timed calls per batch size, at the requested shapes
    assert conv_engine.seen == [{"image": (1, 3, 16, 16), "scale": (1,)}] * 7 + [{"image": (3, 3, 16, 16), "scale": (3,)}] * 7


def test_min_seconds_adds_iterations(mlp):
    (r,) = benchmark(TorchEngine(mlp), batches=[2], warmup=0, iters=1, min_seconds=0.05)
    assert r.iters >= 1 and r.iters * r.mean_ms >= 50 * 0.9


def test_onnxruntime_engine(mlp, onnx_export, tmp_path):
    engine = OrtEngine(onnx_export(mlp, tmp_path / "m.onnx"), mlp.spec)
    results = benchmark(engine, batches=[1, 8], iters=3)
    assert [r.shape for r in results] == [{"batch": 1}, {"batch": 8}]


def test_bad_arguments(conv_engine):
    for kwargs, match in [({"batches": []}, "batch"), ({"batches": [0]}, "batch"), ({"batches": [2.0]}, "batch"),
                          ({"batches": [1], "iters": 0}, "iters"), ({"batches": [1], "warmup": -1}, "warmup"),
                          ({"batches": [1], "shape": {"depth": 3}}, "shape 'depth'"),
                          ({"batches": [1], "shape": {"batch": 3}}, "batch size with batches")]:
        with pytest.raises(InvalidArgumentError, match=match):
            benchmark(conv_engine, **kwargs)


def test_strict_profile(conv):
    class Strict(TorchEngine):
        strict_profile = True

    with pytest.raises(InvalidArgumentError, match=r"invalid batch 5.*1 to 4"):
        benchmark(Strict(conv), batches=[2, 5], iters=1)
    with pytest.raises(InvalidArgumentError, match=r"invalid height 64"):
        benchmark(Strict(conv), batches=[1], shape={"height": 64}, iters=1)
    # Non-strict engines run outside the profile (with a logged note).
    assert benchmark(TorchEngine(conv), batches=[5], iters=1)[0].batch == 5


def static_component() -> Component:
    module = nn.Linear(4, 2).eval()

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = module

        def forward(self, x):  # (3, 4) -> (3, 2)
            return (self.m(x),)

    spec = ExportSpec(component="static", inputs=(TensorSpec("x", "float32", (3, 4)),),
                      outputs=(TensorSpec("y", "float32", (3, 2)),))
    return Component("static", Wrap(), spec, module)


def test_engine_without_dynamic_dims():
    engine = TorchEngine(static_component())
    assert batch_symbol(engine) is None
    (r,) = benchmark(engine, batches=[1], iters=2)
    assert (r.batch, r.shape) == (1, {})
    with pytest.raises(InvalidArgumentError, match="no dynamic batch dim"):
        benchmark(engine, batches=[1, 2])


def test_first_symbol_is_the_batch_when_there_is_no_batch():
    module = nn.Identity()
    spec = ExportSpec(component="c", inputs=(TensorSpec("x", "float32", ("N", "seq")),),
                      outputs=(TensorSpec("y", "float32", ("N", "seq")),),
                      profile=ShapeProfile.of(N=(1, 1, 16), seq=(1, 5, 9)))
    engine = TorchEngine(Component("c", module, spec, module))
    assert batch_symbol(engine) == "N"
    results = benchmark(engine, batches=[2, 4], iters=1)
    assert [r.shape for r in results] == [{"N": 2, "seq": 5}, {"N": 4, "seq": 5}]
    assert isinstance(results[0].p50_ms, float) and torch.is_tensor(engine.run(x=torch.ones(1, 1))["y"])
