"""ONNX Runtime engines against PyTorch fp32 on the same tiny models."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from fastgen.engines.config import ExecutionOptions
from fastgen.engines.ort_backend import (
    CPU_EP,
    CUDA_EP,
    TRT_EP,
    OrtEngine,
    available_providers,
    select_providers,
)
from fastgen.engines.torch_backend import TorchEngine
from fastgen.errors import InvalidArgumentError, UnsupportedError

HAS_ORT_CUDA = torch.cuda.is_available() and CUDA_EP in available_providers()


@pytest.fixture
def conv_engines(conv, onnx_export, tmp_path):
    path = onnx_export(conv, tmp_path / "conv.onnx")
    return OrtEngine(path, conv.spec), TorchEngine(conv)


@pytest.mark.parametrize(("batch", "height", "width"), [(1, 8, 8), (3, 10, 14), (4, 32, 16), (2, 16, 30)])
def test_ort_matches_torch(conv_engines, batch, height, width):
    ort_engine, torch_engine = conv_engines
    inputs = ort_engine.spec.sample_inputs({"batch": batch, "height": height, "width": width}, seed=batch)
    got, want = ort_engine.run(inputs), torch_engine.run(inputs)
    assert list(got) == ["features", "pooled"]
    for name in want:
        assert got[name].dtype == torch.float32 and got[name].device.type == "cpu"
        assert got[name].shape == want[name].shape
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5)


def test_non_contiguous_and_numpy_inputs(conv_engines):
    ort_engine, torch_engine = conv_engines
    image = torch.randn(2, 3, 16, 12).transpose(2, 3)  # (2, 3, 12, 16), not contiguous
    assert not image.is_contiguous()
    scale = torch.rand(4)[::2]  # strided view
    want = torch_engine.run(image=image.contiguous(), scale=scale.contiguous())
    got = ort_engine.run(image=image, scale=scale)
    torch.testing.assert_close(got["features"], want["features"], rtol=1e-4, atol=1e-5)
    got_np = ort_engine.run({"image": image.numpy(), "scale": scale.numpy()})
    got_grad = ort_engine.run(image=image.requires_grad_(), scale=scale)  # autograd leaves are fine
    torch.testing.assert_close(got_grad["pooled"], want["pooled"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got_np["pooled"], want["pooled"], rtol=1e-4, atol=1e-5)


def test_integer_inputs(tokens, onnx_export, tmp_path):
    engine = OrtEngine(onnx_export(tokens, tmp_path / "t.onnx"), tokens.spec)
    for batch, seq in [(1, 1), (3, 7), (4, 16)]:
        inputs = tokens.spec.sample_inputs({"batch": batch, "seq": seq}, seed=seq)
        inputs["ids"] = inputs["ids"].to(torch.int32)  # int32 ids are widened, as the spec says int64
        torch.testing.assert_close(engine.run(inputs)["pooled"], tokens(inputs)["pooled"], rtol=1e-5, atol=1e-6)


def test_session_options_and_provider_log(mlp, onnx_export, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="fastgen.engines.ort_backend")
    execution = ExecutionOptions(graph_optimization="basic", intra_op_threads=1, inter_op_threads=1)
    engine = OrtEngine(onnx_export(mlp, tmp_path / "m.onnx"), mlp.spec, execution=execution)
    options = engine._session.get_session_options()
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (1, 1)
    assert int(options.graph_optimization_level) == 1  # ORT_ENABLE_BASIC
    assert engine.providers == [CPU_EP]
    assert "runs with CPUExecutionProvider" in caplog.text
    x = torch.randn(5, 16)
    torch.testing.assert_close(engine.run(x=x)["y"], mlp({"x": x})["y"], rtol=1e-5, atol=1e-6)


def test_cpu_device_ignores_gpu_provider_with_warning(mlp, onnx_export, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="fastgen.engines.ort_backend")
    engine = OrtEngine(onnx_export(mlp, tmp_path / "m.onnx"), mlp.spec,
                       execution=ExecutionOptions(execution_provider="cuda"))
    assert engine.providers == [CPU_EP] and engine.device.type == "cpu"
    assert "needs a CUDA device" in caplog.text


@pytest.mark.skipif(HAS_ORT_CUDA, reason="checks the error of a CPU-only onnxruntime")
def test_cuda_device_without_cuda_provider_raises(mlp, onnx_export, tmp_path):
    with pytest.raises(UnsupportedError, match="onnxruntime backend on cuda.*no CUDA execution provider"):
        OrtEngine(onnx_export(mlp, tmp_path / "m.onnx"), mlp.spec, device="cuda")


def test_select_providers():
    cuda = torch.device("cuda")
    everything = [TRT_EP, CUDA_EP, CPU_EP]
    assert [p for p, _ in select_providers(cuda, "auto", everything)] == [TRT_EP, CUDA_EP, CPU_EP]
    assert [p for p, _ in select_providers(cuda, "auto", [CUDA_EP, CPU_EP])] == [CUDA_EP, CPU_EP]
    assert [p for p, _ in select_providers(cuda, "cuda", everything)] == [CUDA_EP, CPU_EP]
    assert [p for p, _ in select_providers(cuda, "tensorrt", [CUDA_EP, CPU_EP])] == [CUDA_EP, CPU_EP]
    options = {CUDA_EP: {"device_id": 1}}
    assert select_providers(cuda, "cuda", everything, provider_options=options)[0] == (CUDA_EP, {"device_id": 1})
    assert select_providers(torch.device("cpu"), "auto", everything) == [(CPU_EP, {})]
    with pytest.raises(UnsupportedError, match="onnxruntime"):
        select_providers(cuda, "auto", [CPU_EP])


def test_bf16_is_refused(mlp, onnx_export, tmp_path):
    with pytest.raises(UnsupportedError, match="onnxruntime backend: bf16"):
        OrtEngine(onnx_export(mlp, tmp_path / "m.onnx"), mlp.spec, precision="bf16")


def test_spec_must_match_graph(mlp, conv, onnx_export, tmp_path):
    with pytest.raises(InvalidArgumentError, match="do not match the spec"):
        OrtEngine(onnx_export(mlp, tmp_path / "m.onnx"), conv.spec)
    with pytest.raises(InvalidArgumentError, match="no such ONNX file"):
        OrtEngine(tmp_path / "missing.onnx", mlp.spec)


def test_describe(conv_engines):
    ort_engine, _ = conv_engines
    info = ort_engine.describe()
    assert info["backend"] == "onnxruntime" and info["precision"] == "fp32" and info["device"] == "cpu"
    assert [t["name"] for t in info["inputs"]] == ["image", "scale"]
    assert "OrtEngine conv onnxruntime/fp32 on cpu" in repr(ort_engine)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_ORT_CUDA, reason="needs a GPU and onnxruntime-gpu")
@pytest.mark.parametrize("provider", ["cuda", "auto"])
def test_cuda_io_binding_matches_torch(conv, onnx_export, tmp_path, provider):
    path = onnx_export(conv, tmp_path / "conv.onnx")
    ort_engine = OrtEngine(path, conv.spec, device="cuda", execution=ExecutionOptions(execution_provider=provider))
    assert ort_engine.providers[0] in (CUDA_EP, TRT_EP)
    torch_engine = TorchEngine(conv, device="cuda")
    for batch, height in [(1, 8), (3, 14)]:
        inputs = conv.spec.sample_inputs({"batch": batch, "height": height, "width": 10}, device="cuda")
        got, want = ort_engine.run(inputs), torch_engine.run(inputs)
        for name in want:
            assert got[name].device.type == "cuda"
            torch.testing.assert_close(got[name], want[name], rtol=1e-3, atol=1e-4)


def _nonzero_onnx(path) -> None:
    """A graph whose output length depends on the data: x (N,) -> indices of non-zeros (1, ?)."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("NonZero", ["x"], ["idx"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N"])],
                              [helper.make_tensor_value_info("idx", TensorProto.INT64, [1, None])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_ORT_CUDA, reason="needs a GPU and onnxruntime-gpu")
def test_cuda_data_dependent_output_shape(tmp_path):
    # NonZero's output length depends on the data: bound to the device and read back via DLPack.
    _nonzero_onnx(tmp_path / "nz.onnx")
    from fastgen.engines.loading import load_engine

    engine = load_engine(tmp_path / "nz.onnx", device="cuda")
    x = torch.tensor([0.0, 1.0, 0.0, 2.0, 3.0], device="cuda")
    out = engine.run(x=x)["idx"]
    assert out.device.type == "cuda"
    assert out.cpu().tolist() == [[1, 3, 4]]


def test_numpy_outputs_are_owned(conv_engines):
    ort_engine, _ = conv_engines
    inputs = ort_engine.spec.sample_inputs("opt")
    a = ort_engine.run(inputs)["pooled"]
    b = ort_engine.run(inputs)["pooled"]
    a.add_(1.0)  # writable and independent of the next call
    assert not torch.equal(a, b)
    assert np.isfinite(b.numpy()).all()


def test_io_binding_path_on_cpu(conv_engines):
    """The IO-binding code that CUDA engines use, exercised with CPU buffers."""
    ort_engine, torch_engine = conv_engines
    for batch, height in [(1, 8), (3, 14)]:
        inputs = ort_engine.spec.sample_inputs({"batch": batch, "height": height, "width": 10}, seed=height)
        got = ort_engine._run_bound(ort_engine.prepare_inputs(inputs))
        want = torch_engine.run(inputs)
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5)


def test_io_binding_data_dependent_output_on_cpu(tmp_path):
    # NonZero's output length depends on the data: onnxruntime allocates it and we convert it back.
    _nonzero_onnx(tmp_path / "nz.onnx")
    from fastgen.engines.loading import load_engine

    engine = load_engine(tmp_path / "nz.onnx")
    x = torch.tensor([0.0, 1.0, 0.0, 2.0, 3.0])
    assert engine.spec.resolve({"N": 5})["idx"] is None
    assert engine.run(x=x)["idx"].tolist() == [[1, 3, 4]]
    assert engine._run_bound(engine.prepare_inputs({"x": x}))["idx"].tolist() == [[1, 3, 4]]


def test_ortvalue_conversion_fallback_without_dlpack():
    from fastgen.engines.ort_backend import _ortvalue_to_torch

    class OldOrtValue:  # an onnxruntime without DLPack export
        def _get_c_value(self):
            return object()

    host = np.arange(6, dtype=np.int64).reshape(2, 3)
    out = _ortvalue_to_torch(OldOrtValue(), torch.device("cpu"), lambda: host)
    assert out.dtype == torch.int64 and out.tolist() == host.tolist()


def test_spin_wait_is_a_runtime_option():
    from fastgen.engines.config import ExecutionOptions
    from fastgen.engines.ort_backend import session_options

    assert session_options(ExecutionOptions()).get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert session_options(ExecutionOptions(spin_wait=True)).get_session_config_entry(
        "session.intra_op.allow_spinning") == "1"
