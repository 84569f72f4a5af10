"""LoRA swaps per backend: torch in place (same storage, exact restore), onnxruntime overridable
initializers (fp32, fp16 and external-data graphs), TensorRT refits (on the stand-in), and engine
cache entries that adapters never touch. References: the PyTorch module with the same fused weights."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fastgen
from fastgen.engines.cache import EngineCache, verify_dir
from fastgen.engines.torch_backend import TorchEngine
from fastgen.errors import InvalidArgumentError, UnsupportedError
from fastgen.export.config import ExportConfig
from fastgen.lora import AdapterManager, LoraAdapter, LoraLayer
from fastgen.lora.torch_apply import TorchTarget
from fastgen.models import load_component

ATTN = ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
        "mid_block.attentions.0.transformer_blocks.0.attn2.to_k",  # (64, 32): cross-attention, not square
        "up_blocks.1.attentions.1.transformer_blocks.0.attn1.to_out.0",
        "down_blocks.0.attentions.0.proj_in", "conv_in"]  # proj_in: Linear or 1x1 conv; conv_in: 3x3 (LoCon)


def random_adapter(name: str, shapes: dict, modules: list[str], *, rank: int, seed: int, std: float = 0.3):
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for m in modules:
        out, inp, *kernel = shapes[m]
        up_shape = (out, rank, 1, 1) if kernel else (out, rank)
        layers[m] = LoraLayer(torch.randn(rank, inp, *kernel, generator=g) * std,
                              torch.randn(*up_shape, generator=g) * std, alpha=rank / 2)
    return LoraAdapter(name, {"unet": layers})


def _unet_inputs(spec, seed=0):
    return spec.sample_inputs({"batch": 3, "height": 48, "width": 32}, seed=seed)  # odd batch, 6x4 latents


def _torch_reference(adapters, weights):
    comp = load_component("tiny", "unet")
    manager = AdapterManager({"unet": TorchEngine(comp)})
    for a in adapters:
        manager.load(a)
    manager.set_adapters([a.name for a in adapters], weights)
    return comp


def test_torch_swap_is_in_place_and_restores_exactly():
    comp = load_component("tiny", "unet")
    target = TorchTarget(comp.model)
    shapes = target.weight_shapes()
    mods = dict(comp.model.named_modules())
    before = {m: (mods[m].weight.data_ptr(), mods[m].weight.detach().clone()) for m in ATTN}
    a = random_adapter("a", shapes, ATTN, rank=4, seed=1)
    b = random_adapter("b", shapes, ATTN[:2], rank=64, seed=2)
    manager = AdapterManager({"unet": TorchEngine(comp)})
    manager.load(a)
    manager.load(b, weight=-0.5)
    for _ in range(20):  # many swaps: no drift (the base is restored from a copy, not subtracted back)
        manager.set_adapters(["a", "b"], [0.3, 1.7])
        manager.set_adapters(["b"], [2.0])
    q = ATTN[0]
    want = before[q][1] + 2.0 * b.layers["unet"][q].delta()
    torch.testing.assert_close(mods[q].weight, want, rtol=0, atol=1e-6)
    manager.set_adapters([])
    for m, (ptr, weight) in before.items():
        assert mods[m].weight.data_ptr() == ptr  # same storage: compiled graphs / CUDA graphs stay valid
        assert torch.equal(mods[m].weight, weight)
    manager.unload()
    assert manager.adapters == {} and manager.selection.names == ()


def test_torch_fp16_weights_are_fused_in_float32_then_rounded_once():
    model = nn.Sequential(nn.Linear(8, 6)).half()
    target = TorchTarget(model)
    layer = LoraLayer(torch.randn(2, 8) * 0.03, torch.randn(6, 2) * 0.03, alpha=2.0)
    base = model[0].weight.detach().clone()
    target.prepare({"0"})
    target.apply({"0": [(layer, 0.5)]})
    assert model[0].weight.dtype == torch.float16
    torch.testing.assert_close(model[0].weight, (base.float() + 0.5 * layer.delta()).half())
    target.apply({})
    assert torch.equal(model[0].weight, base)


def test_manager_refuses_unknown_names_and_missing_components(generator_for):
    gen = generator_for("tiny", "torch")
    manager = AdapterManager({"unet": gen.unet})
    with pytest.raises(InvalidArgumentError, match=r"invalid adapter 'x'.*none loaded"):
        manager.set_adapters(["x"])
    te = LoraAdapter("te", {"text_encoder": {"encoder.layers.0.self_attn.q_proj": LoraLayer(
        torch.zeros(1, 32), torch.zeros(32, 1), 1.0)}})
    with pytest.raises(InvalidArgumentError, match="adapts text_encoder, which this pipeline has no engine of"):
        manager.load(te)
    with pytest.raises(UnsupportedError, match="quantized"):
        model = nn.Sequential(nn.Linear(4, 4))
        model[0].weight = nn.Parameter(torch.zeros(4, 4, dtype=torch.int8), requires_grad=False)
        TorchTarget(model).prepare({"0"})


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_every_adaptable_module_is_found(generator_for, backend):
    """The ONNX graphs map every Linear/Conv2d of the UNet and the text encoder to an initializer of
    the same (PyTorch-layout) shape, none shared."""
    gen = generator_for("tiny", backend)
    for engine, name in ((gen.unet, "unet"), (gen.text_encoder, "text-encoder")):
        torch_shapes = TorchTarget(load_component("tiny", name).model).weight_shapes()
        target = AdapterManager({"unet": engine}).target("unet")
        assert target.weight_shapes() == torch_shapes
        assert not getattr(target, "shared", set())


def test_ort_swap_matches_torch_and_keeps_the_cache_entry(generator_for, tmp_path):
    cache = EngineCache(tmp_path / "cache")
    engine = fastgen.build("tiny", component="unet", backend="onnxruntime", cache=cache,
                           export=ExportConfig(verify="opt"))
    shapes = AdapterManager({"unet": engine}).target("unet").weight_shapes()
    a, b = random_adapter("a", shapes, ATTN, rank=3, seed=3), random_adapter("b", shapes, ATTN[1:], rank=8, seed=4)
    inputs = _unet_inputs(engine.spec)
    base_out = engine.run(inputs)["out_sample"] if "out_sample" in engine.spec.output_names else None
    manager = AdapterManager({"unet": engine})
    manager.load(a)
    manager.load(b)
    for weights in ([0.6, -1.1], [0.0, 1.0]):
        manager.set_adapters(["a", "b"], weights)
        ref = _torch_reference([a, b], weights)
        got = engine.run(inputs)
        want = ref(inputs)
        for n in engine.spec.output_names:
            torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-4)
    manager.set_adapters([])
    assert engine.initializer_feeds == {}
    if base_out is not None:
        torch.testing.assert_close(engine.run(inputs)["out_sample"], base_out, rtol=0, atol=0)
    # Adapters are not part of the engine: its files are untouched and a rebuild is a cache hit.
    verify_dir(engine.path)
    again = fastgen.build("tiny", component="unet", backend="onnxruntime", cache=cache,
                          export=ExportConfig(verify="opt"))
    assert again.path == engine.path and again.manifest["cache_key"] == engine.manifest["cache_key"]
    assert again.manifest["built_at"] == engine.manifest["built_at"]


@pytest.mark.parametrize("variant", ["fp16", "external-data"])
def test_ort_fp16_and_external_data_graphs(tmp_path, variant):
    kwargs = ({"precision": "fp16"} if variant == "fp16" else {})
    export = ExportConfig(verify="opt", external_data="always" if variant == "external-data" else "auto")
    engine = fastgen.build("tiny", component="unet", backend="onnxruntime", cache=EngineCache(tmp_path / "c"),
                           export=export, **kwargs)
    manager = AdapterManager({"unet": engine})
    a = random_adapter("a", manager.target("unet").weight_shapes(), ATTN, rank=4, seed=5)
    manager.load(a, weight=0.8)
    inputs = _unet_inputs(engine.spec, seed=1)
    want = _torch_reference([a], [0.8])(inputs)
    got = engine.run(inputs)
    tol = 2e-2 if variant == "fp16" else 1e-4
    for n in engine.spec.output_names:
        torch.testing.assert_close(got[n].float(), want[n], rtol=tol, atol=tol)
    verify_dir(engine.path)


class _Attn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.to_q = nn.Linear(16, 16)
        self.to_out = nn.Sequential(nn.Linear(16, 8))

    def forward(self, x):  # (batch, seq, 16) -> (batch, seq, 8)
        return self.to_out(torch.relu(self.to_q(x)))


class _Wrapper(nn.Module):
    """Like fastgen's component wrappers: the library model under ``model``."""

    def __init__(self) -> None:
        super().__init__()
        self.model = _Attn()

    def forward(self, x):
        return (self.model(x),)


def _attn_component():
    from fastgen.models.component import Component
    from fastgen.models.spec import ExportSpec, ShapeProfile, TensorSpec

    torch.manual_seed(0)
    wrapper = _Wrapper().eval()
    spec = ExportSpec(component="unet", inputs=(TensorSpec("x", "float32", ("batch", 5, 16)),),
                      outputs=(TensorSpec("y", "float32", ("batch", 5, 8)),), profile=ShapeProfile.of(batch=(1, 2, 4)))
    return Component(name="unet", module=wrapper, spec=spec, model=wrapper.model)


def test_tensorrt_refit_applies_the_fused_weights(trt, tmp_path):
    from fastgen.engines.trt_options import TensorRTOptions

    comp = _attn_component()
    engine = fastgen.build(comp, backend="tensorrt", device="cpu", precision="fp32", cache=EngineCache(tmp_path / "c"),
                           tensorrt=TensorRTOptions(refittable=True))
    manager = AdapterManager({"unet": engine}, base={"unet": comp})
    shapes = manager.target("unet").weight_shapes()
    assert shapes == {"to_q": (16, 16), "to_out.0": (8, 16)}
    a = random_adapter("a", shapes, ["to_q", "to_out.0"], rank=2, seed=6)
    manager.load(a, weight=1.5)
    x = torch.randn(3, 5, 16)
    ref = copy.deepcopy(comp)
    TorchTarget(ref.model).apply({m: [(layer, 1.5)] for m, layer in a.layers["unet"].items()})
    with torch.no_grad():
        want = ref.module(x)[0]
    torch.testing.assert_close(engine.run(x=x)["y"], want, rtol=1e-4, atol=1e-4)
    manager.set_adapters([])
    with torch.no_grad():
        torch.testing.assert_close(engine.run(x=x)["y"], comp.module(x)[0], rtol=1e-4, atol=1e-4)
    manager.close()


def test_tensorrt_needs_a_refittable_engine_and_a_base(trt, tmp_path):
    comp = _attn_component()
    engine = fastgen.build(comp, backend="tensorrt", device="cpu", precision="fp32", cache=EngineCache(tmp_path / "c"))
    with pytest.raises(InvalidArgumentError, match="invalid base"):
        AdapterManager({"unet": engine}).target("unet")
    with pytest.raises(UnsupportedError, match="refittable"):
        AdapterManager({"unet": engine}, base={"unet": comp}).target("unet")
