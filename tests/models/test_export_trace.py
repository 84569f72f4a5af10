"""The wrappers trace to ONNX (TorchScript exporter, opset 17, the spec's dynamic axes) and the graph
matches PyTorch in onnxruntime at the profile's min and max shapes: nothing shape-dependent is
baked in as a constant at the traced (opt) shape."""

from __future__ import annotations

import pytest

from fastgen.models import adapt, load_component, model_components


@pytest.mark.parametrize("name", model_components("tiny"))
def test_tiny_component_traces(onnx_check, name):
    onnx_check(load_component("tiny", name))


def test_sdxl_unet_traces(onnx_check, tiny_sdxl_unet):
    onnx_check(adapt(tiny_sdxl_unet))


def test_class_conditional_unet_2d_traces(onnx_check, tiny_unet_2d_factory):
    onnx_check(adapt(tiny_unet_2d_factory(10)))


def test_clip_with_projection_traces(onnx_check, tiny_clip_proj):
    onnx_check(adapt(tiny_clip_proj, "text-encoder-2"))


def test_bert_encoder_traces(onnx_check, tiny_bert):
    onnx_check(adapt(tiny_bert))


@pytest.mark.parametrize("output", ["tensor", "tuple"])
def test_custom_classifier_traces_with_widened_profile(onnx_check, tiny_cnn_factory, output):
    comp = adapt(tiny_cnn_factory(output=output), image_size=32, profile="height=16:32:64,width=24:32:48")
    onnx_check(comp)


@pytest.mark.slow
@pytest.mark.parametrize("name", model_components("tiny"))
def test_tiny_component_exports_with_dynamo(onnx_check, name):
    """torch.export + onnxscript with every symbolic dim dynamic also gives a shape-generic graph."""
    pytest.importorskip("onnxscript")
    onnx_check(load_component("tiny", name), dynamo=True)


@pytest.mark.slow
def test_sdxl_unet_exports_with_dynamo(onnx_check, tiny_sdxl_unet):
    pytest.importorskip("onnxscript")
    onnx_check(adapt(tiny_sdxl_unet), dynamo=True)
