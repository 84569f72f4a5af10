"""Fixtures for the model adapter tests: tiny extra models and an ONNX trace-and-compare check."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fastgen.models import Component


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    denom = np.linalg.norm(a64) * np.linalg.norm(b64)
    return 1.0 if denom == 0 else float(a64 @ b64 / denom)


def export_and_compare(component: Component, path: Path, shapes: Iterable = ("min", "max"),
                       min_cosine: float = 0.9999, trace_at="opt", dynamo: bool = False) -> dict:
    """Trace ``component.module`` to ONNX (TorchScript exporter, opset 17, the spec's dynamic axes;
    or torch.export with every symbolic dim dynamic) at ``trace_at`` and check onnxruntime against
    PyTorch at each of ``shapes``.

    Returns ``{shape: {output: (cosine, relative max error)}}`` for reporting.
    """
    import onnxruntime as ort

    spec = component.spec
    args = tuple(spec.sample_inputs(trace_at).values())
    with torch.no_grad():
        if dynamo:
            dims = tuple({axis: torch.export.Dim.DYNAMIC for axis, entry in enumerate(t.shape)
                          if not isinstance(entry, int)} for t in spec.inputs)
            program = torch.onnx.export(component.module, args, dynamo=True, dynamic_shapes=dims,
                                        input_names=spec.input_names, output_names=spec.output_names,
                                        opset_version=18)
            program.save(str(path))
        else:
            torch.onnx.export(component.module, args, str(path), dynamo=False, opset_version=17,
                              input_names=spec.input_names, output_names=spec.output_names,
                              dynamic_axes=spec.dynamic_axes())
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    report = {}
    for shape in shapes:
        feeds = spec.sample_inputs(shape, seed=1)
        expected = component(feeds)
        got = session.run(spec.output_names, {k: v.numpy() for k, v in feeds.items()})
        resolved = spec.resolve(spec.shape_at(shape))
        report[str(shape)] = {}
        for name, value in zip(spec.output_names, got, strict=True):
            ref = expected[name].numpy()
            assert value.shape == ref.shape == resolved[name], (shape, name, value.shape, ref.shape)
            cos = cosine(value, ref)
            rel = float(np.abs(value - ref).max() / max(np.abs(ref).max(), 1e-12))
            assert cos > min_cosine, (shape, name, cos)
            assert rel < 1e-3, (shape, name, rel)
            report[str(shape)][name] = (cos, rel)
    return report


@pytest.fixture
def onnx_check(tmp_path) -> Callable[..., dict]:
    def check(component: Component, **kwargs) -> dict:
        return export_and_compare(component, tmp_path / f"{component.name}.onnx", **kwargs)

    return check


# --- tiny models the presets do not cover ---------------------------------------------------------

def _seeded(build: Callable[[], nn.Module], seed: int = 0) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build().eval()


def make_sdxl_unet() -> nn.Module:
    """A UNet2DConditionModel with SDXL's text_time conditioning (pooled text 32 + 6 time ids)."""
    import diffusers

    return _seeded(lambda: diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2),
        norm_num_groups=32, sample_size=8, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=32 + 6 * 8))


def make_unet_2d(num_class_embeds: int | None = None) -> nn.Module:
    """An unconditional pixel-space UNet2DModel (optionally class-conditional)."""
    import diffusers

    return _seeded(lambda: diffusers.UNet2DModel(
        sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=32, num_class_embeds=num_class_embeds))


def make_clip_proj() -> nn.Module:
    import transformers

    cfg = transformers.CLIPTextConfig(vocab_size=1000, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                      intermediate_size=37, max_position_embeddings=77, projection_dim=24,
                                      bos_token_id=0, eos_token_id=2, pad_token_id=1, hidden_act="gelu")
    return _seeded(lambda: transformers.CLIPTextModelWithProjection(cfg))


def make_bert() -> nn.Module:
    import transformers

    cfg = transformers.BertConfig(vocab_size=1000, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=37, max_position_embeddings=96)
    return _seeded(lambda: transformers.BertModel(cfg, add_pooling_layer=False))


class TinyCNN(nn.Module):
    """A torchvision-style classifier: conv/bn/relu stages, global pooling, a linear head."""

    def __init__(self, num_classes: int = 5, in_channels: int = 3, output: str = "tensor") -> None:
        super().__init__()
        self.output = output
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
            nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
        )
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor):
        feats = torch.flatten(self.avgpool(self.features(x)), 1)
        logits = self.fc(feats)
        if self.output == "tuple":  # e.g. Inception's (logits, aux)
            return logits, feats
        if self.output == "object":
            return type("Out", (), {"logits": logits})()
        return logits


def make_cnn(**kwargs) -> nn.Module:
    model = _seeded(lambda: TinyCNN(**kwargs))
    # Non-trivial batch-norm statistics, so eval mode is exercised.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """Belt and braces: the hub libraries must never reach the network from these tests."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_sdxl_unet_model() -> nn.Module:
    return make_sdxl_unet()


@pytest.fixture
def tiny_sdxl_unet(tiny_sdxl_unet_model) -> nn.Module:
    return tiny_sdxl_unet_model


@pytest.fixture
def tiny_unet_2d_factory() -> Callable[..., nn.Module]:
    return make_unet_2d


@pytest.fixture
def tiny_clip_proj() -> nn.Module:
    return make_clip_proj()


@pytest.fixture
def tiny_bert() -> nn.Module:
    return make_bert()


@pytest.fixture
def tiny_cnn_factory() -> Callable[..., nn.Module]:
    return make_cnn
