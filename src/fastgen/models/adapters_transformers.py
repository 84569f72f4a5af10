"""Adapters for transformers models: CLIP text towers, text and image encoders, text and image classifiers."""

from __future__ import annotations

import logging

import torch
from torch import nn

from fastgen.errors import UnsupportedError
from fastgen.models.adapters import (
    Builder,
    ImageClassifierWrapper,
    choose,
    config_value,
    image_classifier_spec,
)
from fastgen.models.spec import DimRange, ExportSpec, ShapeProfile, TensorSpec

logger = logging.getLogger(__name__)

# Attention implementations that trace to ONNX with dynamic batch and sequence (both verified on
# CLIP and BERT with transformers 5: the causal / padding masks are built from traced shapes).
TRACEABLE_ATTENTION = ("eager", "sdpa", "fastgen")  # fastgen: see ops/attention_transformers.py
TEXT_ENCODER_NAMES = ("text-encoder", "text-encoder-2", "text-encoder-3")  # -3: SD3's T5


class CLIPTextWrapper(nn.Module):
    """``input_ids`` (batch, seq) -> last hidden state, penultimate hidden state (batch, seq, hidden)
    and the pooled output (batch, hidden) or, with a projection, ``text_embeds`` (batch, proj)."""

    def __init__(self, model: nn.Module, projection: bool) -> None:
        super().__init__()
        self.model = model
        self.projection = projection

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = self.model(input_ids=input_ids, output_hidden_states=True, return_dict=True)
        # hidden_states[-2] is the second-to-last layer's output before the final layer norm:
        # what SDXL conditions on.
        pooled = out.text_embeds if self.projection else out.pooler_output
        return out.last_hidden_state, out.hidden_states[-2], pooled


class TextEncoderWrapper(nn.Module):
    """``input_ids, attention_mask`` (batch, seq) -> ``(last_hidden_state,)`` (batch, seq, hidden)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.model(input_ids=input_ids, attention_mask=attention_mask, return_dict=True).last_hidden_state,)


class ImageEncoderWrapper(nn.Module):
    """``pixel_values`` (batch, C, H, W) -> ``(last_hidden_state,)`` (batch, tokens, hidden), plus
    ``pooler_output`` (batch, hidden) when the model has a pooler (ViT, DINOv2...)."""

    def __init__(self, model: nn.Module, pooled: bool) -> None:
        super().__init__()
        self.model = model
        self.pooled = pooled

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(pixel_values=pixel_values, return_dict=True)
        return (out.last_hidden_state, out.pooler_output) if self.pooled else (out.last_hidden_state,)


class TextClassifierWrapper(nn.Module):
    """``input_ids, attention_mask`` (batch, seq) -> ``(logits,)`` (batch, num_labels)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.model(input_ids=input_ids, attention_mask=attention_mask, return_dict=True).logits,)


def ensure_traceable_attention(model: nn.Module) -> None:
    """Switch flash / flex attention (which do not trace to ONNX) to SDPA, in place."""
    current = getattr(model.config, "_attn_implementation", None)
    if current is None or current in TRACEABLE_ATTENTION:
        return
    logger.info("%s: switching attention from %s to sdpa for export", type(model).__name__, current)
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("sdpa")
    else:  # transformers < 4.48
        model.config._attn_implementation = "sdpa"


def _max_positions(config) -> int | None:
    value = config_value(config, "max_position_embeddings")
    return int(value) if value else None


def _token_inputs(config, *, mask: bool) -> tuple[TensorSpec, ...]:
    ids = TensorSpec("input_ids", "int64", ("batch", "seq"), low=0, high=int(config.vocab_size))
    if not mask:
        return (ids,)
    return ids, TensorSpec("attention_mask", "int64", ("batch", "seq"), kind="mask")


def _seq_range(config, opt: int, cap: int) -> DimRange:
    top = min(cap, _max_positions(config) or cap)
    return DimRange(1, min(opt, top), top)


def adapt_clip_text(model: nn.Module, component: str | None, latent_factor: int,
                    image_size: int | None) -> tuple[str, nn.Module, ExportSpec]:
    import transformers

    name = choose(component, TEXT_ENCODER_NAMES)
    cfg = model.config
    projection = isinstance(model, transformers.CLIPTextModelWithProjection)
    hidden = int(cfg.hidden_size)
    pooled = (TensorSpec("text_embeds", "float32", ("batch", int(cfg.projection_dim))) if projection
              else TensorSpec("pooler_output", "float32", ("batch", hidden)))
    spec = ExportSpec(
        component=name,
        inputs=_token_inputs(cfg, mask=False),
        outputs=(TensorSpec("last_hidden_state", "float32", ("batch", "seq", hidden)),
                 TensorSpec("penultimate_hidden_state", "float32", ("batch", "seq", hidden)),
                 pooled),
        profile=ShapeProfile({"batch": DimRange(1, 2, 8), "seq": _seq_range(cfg, 77, 77)}),
        model_type=type(model).__name__,
    )
    return name, CLIPTextWrapper(model, projection), spec


def adapt_text_encoder(model: nn.Module, component: str | None, latent_factor: int,
                       image_size: int | None) -> tuple[str, nn.Module, ExportSpec]:
    """A transformers base model over token ids (BERT, T5 encoder...) -> its last hidden state."""
    name = choose(component, TEXT_ENCODER_NAMES)
    cfg = model.config
    hidden = config_value(cfg, "hidden_size") or config_value(cfg, "d_model")
    if not hidden or not config_value(cfg, "vocab_size"):
        raise UnsupportedError(f"no fastgen adapter for transformers {type(model).__name__}: "
                               "a text encoder needs hidden_size and vocab_size in its config")
    spec = ExportSpec(
        component=name,
        inputs=_token_inputs(cfg, mask=True),
        outputs=(TensorSpec("last_hidden_state", "float32", ("batch", "seq", int(hidden))),),
        profile=ShapeProfile({"batch": DimRange(1, 2, 8), "seq": _seq_range(cfg, 64, 512)}),
        model_type=type(model).__name__,
    )
    return name, TextEncoderWrapper(model), spec


def adapt_text_classifier(model: nn.Module, component: str | None, latent_factor: int,
                          image_size: int | None) -> tuple[str, nn.Module, ExportSpec]:
    name = choose(component, ("text-classifier",), aliases={"classifier": "text-classifier"})
    cfg = model.config
    spec = ExportSpec(
        component=name,
        inputs=_token_inputs(cfg, mask=True),
        outputs=(TensorSpec("logits", "float32", ("batch", int(cfg.num_labels))),),
        profile=ShapeProfile({"batch": DimRange(1, 8, 32), "seq": _seq_range(cfg, 64, 512)}),
        model_type=type(model).__name__,
    )
    return name, TextClassifierWrapper(model), spec


def adapt_image_classifier(model: nn.Module, component: str | None, latent_factor: int,
                           image_size: int | None) -> tuple[str, nn.Module, ExportSpec]:
    """``*ForImageClassification``: the input size is the config's ``image_size`` when it has one."""
    name = choose(component, ("classifier",))
    cfg = model.config
    size = config_value(cfg, "image_size") or image_size or 224
    height, width = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    spec = image_classifier_spec(type(model).__name__, int(config_value(cfg, "num_channels", 3)),
                                 int(cfg.num_labels), height, width)
    return name, ImageClassifierWrapper(model, hf=True), spec


def adapt_image_encoder(model: nn.Module, component: str | None, latent_factor: int,
                        image_size: int | None) -> tuple[str, nn.Module, ExportSpec]:
    """A transformers vision base model (ViT, DINOv2...) -> its last hidden state (and pooled output)."""
    name = choose(component, ("image-encoder",))
    cfg = model.config
    hidden = config_value(cfg, "hidden_size")
    if not hidden:
        raise UnsupportedError(f"no fastgen adapter for transformers {type(model).__name__}: "
                               "an image encoder needs hidden_size in its config")
    size = config_value(cfg, "image_size") or image_size or 224
    height, width = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    channels = int(config_value(cfg, "num_channels", 3))
    # ViT: a pooler when built with one; these always return their pooled output (DINOv2: the CLS after
    # the final norm; CLIP / SigLIP vision towers: post-layernorm CLS / attention pooling).
    pooled = getattr(model, "pooler", None) is not None or type(model).__name__.startswith(
        ("Dinov2", "CLIPVision", "SiglipVision"))
    outputs = [TensorSpec("last_hidden_state", "float32", ("batch", "tokens", int(hidden)))]
    if pooled:
        outputs.append(TensorSpec("pooler_output", "float32", ("batch", int(hidden))))
    spec = ExportSpec(
        component=name,
        inputs=(TensorSpec("pixel_values", "float32", ("batch", channels, "height", "width")),),
        outputs=tuple(outputs),
        profile=ShapeProfile({"batch": DimRange(1, 8, 32), "height": DimRange(height, height, height),
                              "width": DimRange(width, width, width)}),
        model_type=type(model).__name__,
    )
    return name, ImageEncoderWrapper(model, pooled), spec


def builder_for(model: nn.Module) -> Builder:
    import transformers

    ensure_traceable_attention(model)
    cls_name = type(model).__name__
    from fastgen.models import adapters_clip

    if adapters_clip.tower_family(model) is not None:  # CLIPModel / SiglipModel: text-tower, image-tower
        return adapters_clip.adapt_towers
    if isinstance(model, (transformers.CLIPTextModel, transformers.CLIPTextModelWithProjection)):
        return adapt_clip_text
    if cls_name.endswith("ForSequenceClassification"):
        return adapt_text_classifier
    if cls_name.endswith("ForImageClassification"):
        return adapt_image_classifier
    if getattr(model, "main_input_name", None) == "input_ids" and "For" not in cls_name:
        return adapt_text_encoder
    if getattr(model, "main_input_name", None) == "pixel_values" and "For" not in cls_name:
        return adapt_image_encoder
    raise UnsupportedError(f"no fastgen adapter for transformers {cls_name} (supported: CLIPTextModel"
                           "[WithProjection], base text and image encoders, *ForSequenceClassification, "
                           "*ForImageClassification)")
