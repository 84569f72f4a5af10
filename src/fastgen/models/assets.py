"""What a pipeline needs beside a component's weights: its tokenizer and typed metadata.

:func:`attach_assets` fills ``comp.tokenizer`` and ``comp.metadata`` (one class per component kind,
see :mod:`fastgen.models.metadata`):

- ``unet``: :class:`UNetMetadata` (scheduler config, ``sd`` or ``sdxl``, SDXL's empty-prompt zeros);
- ``transformer``: :class:`UNetMetadata` (scheduler config, ``sd3`` / ``flux`` / ``pixart``);
- ``vae-decoder`` / ``vae-encoder``: :class:`VaeMetadata` (scaling factor, latent factor, shift factor);
- ``classifier``: :class:`ImageClassifierMetadata` (labels in index order, image size, mean, std, resample);
- ``text-classifier``: :class:`TextClassifierMetadata` (labels, max length);
- ``text-encoder`` of a sentence-transformers folder or an embedding preset: :class:`TextEncoderMetadata`
  (pooling, normalize, max length: :func:`embedding_settings`);
- ``image-encoder``: :class:`ImageEncoderMetadata` (image size, mean, std, resample, pooling).

Engines built by ``fastgen.build`` keep the metadata in ``manifest.json`` (``metadata``) and the
tokenizer in a ``tokenizer/`` folder, so a service can run from engine directories alone.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

from fastgen.errors import ModelNotFoundError
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
    ImageEncoderMetadata,
    TextClassifierMetadata,
    TextEncoderMetadata,
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


def read_json(path: Path, *, required: bool = False, expect: type = dict) -> Any:
    """The JSON value in ``path``: an object (``expect=list``: an array, as ``modules.json``). A missing or
    unreadable file, or one that holds another type, is a :class:`~fastgen.errors.ModelNotFoundError` naming it
    when ``required`` (a model's own ``config.json``), else an empty ``expect`` (an optional extra, such as a
    processor or scheduler config: the caller's defaults apply)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        if required:
            raise ModelNotFoundError(f"{path}: unreadable JSON ({exc})") from None
        return expect()
    if not isinstance(data, expect):
        if required:
            raise ModelNotFoundError(f"{path}: expected a JSON {'object' if expect is dict else expect.__name__}")
        return expect()
    return data


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
        scheduler = read_json(root / "scheduler" / "scheduler_config.json") if root else {}
        return UNetMetadata(scheduler=scheduler or dict(default_scheduler), pipeline=family)  # type: ignore[arg-type]
    if comp.name in ("unet", "unet-controlled"):
        sdxl = config.get("addition_embed_type") == "text_time"
        scheduler = read_json(root / "scheduler" / "scheduler_config.json") if root else {}
        zeros = None
        if sdxl:
            index = read_json(root / "model_index.json") if root else {}
            zeros = bool(index.get("force_zeros_for_empty_prompt", True))
        return UNetMetadata(scheduler=scheduler or dict(SDXL_SCHEDULER if sdxl else SD_SCHEDULER),
                            pipeline="sdxl" if sdxl else "sd", force_zeros_for_empty_prompt=zeros)
    if comp.name in ("vae-decoder", "vae-encoder"):
        return VaeMetadata(scaling_factor=float(config.get("scaling_factor", DEFAULT_SCALING_FACTOR)),
                           latent_factor=2 ** (len(config.get("block_out_channels", [0] * 4)) - 1),
                           shift_factor=config.get("shift_factor"))
    if comp.name in ("classifier", "image-encoder"):
        processor = read_json(folder / "preprocessor_config.json") if folder else {}
        size = processor.get("size", {})
        image_size = dims["height"].opt if "height" in dims else DEFAULT_IMAGE_SIZE
        if isinstance(size, dict):
            image_size = int(size.get("height") or size.get("shortest_edge") or image_size)
        elif isinstance(size, int):
            image_size = size
        # Recorded in full (not left to the consumers' defaults), as the processor says or else the defaults.
        if comp.name == "image-encoder":
            return ImageEncoderMetadata(image_size=image_size, mean=processor.get("image_mean", IMAGENET_MEAN),
                                        std=processor.get("image_std", IMAGENET_STD),
                                        resample=int(processor.get("resample", DEFAULT_RESAMPLE)))
        return ImageClassifierMetadata(labels=_labels(config, _num_outputs(comp)), image_size=image_size,
                                       mean=processor.get("image_mean", IMAGENET_MEAN),
                                       std=processor.get("image_std", IMAGENET_STD),
                                       resample=int(processor.get("resample", DEFAULT_RESAMPLE)))
    if comp.name == "text-classifier":
        return TextClassifierMetadata(labels=_labels(config, _num_outputs(comp)),
                                      max_length=int(dims["seq"].max) if "seq" in dims else DEFAULT_MAX_LENGTH)
    return metadata_class(comp.name)()


def sentence_transformer_folder(path: Path) -> Path | None:
    """The transformer's folder of a sentence-transformers model folder (``modules.json``: the root or
    ``0_Transformer/``); None when ``path`` is not one."""
    modules = read_json(path / "modules.json", expect=list) if (path / "modules.json").is_file() else None
    if not modules:  # no modules.json, or an unreadable one: not a sentence-transformers folder
        return None
    for module in modules:
        if isinstance(module, dict) and str(module.get("type", "")).endswith("Transformer"):
            return path / str(module.get("path") or "")
    return None


# Pooling's config keys before sentence-transformers 5 (one boolean per mode), as its new mode names.
_LEGACY_POOLING = {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max",
                   "pooling_mode_mean_tokens": "mean", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
                   "pooling_mode_weightedmean_tokens": "weightedmean", "pooling_mode_lasttoken": "lasttoken"}


def embedding_settings(path: Path) -> dict[str, Any] | None:
    """``{"pooling", "normalize", "max_length"}`` of a sentence-transformers folder (None when ``path`` is
    not one): its Pooling module's mode, whether a Normalize module follows, and ``max_seq_length``.
    A layout whose embedding fastgen would compute differently (a Dense layer, concatenated or
    weighted pooling) is refused in one line rather than embedded wrongly."""
    from fastgen.errors import UnsupportedError
    from fastgen.models.metadata import POOLING_MODES

    modules = read_json(path / "modules.json", expect=list) if (path / "modules.json").is_file() else None
    if not modules:  # no modules.json, or an unreadable one: not a sentence-transformers folder
        return None
    pooling, normalize = None, False
    for module in modules:
        kind = str(module.get("type", "")).rsplit(".", 1)[-1] if isinstance(module, dict) else ""
        if kind == "Pooling":
            cfg = read_json(path / str(module.get("path") or "") / "config.json")
            mode = cfg.get("pooling_mode")
            if mode is None:
                mode = [name for key, name in _LEGACY_POOLING.items() if cfg.get(key)] or "mean"
            if isinstance(mode, list):
                mode = mode[0] if len(mode) == 1 else "+".join(mode)
            if mode not in POOLING_MODES or mode == "pooled":
                raise UnsupportedError(f"{path}: sentence-transformers pooling {mode!r} (supported: "
                                       f"{', '.join(m for m in POOLING_MODES if m != 'pooled')})")
            pooling = mode
        elif kind == "Normalize":
            normalize = True
        elif kind not in ("Transformer", ""):
            raise UnsupportedError(f"{path}: sentence-transformers module {kind} (supported: Transformer, "
                                   "Pooling, Normalize)")
    inner = sentence_transformer_folder(path)
    st_config = {**read_json(path / "sentence_bert_config.json"),
                 **(read_json(inner / "sentence_bert_config.json") if inner is not None else {})}
    max_length = st_config.get("max_seq_length")
    return {"pooling": pooling or "mean", "normalize": normalize,
            "max_length": int(max_length) if isinstance(max_length, int) and max_length > 0 else None}


def attach_assets(comp: Component, model: Any) -> Component:
    """Fill ``comp.tokenizer`` and ``comp.metadata`` for a component loaded from ``model``."""
    from fastgen.models import presets, tokenizers

    config = dict(comp.source.get("config") or {})
    is_preset = isinstance(model, str) and model in presets.list_presets()
    root, folder = _folder_of(model, comp)
    if comp.name in ("text-tower", "image-tower"):  # CLIP / SigLIP: models.adapters_clip
        from fastgen.models.adapters_clip import tower_assets

        return tower_assets(comp, model, folder, is_preset)
    comp.metadata = _metadata(comp, config, root, folder)
    st_root = folder if folder is not None and (folder / "modules.json").is_file() else None
    if comp.name == "text-encoder" and (st_root is not None or is_preset):
        settings = embedding_settings(st_root) if st_root is not None else presets.preset_embedding(model, comp.name)
        if settings:
            comp.metadata = TextEncoderMetadata(**settings)
        inner = sentence_transformer_folder(st_root) if st_root is not None else None
        folder = inner if inner is not None else folder  # the tokenizer sits beside the transformer
    elif comp.name == "image-encoder" and is_preset:
        settings = presets.preset_embedding(model, comp.name)
        if settings:
            comp.metadata = dataclasses.replace(comp.metadata, **settings)

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
