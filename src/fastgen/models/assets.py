"""What a pipeline needs beside a component's weights: its tokenizer and typed metadata.

:func:`attach_assets` fills ``comp.tokenizer`` and ``comp.metadata`` (one class per component kind,
see :mod:`fastgen.models.metadata`):

- ``unet``: :class:`UNetMetadata` (scheduler config, ``sd`` or ``sdxl``, SDXL's empty-prompt zeros);
- ``transformer``: :class:`UNetMetadata` (scheduler config, ``sd3`` / ``flux`` / ``pixart``);
- ``vae-decoder`` / ``vae-encoder``: :class:`VaeMetadata` (scaling factor, latent factor, shift factor);
- ``classifier``: :class:`ImageClassifierMetadata` (labels in index order, image size, mean, std, resample);
- ``text-classifier``: :class:`TextClassifierMetadata` (labels, max length).

Engines built by ``fastgen.build`` keep the metadata in ``manifest.json`` (``metadata``) and the
tokenizer in a ``tokenizer/`` folder, so a service can run from engine directories alone.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from fastgen.models.component import Component
from fastgen.models.metadata import (
    DEFAULT_IMAGE_SIZE,
    DEFAULT_MAX_LENGTH,
    DEFAULT_RESAMPLE,
    DEFAULT_SCALING_FACTOR,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ComponentMetadata,
    ImageClassifierMetadata,
    TextClassifierMetadata,
    UNetMetadata,
    VaeMetadata,
    metadata_class,
)

logger = logging.getLogger(__name__)

# SD 1.x's scheduler_config.json (PNDM with the scaled-linear betas all SD-family UNets are trained on)
SD_SCHEDULER: dict[str, Any] = {
    "_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "clip_sample": False, "prediction_type": "epsilon", "trained_betas": None,
}
# SDXL base's scheduler_config.json
SDXL_SCHEDULER: dict[str, Any] = {
    "_class_name": "EulerDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "interpolation_type": "linear",
    "prediction_type": "epsilon", "sample_max_value": 1.0, "steps_offset": 1, "timestep_spacing": "leading",
    "use_karras_sigmas": False, "set_alpha_to_one": False, "skip_prk_steps": True, "clip_sample": False,
}
TOKENIZER_FOLDERS = {"text-encoder": "tokenizer", "text-encoder-2": "tokenizer_2", "text-encoder-3": "tokenizer_3"}


def _read(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _labels(config: dict[str, Any], num_labels: int) -> list[str]:
    id2label = config.get("id2label") or {}
    names = [str(id2label.get(str(i), id2label.get(i, f"label_{i}"))) for i in range(num_labels)]
    return names


def _num_outputs(comp: Component) -> int:
    shape = comp.spec.outputs[0].shape
    return int(shape[-1]) if shape and isinstance(shape[-1], int) else 0


def _folder_of(model: Any, comp: Component) -> tuple[Path | None, Path | None]:
    """(pipeline root, the component's own folder) for local checkpoints; (None, None) otherwise."""
    if not isinstance(model, (str, os.PathLike)):
        return None, None
    path = Path(model).expanduser()
    if not path.exists():
        return None, None
    if path.is_file():
        path = path.parent
    if (path / "model_index.json").exists():
        sub = {"unet": "unet", "unet-controlled": "unet", "controlnet": "controlnet", "vae-decoder": "vae",
               "vae-encoder": "vae", "text-encoder": "text_encoder", "text-encoder-2": "text_encoder_2",
               "text-encoder-3": "text_encoder_3", "transformer": "transformer"}.get(comp.name)
        return path, (path / sub if sub else None)
    return None, path


def _metadata(comp: Component, config: dict[str, Any], root: Path | None, folder: Path | None
              ) -> ComponentMetadata:
    """The component's typed metadata, from its config and, for local checkpoints, the files beside it."""
    dims = comp.spec.profile.dims
    if comp.name == "transformer":  # a diffusion transformer: family and scheduler from its class
        from fastgen.models.presets_dit import DIT_FAMILIES

        family, default_scheduler = DIT_FAMILIES.get(comp.spec.model_type, (None, {}))
        scheduler = _read(root / "scheduler" / "scheduler_config.json") if root else {}
        return UNetMetadata(scheduler=scheduler or dict(default_scheduler), pipeline=family)  # type: ignore[arg-type]
    if comp.name in ("unet", "unet-controlled"):
        sdxl = config.get("addition_embed_type") == "text_time"
        scheduler = _read(root / "scheduler" / "scheduler_config.json") if root else {}
        zeros = None
        if sdxl:
            index = _read(root / "model_index.json") if root else {}
            zeros = bool(index.get("force_zeros_for_empty_prompt", True))
        return UNetMetadata(scheduler=scheduler or dict(SDXL_SCHEDULER if sdxl else SD_SCHEDULER),
                            pipeline="sdxl" if sdxl else "sd", force_zeros_for_empty_prompt=zeros)
    if comp.name in ("vae-decoder", "vae-encoder"):
        return VaeMetadata(scaling_factor=float(config.get("scaling_factor", DEFAULT_SCALING_FACTOR)),
                           latent_factor=2 ** (len(config.get("block_out_channels", [0] * 4)) - 1),
                           shift_factor=config.get("shift_factor"))
    if comp.name == "classifier":
        processor = _read(folder / "preprocessor_config.json") if folder else {}
        size = processor.get("size", {})
        image_size = dims["height"].opt if "height" in dims else DEFAULT_IMAGE_SIZE
        if isinstance(size, dict):
            image_size = int(size.get("height") or size.get("shortest_edge") or image_size)
        elif isinstance(size, int):
            image_size = size
        # Recorded in full (not left to the consumers' defaults), as the processor says or else the defaults.
        return ImageClassifierMetadata(labels=_labels(config, _num_outputs(comp)), image_size=image_size,
                                       mean=processor.get("image_mean", IMAGENET_MEAN),
                                       std=processor.get("image_std", IMAGENET_STD),
                                       resample=int(processor.get("resample", DEFAULT_RESAMPLE)))
    if comp.name == "text-classifier":
        return TextClassifierMetadata(labels=_labels(config, _num_outputs(comp)),
                                      max_length=int(dims["seq"].max) if "seq" in dims else DEFAULT_MAX_LENGTH)
    return metadata_class(comp.name)()


def attach_assets(comp: Component, model: Any) -> Component:
    """Fill ``comp.tokenizer`` and ``comp.metadata`` for a component loaded from ``model``."""
    from fastgen.models import presets, tokenizers

    config = dict(comp.source.get("config") or {})
    is_preset = isinstance(model, str) and model in presets.list_presets()
    root, folder = _folder_of(model, comp)
    comp.metadata = _metadata(comp, config, root, folder)

    if comp.name in ("text-encoder", "text-encoder-2", "text-encoder-3", "text-classifier"):
        try:
            if is_preset:
                comp.tokenizer = tokenizers.preset_tokenizer(config, comp.source.get("class", ""), comp.name)
            elif root is not None and (root / TOKENIZER_FOLDERS.get(comp.name, "tokenizer")).exists():
                comp.tokenizer = tokenizers.load_tokenizer(root / TOKENIZER_FOLDERS.get(comp.name, "tokenizer"))
            elif folder is not None and any((folder / f).exists() for f in
                                            ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json")):
                comp.tokenizer = tokenizers.load_tokenizer(folder)
        except Exception as exc:  # a model without a usable tokenizer still exports and builds
            logger.warning("no tokenizer for %s of %s: %s", comp.name, model, exc)
    return comp
