"""Two-tower image-text presets (random weights): ``tiny-clip`` (transformers ``CLIPModel``) and ``tiny-siglip``
(``SiglipModel``), each offering a ``text-tower`` and an ``image-tower`` (:mod:`fastgen.models.adapters_clip`).

Both are built from one model (the same seed gives the same weights to both towers, as one checkpoint would).
"""

from __future__ import annotations

import math
from typing import Any

import torch

# CLIP's layout at tiny size: the text side is tiny's CLIP text encoder (legacy eos_token_id 2: pooled at the
# highest token id, <|endoftext|>), a ViT of 2 layers on 32x32 images in 8x8 patches, 16-d projections.
_TINY_CLIP_MODEL: dict[str, Any] = {
    "projection_dim": 16,
    "text_config": {"bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1, "hidden_size": 32,
                    "intermediate_size": 37, "max_position_embeddings": 77, "num_attention_heads": 4,
                    "num_hidden_layers": 2, "vocab_size": 1000},
    "vision_config": {"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 2,
                      "image_size": 32, "patch_size": 8},
}

# SigLIP's layout at tiny size: the text tower pools its last position, so texts are always padded to the
# fixed length (24 here, 64 in the released models) with </s> (id 1), as SigLIP's processor does.
_TINY_SIGLIP_MODEL: dict[str, Any] = {
    "text_config": {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1, "hidden_size": 32,
                    "intermediate_size": 37, "max_position_embeddings": 24, "num_attention_heads": 4,
                    "num_hidden_layers": 2, "vocab_size": 1000},
    "vision_config": {"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 2,
                      "image_size": 32, "patch_size": 8},
}

#: SigLIP's initial temperature and bias (the paper's log(10) and -10); transformers initialises both to 0,
#: which would leave a preset with a trivial scale of 1 and no bias.
SIGLIP_INIT_SCALE, SIGLIP_INIT_BIAS = math.log(10.0), -10.0

TWO_TOWER_PRESETS: dict[str, dict[str, tuple[str, str, dict[str, Any]]]] = {
    "tiny-clip": {"text-tower": ("transformers", "CLIPModel", _TINY_CLIP_MODEL),
                  "image-tower": ("transformers", "CLIPModel", _TINY_CLIP_MODEL)},
    "tiny-siglip": {"text-tower": ("transformers", "SiglipModel", _TINY_SIGLIP_MODEL),
                    "image-tower": ("transformers", "SiglipModel", _TINY_SIGLIP_MODEL)},
}
#: Image size (min/opt/max) of each two-tower preset: fixed by the vision config.
TWO_TOWER_IMAGE_SIZES: dict[str, tuple[int, int, int]] = {"tiny-clip": (32, 32, 32), "tiny-siglip": (32, 32, 32)}


def init_two_tower(model: torch.nn.Module) -> None:
    """Give a freshly built SigLIP preset model SigLIP's initial logit scale and bias (in place)."""
    if type(model).__name__ == "SiglipModel":
        with torch.no_grad():
            model.logit_scale.fill_(SIGLIP_INIT_SCALE)
            model.logit_bias.fill_(SIGLIP_INIT_BIAS)


__all__ = ["TWO_TOWER_IMAGE_SIZES", "TWO_TOWER_PRESETS", "init_two_tower"]
