"""Two-tower image-text models (transformers ``CLIPModel``, ``SiglipModel``) as two components.

- ``text-tower``: token ids -> ``text_embeds`` (batch, dim). CLIP takes ``input_ids`` and ``attention_mask``
  over any length up to its positions (its causal attention and end-token pooling make padding invisible);
  SigLIP takes ``input_ids`` only, at its one fixed length (it pools the last position, so texts are always
  padded to ``max_position_embeddings``, as SigLIP's processor does);
- ``image-tower``: ``pixel_values`` (batch, 3, H, W) at the vision config's size -> ``image_embeds`` (batch, dim).

Both embeddings are projected and not normalised: exactly ``get_text_features`` / ``get_image_features``. The
similarity's ``logit_scale`` (exponentiated) and SigLIP's ``logit_bias`` travel in both towers' metadata
(:class:`~fastgen.models.metadata.TextTowerMetadata`, :class:`~fastgen.models.metadata.ImageTowerMetadata`),
filled by :func:`tower_assets` with the tokenizer and the image preprocessing (the folder's
``preprocessor_config.json``, else the family's: CLIP resizes the shorter side with bicubic and centre-crops,
with CLIP's mean and std; SigLIP resizes straight to the size, bicubic, mean and std 0.5).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastgen.errors import UnsupportedError
from fastgen.models.adapters import choose, config_value
from fastgen.models.assets import read_json
from fastgen.models.component import Component
from fastgen.models.metadata import RESAMPLE_FILTERS, ImageTowerMetadata, TextTowerMetadata
from fastgen.models.spec import DimRange, ExportSpec, ShapeProfile, TensorSpec

logger = logging.getLogger(__name__)

#: The two components of a two-tower model; the text tower is the default.
TOWER_NAMES = ("text-tower", "image-tower")
#: transformers class -> family (:data:`fastgen.models.metadata.TOWER_FAMILIES`).
TWO_TOWER_CLASSES = {"CLIPModel": "clip", "SiglipModel": "siglip"}
#: config.json ``model_type`` -> the class a folder is loaded as.
TWO_TOWER_TYPES = {"clip": "CLIPModel", "siglip": "SiglipModel"}
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)


def tower_family(model: nn.Module) -> str | None:
    """``clip`` / ``siglip`` for a transformers CLIPModel / SiglipModel (exactly those classes), else None."""
    import transformers

    for cls_name, family in TWO_TOWER_CLASSES.items():
        if type(model) is getattr(transformers, cls_name, None):
            return family
    return None


def folder_class(config: dict[str, Any]) -> str | None:
    """The two-tower class a transformers folder's ``config.json`` describes (None: not a two-tower model)."""
    archs = config.get("architectures") or []
    if archs:
        return archs[0] if archs[0] in TWO_TOWER_CLASSES else None
    return TWO_TOWER_TYPES.get(config.get("model_type"))  # type: ignore[arg-type]


class CLIPTextTower(nn.Module):
    """``input_ids, attention_mask`` (batch, seq) -> ``(text_embeds,)`` (batch, projection_dim)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.text_model = model.text_model
        self.text_projection = model.text_projection

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor]:
        out = self.text_model(input_ids=input_ids, attention_mask=attention_mask, return_dict=True)
        return (self.text_projection(out.pooler_output),)


class SiglipTextTower(nn.Module):
    """``input_ids`` (batch, max_length) -> ``(text_embeds,)`` (batch, projection_size): the last position
    through the text head."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.text_model = model.text_model

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.text_model(input_ids=input_ids, return_dict=True).pooler_output,)


class ImageTower(nn.Module):
    """``pixel_values`` (batch, 3, H, W) -> ``(image_embeds,)`` (batch, dim): CLIP's class token through the
    visual projection, SigLIP's attention-pooling head."""

    def __init__(self, model: nn.Module, family: str) -> None:
        super().__init__()
        self.vision_model = model.vision_model
        self.visual_projection = model.visual_projection if family == "clip" else nn.Identity()

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor]:
        out = self.vision_model(pixel_values=pixel_values, return_dict=True)
        return (self.visual_projection(out.pooler_output),)


def _embed_dims(model: nn.Module, family: str) -> tuple[int, int]:
    """(text dim, image dim) of the two embeddings (equal for any trained model; checked by the scorer)."""
    cfg = model.config
    if family == "clip":
        dim = int(cfg.projection_dim)
        return dim, dim
    text = config_value(cfg.text_config, "projection_size") or cfg.text_config.hidden_size
    return int(text), int(cfg.vision_config.hidden_size)


def adapt_towers(model: nn.Module, component: str | None, latent_factor: int,
                 image_size: int | None) -> tuple[str, nn.Module, ExportSpec]:
    """A CLIPModel / SiglipModel -> its ``text-tower`` (the default) or ``image-tower``."""
    family = tower_family(model)
    if family is None:
        raise UnsupportedError(f"{type(model).__name__} is not a two-tower model (CLIPModel, SiglipModel)")
    name = choose(component, TOWER_NAMES)
    cfg = model.config
    text_dim, image_dim = _embed_dims(model, family)
    if name == "text-tower":
        tcfg = cfg.text_config
        positions = int(tcfg.max_position_embeddings)
        ids_high = int(tcfg.vocab_size)
        if family == "clip":
            inputs: tuple[TensorSpec, ...] = (
                TensorSpec("input_ids", "int64", ("batch", "seq"), low=0, high=ids_high),
                TensorSpec("attention_mask", "int64", ("batch", "seq"), kind="mask"))
            dims = {"batch": DimRange(1, 8, 32), "seq": DimRange(1, min(77, positions), positions)}
            wrapper: nn.Module = CLIPTextTower(model)
        else:  # one fixed length: the last position is the pooled one
            inputs = (TensorSpec("input_ids", "int64", ("batch", positions), low=0, high=ids_high),)
            dims = {"batch": DimRange(1, 8, 32)}
            wrapper = SiglipTextTower(model)
        spec = ExportSpec(component=name, inputs=inputs,
                          outputs=(TensorSpec("text_embeds", "float32", ("batch", text_dim)),),
                          profile=ShapeProfile(dims), model_type=type(model).__name__)
        return name, wrapper, spec
    vcfg = cfg.vision_config
    size = int(config_value(vcfg, "image_size") or image_size or 224)
    channels = int(config_value(vcfg, "num_channels", 3))
    spec = ExportSpec(
        component=name,
        inputs=(TensorSpec("pixel_values", "float32", ("batch", channels, "height", "width")),),
        outputs=(TensorSpec("image_embeds", "float32", ("batch", image_dim)),),
        profile=ShapeProfile({"batch": DimRange(1, 8, 32), "height": DimRange(size, size, size),
                              "width": DimRange(size, size, size)}),
        model_type=type(model).__name__,
    )
    return name, ImageTower(model, family), spec


# --- assets: metadata and tokenizer ------------------------------------------------------------------

def _scales(model: nn.Module, family: str) -> tuple[float | None, float | None]:
    """(exp(logit_scale), logit_bias) as float32 values (None on the meta device)."""
    scale = getattr(model, "logit_scale", None)
    if scale is None or scale.device.type == "meta":
        return None, None
    value = float(scale.detach().float().exp().reshape(-1)[0])
    bias = getattr(model, "logit_bias", None) if family == "siglip" else None
    return value, (float(bias.detach().float().reshape(-1)[0]) if bias is not None else None)


def _image_settings(family: str, size: int, processor: dict[str, Any]) -> dict[str, Any]:
    """Image tower preprocessing: the processor config's values where it has them, else the family's."""
    clip = family == "clip"
    crop = bool(processor.get("do_center_crop", clip))
    side = size
    for key in (("crop_size", "size") if crop else ("size",)):
        value = processor.get(key)
        if isinstance(value, dict) and (value.get("height") or value.get("shortest_edge")):
            side = int(value.get("height") or value.get("shortest_edge"))
            break
        if isinstance(value, int):
            side = value
            break
    resample = processor.get("resample", RESAMPLE_FILTERS["bicubic"])
    return {"image_size": side, "center_crop": crop, "resample": int(resample),
            "mean": tuple(processor.get("image_mean") or (CLIP_MEAN if clip else SIGLIP_MEAN)),
            "std": tuple(processor.get("image_std") or (CLIP_STD if clip else SIGLIP_STD))}


def preset_tokenizer(family: str, text_config: dict[str, Any]) -> Any:
    """The generated tokenizer of a two-tower preset: CLIP's BPE layout (padding with ``<|endoftext|>``), or
    for SigLIP the T5-layout Unigram (SigLIP's tokenizer is SentencePiece too) padding with ``</s>`` to the
    fixed length."""
    from fastgen.models import tokenizers

    vocab = int(text_config["vocab_size"])
    length = int(text_config.get("max_position_embeddings", 77))
    if family == "clip":
        return tokenizers.clip_tokenizer(vocab, min(length, 77))
    tok = tokenizers.t5_tokenizer(vocab, model_max_length=length)
    tok.pad_token = tokenizers.T5_EOS  # SigLIP pads with its end token (id 1)
    return tok


def tower_assets(comp: Component, model: Any, folder: Path | None, is_preset: bool) -> Component:
    """Fill a tower component's metadata (family, scale, bias; the image tower's preprocessing, the text
    tower's length) and the text tower's tokenizer (generated for a preset, else the folder's)."""
    family = TWO_TOWER_CLASSES.get(comp.spec.model_type, "clip")
    scale, bias = _scales(comp.model, family)
    tower = {"family": family, "logit_scale": scale, "logit_bias": bias}
    if comp.name == "image-tower":
        size = comp.spec.profile.dims["height"].opt
        processor = read_json(folder / "preprocessor_config.json") if folder is not None else {}
        comp.metadata = ImageTowerMetadata(**_image_settings(family, size, processor), **tower)
        return comp
    first = comp.spec.inputs[0].shape[1]
    length = first if isinstance(first, int) else comp.spec.profile.dims["seq"].max
    comp.metadata = TextTowerMetadata(max_length=int(length), **tower)
    try:
        if is_preset:
            text_config = dict((comp.source.get("config") or {}).get("text_config") or {})
            comp.tokenizer = preset_tokenizer(family, text_config)
        elif folder is not None and any((folder / f).exists() for f in
                                        ("tokenizer.json", "tokenizer_config.json", "vocab.json", "spiece.model")):
            from fastgen.models.tokenizers import load_tokenizer

            comp.tokenizer = load_tokenizer(folder)
    except Exception as exc:  # a tower without a usable tokenizer still exports and builds
        logger.warning("no tokenizer for %s of %s: %s", comp.name, model, exc)
    return comp


__all__ = ["TOWER_NAMES", "TWO_TOWER_CLASSES", "adapt_towers", "folder_class", "preset_tokenizer",
           "tower_assets", "tower_family"]
