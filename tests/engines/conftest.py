"""Tiny hand-made components for the engine tests (independent of fastgen.models presets)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from fastgen.models.component import Component
from fastgen.models.spec import ExportSpec, ShapeProfile, TensorSpec


class TinyMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))

    def forward(self, x):  # (batch, 16) -> (batch, 8)
        return (self.net(x),)


class TinyConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.GroupNorm(2, 8)
        self.conv2 = nn.Conv2d(8, 4, 3, stride=2, padding=1)

    def forward(self, image, scale):  # (batch, 3, H, W), (batch,)
        h = self.conv2(nn.functional.silu(self.norm(self.conv1(image))))  # (batch, 4, H/2, W/2)
        h = h * scale[:, None, None, None]
        return h, h.mean(dim=(2, 3))


class TinyTokens(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 8)

    def forward(self, ids, mask):  # (batch, seq) int64 each -> (batch, 8)
        m = mask.unsqueeze(-1).to(self.emb.weight.dtype)
        return ((self.emb(ids) * m).sum(1) / m.sum(1),)


def mlp_spec() -> ExportSpec:
    return ExportSpec(
        component="mlp",
        inputs=(TensorSpec("x", "float32", ("batch", 16)),),
        outputs=(TensorSpec("y", "float32", ("batch", 8)),),
        profile=ShapeProfile.of(batch=(1, 2, 8)),
        model_type="TinyMLP",
    )


def conv_spec() -> ExportSpec:
    return ExportSpec(
        component="conv",
        inputs=(TensorSpec("image", "float32", ("batch", 3, "height", "width")),
                TensorSpec("scale", "float32", ("batch",), low=0.5, high=2.0)),
        outputs=(TensorSpec("features", "float32", ("batch", 4, "height/2", "width/2")),
                 TensorSpec("pooled", "float32", ("batch", 4))),
        profile=ShapeProfile.of(batch=(1, 2, 4), height=(8, 16, 32), width=(8, 16, 32)),
        model_type="TinyConv",
    )


def tokens_spec() -> ExportSpec:
    return ExportSpec(
        component="tokens",
        inputs=(TensorSpec("ids", "int64", ("batch", "seq"), low=0, high=50),
                TensorSpec("mask", "int64", ("batch", "seq"), kind="mask")),
        outputs=(TensorSpec("pooled", "float32", ("batch", 8)),),
        profile=ShapeProfile.of(batch=(1, 2, 4), seq=(1, 8, 16)),
        model_type="TinyTokens",
    )


def make_component(module: nn.Module, spec: ExportSpec) -> Component:
    torch.manual_seed(0)
    for p in module.parameters():  # deterministic, non-trivial weights
        nn.init.normal_(p, std=0.3)
    module.eval()
    return Component(name=spec.component, module=module, spec=spec, model=module, origin=f"<module {type(module).__name__}>")


@pytest.fixture
def mlp() -> Component:
    return make_component(TinyMLP(), mlp_spec())


@pytest.fixture
def conv() -> Component:
    return make_component(TinyConv(), conv_spec())


@pytest.fixture
def tokens() -> Component:
    return make_component(TinyTokens(), tokens_spec())


def export_onnx(component: Component, path: Path, opset: int = 17) -> Path:
    """Export with the TorchScript exporter, naming inputs and outputs per the spec."""
    spec = component.spec
    args = tuple(spec.sample_inputs("opt").values())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(component.module, args, str(path), input_names=spec.input_names,
                          output_names=spec.output_names, dynamic_axes=spec.dynamic_axes(),
                          opset_version=opset, dynamo=False)
    return path


@pytest.fixture
def onnx_export():
    return export_onnx
