"""fastgen.export: every component kind exports and verifies at min, opt and max shapes."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from fastgen.errors import FastgenError, InvalidArgumentError, VerificationError
from fastgen.export import ExportConfig, export
from fastgen.export.verify import compare
from fastgen.models import adapt, load_component, model_components
from fastgen.models.component import Component
from fastgen.models.spec import ExportSpec, ShapeProfile, TensorSpec

TINY = model_components("tiny")


def _ort_matches_torch(directory, comp: Component, shape) -> float:
    """Independent re-check: a fresh ORT session against the module, at a shape of our choosing."""
    sess = ort.InferenceSession(str(directory / "model.onnx"), providers=["CPUExecutionProvider"])
    inputs = comp.spec.sample_inputs(shape, seed=99)
    ref = comp(inputs)
    outs = sess.run(None, {k: v.numpy() for k, v in inputs.items()})
    return min(compare(ref[n], torch.from_numpy(o))["cosine"] for n, o in zip(comp.spec.output_names, outs))


@pytest.mark.parametrize("name", TINY)
def test_tiny_component_exports_and_verifies(tmp_path, name):
    comp = load_component("tiny", name)
    result = export(comp, tmp_path / name)
    assert result.onnx_path.exists()
    assert [v["shape"] for v in result.verification] == [comp.spec.profile.shape(w) for w in ("min", "opt", "max")]
    for v in result.verification:
        for stats in v["outputs"].values():
            assert stats["cosine"] > 0.9999 and stats["max_rel"] < 1e-3
    # Dims are named after the spec, so engines and TensorRT profiles can find them.
    model = onnx.load(str(result.onnx_path), load_external_data=False)
    axes = comp.spec.dynamic_axes()
    for value in list(model.graph.input) + list(model.graph.output):
        dims = value.type.tensor_type.shape.dim
        for axis, dim_name in axes.get(value.name, {}).items():
            assert dims[axis].dim_param == dim_name
    assert ExportSpec.from_dict(json.loads((tmp_path / name / "spec.json").read_text())) == comp.spec
    report = json.loads((tmp_path / name / "export.json").read_text())
    assert report["stats"]["nodes"] <= report["stats"]["nodes_exported"]


def test_two_shapes_per_dynamic_axis_beyond_the_profile_points(tmp_path):
    """Each dynamic axis varied on its own, at sizes that are none of min/opt/max."""
    comp = load_component("tiny", "unet")
    export(comp, tmp_path / "u", config=ExportConfig(verify="none"))
    opt = comp.spec.profile.shape("opt")
    for symbol in sorted(comp.spec.symbols):
        rng = comp.spec.profile.dims[symbol]
        step = max(comp.spec.multiples.get(symbol, 1), 8 if symbol in ("height", "width") else 1)
        for size in {rng.min, min(rng.max, rng.opt + step)}:
            assert _ort_matches_torch(tmp_path / "u", comp, {**opt, symbol: size}) > 0.9999


def _tiny_unet_sdxl():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=(2, 4), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=80,
        transformer_layers_per_block=(1, 2), norm_num_groups=32).eval()


def _tiny_unet2d():
    from diffusers import UNet2DModel

    return UNet2DModel(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(32, 64),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=32).eval()


class TinyCNN(torch.nn.Module):
    """A torchvision-style classifier: any size in, logits out (adaptive pooling)."""

    def __init__(self):
        super().__init__()
        self.features = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2, padding=1), torch.nn.ReLU(),
                                            torch.nn.Conv2d(8, 16, 3, stride=2, padding=1), torch.nn.ReLU())
        self.head = torch.nn.Linear(16, 5)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


@pytest.mark.parametrize("factory,component,profile", [
    (_tiny_unet_sdxl, "unet", "height=32:64:96,width=32:64:96"),
    (_tiny_unet2d, "unet", "height=16:32:48,width=16:32:48"),
    (lambda: TinyCNN().eval(), "classifier", "height=17:64:113,width=1:64:77"),
], ids=["sdxl-unet", "unet2d", "custom-cnn"])
def test_other_architectures_export(tmp_path, factory, component, profile):
    comp = adapt(factory(), component, profile=profile)
    result = export(comp, tmp_path / "x")
    assert len(result.verification) == 3


def test_dynamo_exporter(tmp_path):
    comp = adapt(TinyCNN().eval(), "classifier", profile="batch=1:2:5,height=32:64:96,width=32:64:96")
    result = export(comp, tmp_path / "d", config=ExportConfig(exporter="dynamo"))
    assert result.stats["opset"] >= 18 and len(result.verification) == 3
    assert _ort_matches_torch(tmp_path / "d", comp, {"batch": 3, "height": 40, "width": 72}) > 0.9999


@pytest.mark.slow
def test_dynamo_exporter_tiny_unet(tmp_path):
    result = export("tiny", tmp_path / "u", component="unet", config=ExportConfig(exporter="dynamo"))
    assert len(result.verification) == 3


def test_external_data(tmp_path):
    result = export("tiny", tmp_path / "e", component="text-encoder", config=ExportConfig(external_data="always"))
    assert (tmp_path / "e" / "model.onnx.data").stat().st_size > (tmp_path / "e" / "model.onnx").stat().st_size
    assert result.stats["external_data"] is True
    # ONNX Runtime resolves the data file relative to the graph
    sess = ort.InferenceSession(str(result.onnx_path), providers=["CPUExecutionProvider"])
    ids = np.zeros((1, 5), dtype=np.int64)
    assert sess.run(None, {"input_ids": ids})[0].shape[:2] == (1, 5)


class ShapeBranch(torch.nn.Module):
    """Python control flow on a shape: the tracer bakes in the branch taken at the opt shape."""

    def forward(self, x):
        return (x * 2,) if x.shape[0] > 2 else (x,)


def _branch_component() -> Component:
    spec = ExportSpec("classifier", [TensorSpec("x", "float32", ("batch", 4))], [TensorSpec("y", "float32", ("batch", 4))],
                      ShapeProfile.of(batch=(1, 4, 8)))
    m = ShapeBranch()
    return Component("classifier", m, spec, m)


def test_verification_failure_is_reported_and_nothing_is_written(tmp_path):
    out = tmp_path / "bad"
    with pytest.raises(VerificationError, match=r"output 'y' at batch=1.*cosine"):
        export(_branch_component(), out)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no staging folder left behind


def test_verify_none_skips_checks(tmp_path):
    result = export(_branch_component(), tmp_path / "ok", config=ExportConfig(verify="none"))
    assert result.verification == [] and result.onnx_path.exists()


def test_reexport_replaces_previous_output_but_never_a_foreign_folder(tmp_path):
    export("tiny", tmp_path / "a", component="text-encoder", config=ExportConfig(verify="opt"))
    export("tiny", tmp_path / "a", component="text-encoder", config=ExportConfig(verify="opt"))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(InvalidArgumentError, match="out"):
        export("tiny", foreign, component="text-encoder")
    assert (foreign / "notes.txt").read_text() == "mine"


def test_config_validation():
    with pytest.raises(InvalidArgumentError, match="opset"):
        ExportConfig(opset=11)
    with pytest.raises(InvalidArgumentError, match="opset.*dynamo"):
        ExportConfig(exporter="dynamo", opset=17)
    with pytest.raises(InvalidArgumentError, match="exporter"):
        ExportConfig(exporter="tflite")
    assert ExportConfig().resolved_opset == 17 and ExportConfig(exporter="dynamo").resolved_opset == 18
    c = ExportConfig(verify="opt", tolerance=1e-2)
    assert ExportConfig.from_dict(c.to_dict()) == c and c.cache_key() != ExportConfig().cache_key()


def test_unknown_profile_dim_names_the_allowed_ones():
    with pytest.raises(InvalidArgumentError, match=r"profile.*allowed: .*batch"):
        load_component("tiny", "unet", profile="frames=1:2:3")


def test_exporter_failure_names_the_exporter(tmp_path):
    class Bad(torch.nn.Module):
        def forward(self, x):
            # complex eigenvalues have no ONNX conversion
            return (torch.linalg.eigvals(x[:, :, None] * x[:, None, :]).real.sum(-1),)
    spec = ExportSpec("classifier", [TensorSpec("x", "float32", ("batch", 4))], [TensorSpec("y", "float32", ("batch", 4))],
                      ShapeProfile.of(batch=(1, 2, 4)))
    with pytest.raises(FastgenError, match="exporter 'dynamo' failed on classifier"):
        export(Component("classifier", Bad(), spec, Bad()), tmp_path / "x", config=ExportConfig(exporter="dynamo"))
    assert not (tmp_path / "x").exists()
