"""PyTorch engines: eager / compiled execution, CUDA graphs, pickle-free save and load."""

from __future__ import annotations

import copy
import json
import pickle

import pytest
import torch
from torch import nn

from fastgen.engines.cache import read_manifest, verify_dir, write_manifest
from fastgen.engines.config import ExecutionOptions
from fastgen.engines.torch_backend import (
    WEIGHTS_FILE,
    TorchEngine,
    load_torch_engine,
    load_weights,
    save_torch_engine,
)
from fastgen.errors import InvalidArgumentError, UnsupportedError
from fastgen.models.component import Component
from fastgen.models.spec import ExportSpec, ShapeProfile, TensorSpec

CUDA = torch.cuda.is_available()


def reference(component: Component, inputs: dict) -> dict:
    """The oracle: an untouched fp32 copy of the module."""
    module = copy.deepcopy(component.module).float().eval()
    with torch.no_grad():
        outs = module(*(inputs[n] for n in component.spec.input_names))
    return dict(zip(component.spec.output_names, outs, strict=True))


@pytest.mark.parametrize(("batch", "height", "width"), [(1, 8, 8), (3, 10, 14), (4, 32, 16)])
def test_fp32_is_bit_exact_with_the_module(conv, batch, height, width):
    inputs = conv.spec.sample_inputs({"batch": batch, "height": height, "width": width}, seed=batch)
    want = reference(conv, inputs)
    got = TorchEngine(conv).run(inputs)
    assert list(got) == ["features", "pooled"]
    for name in want:
        assert torch.equal(got[name], want[name])
        assert not got[name].requires_grad


def test_bf16_on_cpu(conv):
    inputs = conv.spec.sample_inputs("opt")
    want = reference(conv, inputs)
    engine = TorchEngine(conv, precision="bf16")
    assert all(p.dtype == torch.bfloat16 for p in engine.module.parameters())
    got = engine.run(inputs)  # fp32 inputs are cast to the engine's bf16
    for name in want:
        assert got[name].dtype == torch.bfloat16
        torch.testing.assert_close(got[name].float(), want[name], rtol=5e-2, atol=5e-2)


def test_int_inputs_and_non_contiguous(tokens):
    ids = torch.randint(0, 50, (6, 3)).t()  # (3, 6), not contiguous
    mask = torch.ones(3, 6, dtype=torch.int64)
    mask[1, 4:] = 0
    got = TorchEngine(tokens).run(ids=ids, mask=mask)["pooled"]
    assert torch.equal(got, reference(tokens, {"ids": ids, "mask": mask})["pooled"])


def test_single_tensor_and_wrong_output_count():
    class Single(nn.Module):
        def forward(self, x):  # (batch, 4) -> (batch, 4): a bare tensor, not a tuple
            return x * 2

    spec = ExportSpec(component="s", inputs=(TensorSpec("x", "float32", ("batch", 4)),),
                      outputs=(TensorSpec("y", "float32", ("batch", 4)),), profile=ShapeProfile.of(batch=(1, 1, 4)))
    module = Single()
    x = torch.randn(2, 4)
    assert torch.equal(TorchEngine(Component("s", module, spec, module)).run(x=x)["y"], x * 2)
    two = ExportSpec(component="s", inputs=spec.inputs, outputs=(*spec.outputs, TensorSpec("z", "float32", (1,))),
                     profile=spec.profile)
    with pytest.raises(UnsupportedError, match="returned 1 outputs"):
        TorchEngine(Component("s", module, two, module)).run(x=x)


def test_cuda_graphs_need_cuda(mlp):
    with pytest.raises(UnsupportedError, match="torch backend on cpu.*CUDA graphs"):
        TorchEngine(mlp, execution=ExecutionOptions(cuda_graphs=True))
    with pytest.raises(InvalidArgumentError, match="precision"):
        TorchEngine(mlp, precision="int8")


@pytest.mark.slow
def test_torch_compile_matches_eager(mlp):
    x = torch.randn(3, 16)
    want = reference(mlp, {"x": x})["y"]
    engine = TorchEngine(mlp, execution=ExecutionOptions(compile="default"))
    torch.testing.assert_close(engine.run(x=x)["y"], want, rtol=1e-5, atol=1e-6)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_graphs_replay_per_shape(conv):
    eager = TorchEngine(copy.deepcopy(conv), device="cuda")
    graphed = TorchEngine(conv, device="cuda", execution=ExecutionOptions(cuda_graphs=True))
    for shape in [{"batch": 1, "height": 8}, {"batch": 3, "height": 16}, {"batch": 1, "height": 8}]:
        for seed in (0, 1):  # new values in the same shape bucket must be picked up
            inputs = conv.spec.sample_inputs({**shape, "width": 12}, seed=seed, device="cuda")
            got, want = graphed.run(inputs), eager.run(inputs)
            for name in want:
                torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5)
    assert len(graphed._graphs) == 2
    first = graphed.run(conv.spec.sample_inputs({"batch": 1, "height": 8, "width": 12}, device="cuda"))
    graphed.run(conv.spec.sample_inputs({"batch": 1, "height": 8, "width": 12}, seed=5, device="cuda"))
    again = graphed.run(conv.spec.sample_inputs({"batch": 1, "height": 8, "width": 12}, device="cuda"))
    assert torch.equal(first["features"], again["features"])  # returned outputs are clones


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_fp16_on_cuda(conv):
    inputs = conv.spec.sample_inputs("opt")
    want = reference(conv, inputs)
    got = TorchEngine(conv, device="cuda", precision="fp16").run(inputs)
    for name in want:
        assert got[name].dtype == torch.float16 and got[name].device.type == "cuda"
        torch.testing.assert_close(got[name].float().cpu(), want[name], rtol=1e-2, atol=1e-2)


def test_custom_modules_cannot_be_saved(mlp, tmp_path):
    with pytest.raises(UnsupportedError, match="torch engines of custom nn.Modules can't be saved"):
        save_torch_engine(mlp, tmp_path, "fp32")


class Tied(nn.Module):
    """An embedding tied to the output projection, as transformers language models do."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight
        self.register_buffer("position_ids", torch.arange(7))
        self.both = nn.Parameter(torch.randn(6))
        self.first_half = nn.Parameter(self.both.data[:3])  # shares memory, but a different tensor


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_weights_tied_and_shared_tensors_round_trip(tmp_path, precision, monkeypatch):
    model = Tied()
    spec = ExportSpec(component="t", inputs=(TensorSpec("x", "float32", (1,)),),
                      outputs=(TensorSpec("y", "float32", (1,)),))
    component = Component("t", model, spec, model, source={"library": "test", "class": "Tied"})
    assert save_torch_engine(component, tmp_path, precision) == [WEIGHTS_FILE]
    assert [p.name for p in tmp_path.iterdir()] == [WEIGHTS_FILE]  # no temp files left

    def refuse(*args, **kwargs):
        raise AssertionError("pickle must never be loaded")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    state = load_weights(tmp_path / WEIGHTS_FILE)
    original = model.state_dict()
    assert set(state) == set(original)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    for name, tensor in original.items():
        want = tensor.to(dtype) if tensor.is_floating_point() else tensor
        assert state[name].dtype == want.dtype
        assert torch.equal(state[name], want)
    assert state["head.weight"] is state["emb.weight"]  # tied again after loading
    restored = Tied()
    restored.load_state_dict(state)
    assert restored.head.weight is restored.emb.weight


def test_tiny_unet_save_and_load(tmp_path, monkeypatch):
    models = pytest.importorskip("fastgen.models")
    if not hasattr(models, "rebuild_component"):
        pytest.skip("fastgen.models.rebuild_component is not written yet")
    component = models.load_component("tiny", "unet")
    inputs = component.spec.sample_inputs("min")
    want = reference(component, inputs)
    artifacts = save_torch_engine(component, tmp_path, "fp32")
    manifest = write_manifest(tmp_path, {"backend": "torch", "precision": "fp32", "device": "cpu",
                                         "spec": component.spec.to_dict(), "source": component.source})
    assert set(manifest["artifacts"]) == set(artifacts)
    json.dumps(read_manifest(tmp_path))  # the recipe is plain JSON

    def refuse(*args, **kwargs):
        raise AssertionError("pickle must never be loaded")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    engine = load_torch_engine(tmp_path, verify_dir(tmp_path), device="cpu")
    assert engine.backend == "torch" and engine.path == tmp_path
    got = engine.run(inputs)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-5)


def test_runtime_attention_option_routes_attention_through_fastgen():
    """ExecutionOptions(attention=...) runs fastgen.optimize on the engine's module; outputs stay equal."""
    from fastgen.models import load_component
    from fastgen.ops.attention_diffusers import FastgenAttnProcessor

    unet = load_component("tiny", "unet")
    inputs = unet.spec.sample_inputs({"batch": 2, "height": 64, "width": 64, "seq": 77}, seed=0)
    want = TorchEngine(unet)(inputs)
    engine = TorchEngine(unet, execution=ExecutionOptions(attention="reference"))
    procs = [m.processor for m in engine.module.modules() if hasattr(m, "processor")]
    assert procs and all(isinstance(p, FastgenAttnProcessor) for p in procs)
    got = engine(inputs)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=2e-5)
    with pytest.raises(InvalidArgumentError, match="attention"):
        ExecutionOptions(attention="flash")
