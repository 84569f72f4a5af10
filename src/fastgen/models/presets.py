"""Built-in model presets: architectures as data, instantiated with random weights.

A preset names a set of components (``unet``, ``vae-decoder``...) whose architectures are plain
config dicts (:func:`preset_config`), so a preset needs no download: ``tiny`` is a few-kilobyte
stand-in for tests and demos (``tiny-sdxl`` the same for SDXL's architecture; ``tiny-controlnet`` /
``tiny-sdxl-controlnet`` add a ``controlnet`` and the ``unet-controlled`` that takes its residuals), ``sd15`` / ``sdxl`` are the exact public Stable Diffusion 1.5 and
SDXL base 1.0 architectures (for benchmarking engines; the weights are random, not trained);
``tiny-sd3`` / ``tiny-flux`` / ``tiny-pixart`` and ``sd35-medium`` / ``flux-dev`` / ``pixart-sigma`` the
diffusion transformers (:mod:`fastgen.models.presets_dit`); ``tiny-clip`` / ``tiny-siglip`` two-tower
image-text models (:mod:`fastgen.models.presets_clip`).
"""

from __future__ import annotations

import copy
import logging
from contextlib import nullcontext
from typing import Any

import torch

from fastgen.errors import InvalidArgumentError
from fastgen.models.presets_clip import TWO_TOWER_IMAGE_SIZES, TWO_TOWER_PRESETS, init_two_tower
from fastgen.models.presets_dit import DIT_IMAGE_SIZES, dit_presets

logger = logging.getLogger(__name__)

# --- Stable Diffusion 1.5 (runwayml/stable-diffusion-v1-5 configs, copied as data) -------------

_SD15_UNET: dict[str, Any] = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}

_SD_VAE: dict[str, Any] = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "scaling_factor": 0.18215,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

# CLIP ViT-L/14 text tower. eos_token_id 2 is what the original config says (the legacy value that
# makes transformers pool at the argmax token id, i.e. the real EOS 49407): kept for fidelity.
_CLIP_L: dict[str, Any] = {
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 1,
    "projection_dim": 768,
    "vocab_size": 49408,
}

# --- SDXL base 1.0 (stabilityai/stable-diffusion-xl-base-1.0 configs) --------------------------

_SDXL_UNET: dict[str, Any] = {
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
}

_SDXL_VAE: dict[str, Any] = {**_SD_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}

_CLIP_BIGG: dict[str, Any] = {
    **_CLIP_L,
    "hidden_act": "gelu",
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "projection_dim": 1280,
}

# --- tiny: every component in milliseconds on a CPU -------------------------------------------

_TINY_UNET: dict[str, Any] = {
    "attention_head_dim": 8,
    "block_out_channels": [32, 64],
    "cross_attention_dim": 32,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "in_channels": 4,
    "layers_per_block": 1,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 8,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
}

# Four blocks so the latent factor is 8, as in the real VAEs.
_TINY_VAE: dict[str, Any] = {
    "block_out_channels": [8, 16, 16, 16],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "out_channels": 3,
    "sample_size": 64,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

_TINY_CLIP: dict[str, Any] = {
    "bos_token_id": 0,
    "eos_token_id": 2,
    "hidden_size": 32,
    "intermediate_size": 37,
    "max_position_embeddings": 77,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "pad_token_id": 1,
    "projection_dim": 32,
    "vocab_size": 1000,
}

# ``image_size`` is not a ResNetConfig field: it is kept as an extra config attribute (saved with
# the config) so that the adapter knows the resolution the classifier is meant for.
_TINY_IMAGE_CLASSIFIER: dict[str, Any] = {
    "depths": [1, 1],
    "embedding_size": 8,
    "hidden_sizes": [8, 16],
    "id2label": {"0": "clean", "1": "text-heavy", "2": "low-quality", "3": "unsafe"},
    "label2id": {"clean": 0, "text-heavy": 1, "low-quality": 2, "unsafe": 3},
    "image_size": 64,
    "layer_type": "basic",
    "num_channels": 3,
}

_TINY_TEXT_CLASSIFIER: dict[str, Any] = {
    "hidden_size": 32,
    "id2label": {"0": "compliant", "1": "misleading", "2": "prohibited"},
    "label2id": {"compliant": 0, "misleading": 1, "prohibited": 2},
    "intermediate_size": 37,
    "max_position_embeddings": 128,
    "num_attention_heads": 2,
    "num_hidden_layers": 2,
    "vocab_size": 1000,
}

# --- tiny-sdxl: SDXL's architecture (text_time conditioning, two text encoders) at tiny size ---

# SDXL's layout: no attention in the first block, more transformer layers deeper, linear projections,
# cross-attention over both encoders' hidden states (32 + 64), added conditioning from the pooled
# projection (32) and six time ids embedded at 8 channels each: 32 + 6 * 8 = 80.
_TINY_SDXL_UNET: dict[str, Any] = {
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "attention_head_dim": [2, 4],
    "block_out_channels": [32, 64],
    "cross_attention_dim": 96,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "in_channels": 4,
    "layers_per_block": 1,
    "norm_num_groups": 32,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 80,
    "sample_size": 8,
    "transformer_layers_per_block": [1, 2],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
}

# The second encoder differs from the first as bigG does from ViT-L: wider, gelu, with a projection.
_TINY_CLIP_2: dict[str, Any] = {
    **_TINY_CLIP,
    "hidden_act": "gelu",
    "hidden_size": 64,
    "intermediate_size": 37,
    "num_attention_heads": 4,
    "projection_dim": 32,
}

# preset -> component -> (library, class name, config). vae-decoder and vae-encoder share one VAE.
_PRESETS: dict[str, dict[str, tuple[str, str, dict[str, Any]]]] = {
    "tiny": {
        "unet": ("diffusers", "UNet2DConditionModel", _TINY_UNET),
        "vae-decoder": ("diffusers", "AutoencoderKL", _TINY_VAE),
        "vae-encoder": ("diffusers", "AutoencoderKL", _TINY_VAE),
        "text-encoder": ("transformers", "CLIPTextModel", _TINY_CLIP),
        "classifier": ("transformers", "ResNetForImageClassification", _TINY_IMAGE_CLASSIFIER),
        "text-classifier": ("transformers", "BertForSequenceClassification", _TINY_TEXT_CLASSIFIER),
    },
    "sd15": {
        "unet": ("diffusers", "UNet2DConditionModel", _SD15_UNET),
        "vae-decoder": ("diffusers", "AutoencoderKL", _SD_VAE),
        "vae-encoder": ("diffusers", "AutoencoderKL", _SD_VAE),
        "text-encoder": ("transformers", "CLIPTextModel", _CLIP_L),
    },
    "sdxl": {
        "unet": ("diffusers", "UNet2DConditionModel", _SDXL_UNET),
        "vae-decoder": ("diffusers", "AutoencoderKL", _SDXL_VAE),
        "vae-encoder": ("diffusers", "AutoencoderKL", _SDXL_VAE),
        "text-encoder": ("transformers", "CLIPTextModel", _CLIP_L),
        "text-encoder-2": ("transformers", "CLIPTextModelWithProjection", _CLIP_BIGG),
    },
    # The VAE and first text encoder are tiny's own (SDXL shares SD's VAE layout and CLIP ViT-L), so a
    # bare weights file of either still maps to exactly one architecture.
    "tiny-sdxl": {
        "unet": ("diffusers", "UNet2DConditionModel", _TINY_SDXL_UNET),
        "vae-decoder": ("diffusers", "AutoencoderKL", _TINY_VAE),
        "vae-encoder": ("diffusers", "AutoencoderKL", _TINY_VAE),
        "text-encoder": ("transformers", "CLIPTextModel", _TINY_CLIP),
        "text-encoder-2": ("transformers", "CLIPTextModelWithProjection", _TINY_CLIP_2),
    },
    # Inpainting UNets (9 input channels: latents, mask, masked-image latents, as SD's inpainting
    # checkpoints); every other component is tiny's / tiny-sdxl's own, with the same weights.
    "tiny-inpaint": {
        "unet": ("diffusers", "UNet2DConditionModel", {**_TINY_UNET, "in_channels": 9}),
        "vae-decoder": ("diffusers", "AutoencoderKL", _TINY_VAE),
        "vae-encoder": ("diffusers", "AutoencoderKL", _TINY_VAE),
        "text-encoder": ("transformers", "CLIPTextModel", _TINY_CLIP),
    },
    "tiny-sdxl-inpaint": {
        "unet": ("diffusers", "UNet2DConditionModel", {**_TINY_SDXL_UNET, "in_channels": 9}),
        "vae-decoder": ("diffusers", "AutoencoderKL", _TINY_VAE),
        "vae-encoder": ("diffusers", "AutoencoderKL", _TINY_VAE),
        "text-encoder": ("transformers", "CLIPTextModel", _TINY_CLIP),
        "text-encoder-2": ("transformers", "CLIPTextModelWithProjection", _TINY_CLIP_2),
    },
}

# --- ControlNet presets: a base preset plus a ControlNet matching its UNet ----------------------

# The UNet's own settings (diffusers' ControlNetModel.from_unet copies the same ones); the last three
# are the decoder's, which a ControlNet lacks.
_UNET_ONLY_KEYS = ("up_block_types", "out_channels", "sample_size")
# Four entries: three stride-2 convolutions take the pixel-space condition image down to the latent
# grid (latent factor 8), as the (16, 32, 96, 256) of the public ControlNets do.
_TINY_CONDITIONING_CHANNELS = [4, 8, 8, 16]


def _controlnet_of(unet: dict[str, Any]) -> dict[str, Any]:
    return {**{k: v for k, v in unet.items() if k not in _UNET_ONLY_KEYS},
            "conditioning_embedding_out_channels": list(_TINY_CONDITIONING_CHANNELS)}


_TINY_CONTROLNET = _controlnet_of(_TINY_UNET)
_TINY_SDXL_CONTROLNET = _controlnet_of(_TINY_SDXL_UNET)  # text_time conditioning, like its UNet

# "unet-controlled" is the base preset's UNet (same architecture, hence from the same seed the same
# weights) exported with the ControlNet residuals as extra inputs, so the plain "unet" engine is unchanged.
_PRESETS["tiny-controlnet"] = {
    **_PRESETS["tiny"],
    "unet-controlled": ("diffusers", "UNet2DConditionModel", _TINY_UNET),
    "controlnet": ("diffusers", "ControlNetModel", _TINY_CONTROLNET),
}
_PRESETS["tiny-sdxl-controlnet"] = {
    **_PRESETS["tiny-sdxl"],
    "unet-controlled": ("diffusers", "UNet2DConditionModel", _TINY_SDXL_UNET),
    "controlnet": ("diffusers", "ControlNetModel", _TINY_SDXL_CONTROLNET),
}

# --- tiny-embed: encoders for Scorer.embed (a BERT-style sentence embedder and a ViT) ------------

# 512 positions so that tests can embed texts of a few hundred tokens.
_TINY_EMBED_TEXT: dict[str, Any] = {**_TINY_TEXT_CLASSIFIER, "max_position_embeddings": 512}
for _key in ("id2label", "label2id"):
    _TINY_EMBED_TEXT.pop(_key)
_TINY_VIT: dict[str, Any] = {
    "hidden_size": 32,
    "image_size": 32,
    "intermediate_size": 37,
    "num_attention_heads": 2,
    "num_channels": 3,
    "num_hidden_layers": 2,
    "patch_size": 8,
}
#: What a preset's encoders' sentence-transformers config would say: TextEncoderMetadata /
#: ImageEncoderMetadata fields (pooling, normalize), by preset and component.
_PRESET_EMBEDDING: dict[str, dict[str, dict[str, Any]]] = {
    "tiny-embed": {"text-encoder": {"pooling": "mean", "normalize": True, "max_length": 512},
                   "image-encoder": {"pooling": "cls", "normalize": False}},
}


def preset_embedding(name: Any, component: str) -> dict[str, Any] | None:
    """The embedding settings (pooling, normalize...) of a preset's encoder; None for other components."""
    settings = _PRESET_EMBEDDING.get(name, {}).get(component) if isinstance(name, str) else None
    return dict(settings) if settings else None


#: Nominal image size (pixels, min/opt/max) of each preset: the UNet and VAE height/width profile.
PRESET_IMAGE_SIZES: dict[str, tuple[int, int, int]] = {
    "tiny-embed": (32, 32, 32),
    "tiny": (32, 64, 128),
    "sd15": (256, 512, 1024),
    "tiny-controlnet": (32, 64, 128),
    "tiny-sdxl-controlnet": (32, 64, 128),
    "sdxl": (512, 1024, 1536),
    "tiny-sdxl": (32, 64, 128),
    "tiny-inpaint": (32, 64, 128),
    "tiny-sdxl-inpaint": (32, 64, 128),
}

# Diffusion transformers (SD3.5, FLUX.1, PixArt-Sigma and their tiny stand-ins): see presets_dit.
_PRESETS.update(dit_presets(_TINY_VAE, _TINY_CLIP, _TINY_CLIP_2, _CLIP_L, _CLIP_BIGG, _SDXL_VAE))
PRESET_IMAGE_SIZES.update(DIT_IMAGE_SIZES)
# Two-tower image-text models (CLIP, SigLIP): see presets_clip.
_PRESETS.update(TWO_TOWER_PRESETS)
PRESET_IMAGE_SIZES.update(TWO_TOWER_IMAGE_SIZES)
# The embedding encoders (registered after the families above: the dict's order is the presets' listing order).
_PRESETS["tiny-embed"] = {
    "text-encoder": ("transformers", "BertModel", _TINY_EMBED_TEXT),
    "image-encoder": ("transformers", "ViTModel", _TINY_VIT),
}

#: Latent factor of every preset (its VAE has four blocks).
PRESET_LATENT_FACTOR = 8


def list_presets() -> list[str]:
    """Names of the built-in presets."""
    return list(_PRESETS)


def preset_components(name: str) -> list[str]:
    """Component names of a preset, in pipeline order."""
    _check_preset(name)
    return list(_PRESETS[name])


def preset_config(name: str, component: str) -> tuple[str, str, dict[str, Any]]:
    """``(library, class_name, config)`` of one preset component; the config is a fresh copy."""
    _check_preset(name)
    comps = _PRESETS[name]
    if component not in comps:
        raise InvalidArgumentError("component", component, list(comps))
    library, cls_name, config = comps[component]
    return library, cls_name, copy.deepcopy(config)


def _check_preset(name: str) -> None:
    if name not in _PRESETS:
        raise InvalidArgumentError("preset", name, list(_PRESETS))


def model_class(library: str, cls_name: str) -> type[torch.nn.Module]:
    """A diffusers ``ModelMixin`` or transformers ``PreTrainedModel`` subclass, looked up by name.

    This is the allowlist that lets fastgen rebuild models from JSON without pickle: any other
    name (a function, a pipeline, a non-model class) raises :class:`UnsupportedError`.
    """
    from fastgen.errors import UnsupportedError

    if not isinstance(cls_name, str) or not cls_name.isidentifier() or cls_name.startswith("_"):
        raise UnsupportedError(f"cannot rebuild model class {cls_name!r}: not a model class name")
    if library == "diffusers":
        import diffusers

        base = diffusers.ModelMixin
        cls = getattr(diffusers, cls_name, None)
    elif library == "transformers":
        import transformers

        base = transformers.PreTrainedModel
        cls = getattr(transformers, cls_name, None)
    else:
        raise UnsupportedError(f"cannot rebuild a model from library {library!r} (only diffusers, transformers)")
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise UnsupportedError(f"cannot rebuild {library}.{cls_name}: not a {library} {base.__name__} subclass")
    return cls


def instantiate(library: str, cls_name: str, config: dict[str, Any]) -> torch.nn.Module:
    """Build a model from its config with the initialisers' random weights (current RNG, device)."""
    cls = model_class(library, cls_name)
    if library == "diffusers":
        model = cls.from_config(config)
    else:
        model = cls(cls.config_class.from_dict(config))
    return model.eval()


def build_preset_model(name: str, component: str, *, seed: int = 0, device: str | torch.device | None = None
                       ) -> torch.nn.Module:
    """The model behind a preset component with deterministic random weights.

    The initialisers draw from a forked CPU RNG seeded with ``seed``, so the global RNG state is left
    untouched and the same seed gives the same weights (``vae-decoder`` and ``vae-encoder`` share
    one VAE, so they get the same weights too). ``device="meta"`` builds the shapes only.
    """
    library, cls_name, config = preset_config(name, component)
    ctx = torch.device(device) if device is not None else nullcontext()
    with torch.random.fork_rng(devices=[]), ctx:
        torch.manual_seed(seed)
        model = instantiate(library, cls_name, config)
        if cls_name == "ControlNetModel":
            _unzero_control_convs(model)
        init_two_tower(model)
    logger.debug("built preset %s/%s (%s) with seed %d", name, component, cls_name, seed)
    return model


def _unzero_control_convs(model: torch.nn.Module) -> None:
    """Give a ControlNet's zero-initialised convolutions PyTorch's default random init.

    diffusers zero-initialises the condition embedding's last conv and every residual projection, so an
    untrained ControlNet adds exactly nothing; a preset stands in for a trained one, whose residuals are
    not zero (and tests comparing against diffusers would otherwise compare zeros).
    """
    zeroed = [model.controlnet_cond_embedding.conv_out, *model.controlnet_down_blocks, model.controlnet_mid_block]
    for conv in zeroed:
        conv.reset_parameters()
