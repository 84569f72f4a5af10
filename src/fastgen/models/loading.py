"""Load components from presets and local checkpoints (offline only), rebuild them without pickle.

A model is a preset name (``tiny``, ``sd15``, ``sdxl``), an ``nn.Module``, or a local path:

- a diffusers pipeline folder (``model_index.json``; ``unet/`` or ``transformer/`` (SD3, FLUX, PixArt),
  ``vae/``, ``text_encoder/``, ``text_encoder_2/``, ``text_encoder_3/`` subfolders);
- a diffusers model folder (``config.json`` with ``_class_name``) or a transformers model folder
  (``config.json`` with ``architectures`` / ``model_type``);
- a ``.safetensors`` file: the folder around it when a ``config.json`` sits beside it, otherwise
  identified by matching its tensor names and shapes against the preset architectures.

Nothing is ever downloaded (``local_files_only=True``), and only safetensors weights are read.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastgen.errors import InvalidArgumentError, ModelNotFoundError, UnsupportedError
from fastgen.models import presets
from fastgen.models.adapters import adapt
from fastgen.models.adapters_clip import TOWER_NAMES, folder_class
from fastgen.models.adapters_diffusers import vae_latent_factor
from fastgen.models.assets import attach_assets, read_json
from fastgen.models.component import Component
from fastgen.models.spec import ShapeProfile

logger = logging.getLogger(__name__)

# Pipeline subfolder -> the components it provides.
PIPELINE_FOLDERS = {
    "unet": ("unet",),
    "transformer": ("transformer",),
    "vae": ("vae-decoder", "vae-encoder"),
    "text_encoder": ("text-encoder",),
    "text_encoder_2": ("text-encoder-2",),
    "text_encoder_3": ("text-encoder-3",),
    "controlnet": ("controlnet",),
}
DIFFUSERS_COMPONENTS = {
    "UNet2DConditionModel": ("unet",),
    "UNet2DModel": ("unet",),
    "AutoencoderKL": ("vae-decoder", "vae-encoder"),
    "ControlNetModel": ("controlnet",),
    "SD3Transformer2DModel": ("transformer",),
    "FluxTransformer2DModel": ("transformer",),
    "PixArtTransformer2DModel": ("transformer",),
}


@dataclass
class _Plan:
    """What a model name offers: per component, how to build its model and the adapter options."""

    origin: str
    builders: dict[str, Callable[[int], nn.Module]] = field(default_factory=dict)
    options: dict[str, dict[str, Any]] = field(default_factory=dict)

    def add(self, names: tuple[str, ...], build: Callable[[int], nn.Module], **options: Any) -> None:
        for name in names:
            self.builders[name] = build
            self.options[name] = options


# --- building models ---------------------------------------------------------------------------

@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Create parameters on the meta device (no memory, no random init) but buffers for real.

    Non-persistent buffers (position ids...) are not in a state dict, so they must be computed by
    the constructor as usual; parameters are all replaced by ``load_state_dict(assign=True)``.
    ``nn.Module.register_parameter`` is patched for the duration, but the patch acts only in the
    thread that builds (other threads constructing modules meanwhile are unaffected), and builds
    are serialised by a lock so two of them never restore each other's patch.
    """
    with _META_LOCK:
        original = nn.Module.register_parameter
        owner = threading.get_ident()

        def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
            if param is not None and param.device.type != "meta" and threading.get_ident() == owner:
                param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
            original(module, name, param)

        nn.Module.register_parameter = register  # type: ignore[method-assign]
        try:
            yield
        finally:
            nn.Module.register_parameter = original  # type: ignore[method-assign]


_META_LOCK = threading.Lock()


def _from_state_dict(library: str, cls_name: str, config: dict[str, Any],
                     state_dict: Mapping[str, torch.Tensor], *, prepare: Callable[[nn.Module], None] | None = None
                     ) -> nn.Module:
    """Build a model class from the allowlist and take ``state_dict`` as its weights (strict).

    ``prepare``: called on the built model (parameters on the meta device) before the state dict is
    loaded, e.g. to swap layers for the quantized ones whose codes and scales the state dict holds.
    """
    presets.model_class(library, cls_name)  # refuse anything outside the allowlist before building
    # fork_rng: a constructor that draws values before registering them must not move the global RNG.
    with torch.random.fork_rng(devices=[]), _parameters_on_meta():
        model = presets.instantiate(library, cls_name, config)
        if prepare is not None:
            prepare(model)
    model.load_state_dict(_aligned(state_dict), strict=True, assign=True)
    return model.eval()


def _aligned(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict with each CPU tensor that is not contiguous or not 64-byte aligned copied.

    safetensors hands out views into the file's bytes at odd addresses; CPU kernels then take
    other vector paths, so results drift in the last bits from the saved model (and run slower).
    Tensors that are one (tied weights) stay one.
    """
    copies: dict[tuple, torch.Tensor] = {}
    out = {}
    for name, tensor in state_dict.items():
        if tensor.is_contiguous() and (tensor.device.type != "cpu" or tensor.data_ptr() % 64 == 0):
            out[name] = tensor
            continue
        key = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.stride())
        if key not in copies:
            copies[key] = tensor.clone(memory_format=torch.contiguous_format)
        out[name] = copies[key]
    return out


@functools.cache
def _meta_signature(preset: str, component: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """Sorted (name, shape) of a preset component's state dict, built on the meta device."""
    model = presets.build_preset_model(preset, component, device="meta")
    return tuple(sorted((k, tuple(v.shape)) for k, v in model.state_dict().items()))


def _variant(folder: Path, stem: str) -> str | None:
    """``fp16`` when the folder only has fp16-variant safetensors (``stem.fp16.safetensors``)."""
    if (folder / f"{stem}.safetensors").exists() or (folder / f"{stem}.safetensors.index.json").exists():
        return None
    if any(folder.glob(f"{stem}.fp16.safetensors*")):
        return "fp16"
    return None


def _check_weights(folder: Path, stem: str) -> None:
    if any(folder.glob(f"{stem}*.safetensors")) or any(folder.glob(f"{stem}*.safetensors.index.json")):
        return
    if any(folder.glob("*.bin")) or any(folder.glob("*.ckpt")) or any(folder.glob("*.pt")):
        raise UnsupportedError(f"{folder}: only pickled weights (.bin/.ckpt/.pt) found; fastgen loads "
                               ".safetensors only (convert with save_pretrained(safe_serialization=True))")
    raise ModelNotFoundError(f"{folder}: no {stem}.safetensors weights next to config.json")


def _load_diffusers(folder: Path, cls_name: str) -> nn.Module:
    _check_weights(folder, "diffusion_pytorch_model")
    cls = presets.model_class("diffusers", cls_name)
    with _load_errors(folder, cls_name):
        model = cls.from_pretrained(folder, local_files_only=True, use_safetensors=True,
                                    torch_dtype=torch.float32, variant=_variant(folder, "diffusion_pytorch_model"))
    return model.float().eval()


@contextlib.contextmanager
def _load_errors(folder: Path, cls_name: str) -> Iterator[None]:
    """Turn the libraries' multi-line loading errors into one line naming the folder."""
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, ValueError, SafetensorError) as exc:
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise ModelNotFoundError(f"{folder}: cannot load {cls_name}: {first}") from exc


def _dtype_kwarg() -> str:
    import transformers

    major, minor = (int(p) for p in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"  # renamed in 4.56


def _load_transformers(folder: Path, cls_name: str) -> nn.Module:
    _check_weights(folder, "model")
    if cls_name == "AutoModel":
        import transformers

        cls: Any = transformers.AutoModel
    else:
        cls = presets.model_class("transformers", cls_name)
    kwargs = {_dtype_kwarg(): torch.float32}
    with _load_errors(folder, cls_name):
        model = cls.from_pretrained(folder, local_files_only=True, use_safetensors=True,
                                    variant=_variant(folder, "model"), **kwargs)
    return model.float().eval()


# --- reading local paths -----------------------------------------------------------------------

def _transformers_class(config: dict[str, Any]) -> tuple[str, str]:
    """(component, class name to load) of a transformers folder, from its architecture name."""
    archs = config.get("architectures") or []
    arch = archs[0] if archs else ""
    if arch in ("CLIPTextModel", "CLIPTextModelWithProjection"):
        return "text-encoder", arch
    if config.get("model_type") == "clip":  # a full CLIP checkpoint: take its text tower
        return "text-encoder", "CLIPTextModel"
    if arch == "T5EncoderModel":  # AutoModel would build the whole encoder-decoder
        return "text-encoder", arch
    if arch.endswith("ForSequenceClassification"):
        return "text-classifier", arch
    if arch.endswith("ForImageClassification"):
        return "classifier", arch
    if arch.endswith("Model") and "vocab_size" not in config and "image_size" in config:
        return "image-encoder", "AutoModel"  # a vision base model (ViT, DINOv2...)
    if arch or config.get("model_type"):  # a base model or another head: its encoder via AutoModel
        return "text-encoder", "AutoModel"
    raise ModelNotFoundError("config.json has neither architectures nor model_type")


def _model_folder(plan: _Plan, folder: Path, names: tuple[str, ...] | None = None, **options: Any) -> None:
    """Add the component(s) of one diffusers or transformers model folder to ``plan``."""
    config = read_json(folder / "config.json", required=True)
    cls_name = config.get("_class_name")
    if isinstance(cls_name, str):
        if cls_name not in DIFFUSERS_COMPONENTS:
            raise UnsupportedError(f"{folder}: no fastgen adapter for diffusers {cls_name} "
                                   f"(supported: {', '.join(DIFFUSERS_COMPONENTS)})")
        plan.add(names or DIFFUSERS_COMPONENTS[cls_name], lambda seed: _load_diffusers(folder, cls_name),
                 **options)
        return
    towers = folder_class(config) if names is None else None
    if towers is not None:  # CLIPModel / SiglipModel: both towers (CLIP's text encoder too, for pipelines)
        plan.add(TOWER_NAMES, lambda seed: _load_transformers(folder, towers), **options)
        if towers == "CLIPModel":
            plan.add(("text-encoder",), lambda seed: _load_transformers(folder, "CLIPTextModel"), **options)
        return
    try:
        component, load_cls = _transformers_class(config)
    except ModelNotFoundError as exc:
        raise ModelNotFoundError(f"{folder}: {exc}") from None
    plan.add(names or (component,), lambda seed: _load_transformers(folder, load_cls), **options)


def _pipeline_plan(root: Path) -> _Plan:
    plan = _Plan(origin=str(root))
    vae_cfg = read_json(root / "vae" / "config.json", required=True) if (root / "vae" / "config.json").exists() else None
    # The denoiser's config gives the nominal size: a UNet's, else a diffusion transformer's.
    den = next((root / sub for sub in ("unet", "transformer") if (root / sub / "config.json").exists()), None)
    unet_cfg = read_json(den / "config.json", required=True) if den is not None else None
    factor = vae_latent_factor(vae_cfg) if vae_cfg and vae_cfg.get("block_out_channels") else 8
    image_size = None
    if unet_cfg is not None and unet_cfg.get("sample_size"):
        size = unet_cfg["sample_size"]
        image_size = int(size[0] if isinstance(size, list) else size) * factor
    for sub, names in PIPELINE_FOLDERS.items():
        if (root / sub / "config.json").exists():
            try:
                _model_folder(plan, root / sub, names, latent_factor=factor, image_size=image_size)
            except UnsupportedError as exc:  # one exotic folder should not hide the others
                logger.warning("skipping %s: %s", root / sub, exc)
    if "controlnet" in plan.builders and "unet" in plan.builders:
        # A ControlNet pipeline: its UNet also as the component that takes the residuals.
        plan.builders["unet-controlled"] = plan.builders["unet"]
        plan.options["unet-controlled"] = plan.options["unet"]
    if not plan.builders:
        raise ModelNotFoundError(f"{root}: model_index.json but none of the subfolders "
                                 f"{', '.join(PIPELINE_FOLDERS)} has a config.json")
    return plan


def _safetensors_plan(path: Path) -> _Plan:
    if (path.parent / "config.json").exists():
        plan = _Plan(origin=str(path.parent))
        _model_folder(plan, path.parent)
        return plan
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            signature = tuple(sorted((k, tuple(f.get_slice(k).get_shape())) for k in f.keys()))
    except Exception as exc:  # safetensors raises its own error types for a bad header
        raise ModelNotFoundError(f"{path}: not a readable safetensors file ({exc})") from None
    tried: list[str] = []
    matches: list[tuple[str, str, str, dict[str, Any]]] = []
    for preset in presets.list_presets():
        for component in presets.preset_components(preset):
            tried.append(f"{preset}/{component}")
            if _meta_signature(preset, component) == signature:
                matches.append((preset, *presets.preset_config(preset, component)))
    if not matches:
        raise ModelNotFoundError(f"{path}: its {len(signature)} tensors match no known architecture (tried "
                                 f"{', '.join(tried)}); put the model's config.json beside it "
                                 "(single-file original SD checkpoints must be converted to diffusers first)")
    preset, library, cls_name, config = matches[0]
    # Same tensors, other settings (the SD 1.5 and SDXL VAEs differ only in scaling_factor).
    others = sorted({p for p, *rest in matches if rest != [library, cls_name, config]})
    if others:
        logger.warning("%s: its tensors fit the %s of preset %s and also of %s, whose configs differ; "
                       "using %s's config (put a config.json beside the file to choose)",
                       path, cls_name, preset, ", ".join(others), preset)
    else:
        logger.info("%s: identified as the %s architecture of preset %s", path, cls_name, preset)
    # Every component of that preset built from this class and config (a VAE's two halves).
    names = tuple(c for c in presets.preset_components(preset)
                  if presets.preset_config(preset, c) == (library, cls_name, config))

    def build(seed: int) -> nn.Module:
        from safetensors.torch import load_file

        return _from_state_dict(library, cls_name, config, load_file(str(path))).float().eval()

    plan = _Plan(origin=str(path))
    plan.add(names, build, latent_factor=presets.PRESET_LATENT_FACTOR,
             image_size=presets.PRESET_IMAGE_SIZES[preset][1])
    return plan


def _preset_plan(name: str) -> _Plan:
    plan = _Plan(origin=name)
    for component in presets.preset_components(name):
        plan.add((component,), functools.partial(_seeded_preset, name, component),
                 latent_factor=presets.PRESET_LATENT_FACTOR, image_size=presets.PRESET_IMAGE_SIZES[name][1])
    return plan


def _seeded_preset(name: str, component: str, seed: int) -> nn.Module:
    return presets.build_preset_model(name, component, seed=seed)


def _plan(model: str | os.PathLike) -> _Plan:
    if isinstance(model, str) and model in presets.list_presets():
        return _preset_plan(model)
    if not isinstance(model, (str, os.PathLike)):
        raise InvalidArgumentError("model", type(model).__name__, "a preset name, a local path or a torch.nn.Module")
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelNotFoundError(
            f"{os.fspath(model)!r} is neither a preset ({', '.join(presets.list_presets())}) nor an existing "
            "local path; fastgen never downloads from a model hub: download the model yourself and pass its folder")
    if path.is_file():
        if path.suffix == ".safetensors":
            return _safetensors_plan(path)
        if path.name in ("config.json", "model_index.json"):
            path = path.parent
        else:
            raise ModelNotFoundError(f"{path}: not a model (expected a folder or a .safetensors file; fastgen "
                                     "never loads pickled .bin/.ckpt/.pt files)")
    if (path / "model_index.json").exists():
        return _pipeline_plan(path)
    if (path / "config.json").exists():
        plan = _Plan(origin=str(path))
        _model_folder(plan, path)
        return plan
    from fastgen.models.assets import sentence_transformer_folder

    inner = sentence_transformer_folder(path)  # a sentence-transformers folder: its 0_Transformer/
    if inner is not None and (inner / "config.json").exists():
        plan = _Plan(origin=str(path))
        _model_folder(plan, inner)
        return plan
    raise ModelNotFoundError(f"{path}: not a model folder (no model_index.json or config.json)")


def _choose(plan: _Plan, component: str | None) -> str:
    available = list(plan.builders)
    if component is None:
        if len(available) != 1:
            raise InvalidArgumentError("component", None, available, reason=f"{plan.origin} has several components")
        return available[0]
    if component not in available and component == "classifier" and "text-classifier" in available:
        return "text-classifier"  # the alias, when there is no image classifier
    if component not in available:
        raise InvalidArgumentError("component", component, available)
    return component


# --- public API --------------------------------------------------------------------------------

def model_components(model: str | os.PathLike) -> list[str]:
    """Component names a preset or local model offers, read from configs (no weights loaded)."""
    return list(_plan(model).builders)


def load_component(model: str | os.PathLike | nn.Module, component: str | None = None, *,
                   profile: ShapeProfile | str | None = None, seed: int = 0) -> Component:
    """Load one component of a preset, a local checkpoint or a module (see :mod:`fastgen.models.loading`).

    ``component`` may be None only when the model has exactly one; ``profile`` overrides ranges of
    the default shape profile; ``seed`` seeds a preset's random weights.
    """
    if isinstance(model, nn.Module):
        return adapt(model, component, profile=profile)
    plan = _plan(model)
    name = _choose(plan, component)
    module = plan.builders[name](seed)
    comp = adapt(module, name, profile=profile, **plan.options[name])
    comp.origin = plan.origin
    return attach_assets(comp, model)


def rebuild_component(source: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor], *,
                      prepare: Callable[[nn.Module], None] | None = None) -> Component:
    """Rebuild a component from its ``Component.source`` recipe and ``component.model``'s weights.

    No pickle: the class is looked up by name among diffusers ``ModelMixin`` and transformers
    ``PreTrainedModel`` subclasses only, built from its JSON config, and given ``state_dict``
    with ``load_state_dict(strict=True)``; the weights keep the dtype they have in ``state_dict``.
    ``prepare(model)`` runs between the two: a source with a ``quantization`` recipe needs one that
    swaps in its quantized layers (the torch engine passes ``fastgen.quant.apply_quantization_recipe``).
    """
    if not source:
        raise UnsupportedError("this component cannot be rebuilt: it was adapted from a custom nn.Module "
                               "(only diffusers / transformers models have a source recipe)")
    missing = [k for k in ("library", "class", "config", "adapter") if k not in source]
    if missing:
        raise InvalidArgumentError("source", sorted(source), reason=f"missing {', '.join(missing)}")
    library, cls_name = source["library"], source["class"]
    if source.get("quantization") and prepare is None:
        raise UnsupportedError(f"{cls_name} source has a quantization recipe: rebuild_component needs "
                               "prepare= to swap in its quantized layers (see fastgen.quant.apply_quantization_recipe)")
    model = _from_state_dict(library, cls_name, dict(source["config"]), state_dict, prepare=prepare)
    adapter = dict(source["adapter"])
    profile = adapter.get("profile")
    comp = adapt(model, adapter.get("component"), latent_factor=int(adapter.get("latent_factor", 8)),
                 image_size=adapter.get("image_size"),
                 profile=ShapeProfile.from_dict(profile) if profile else None)
    comp.origin = f"<rebuilt {cls_name}>"
    return comp


def weights_digest(module: nn.Module) -> str:
    """sha256 over a module's state dict: sorted names, dtypes, shapes and raw bytes."""
    h = hashlib.sha256()
    state = module.state_dict()
    for name in sorted(state):
        tensor = state[name].detach()
        if tensor.device.type == "meta":
            raise UnsupportedError(f"cannot digest {name!r}: the weights are on the meta device")
        h.update(f"{name}\0{str(tensor.dtype).removeprefix('torch.')}\0{tuple(tensor.shape)}\0".encode())
        flat = tensor.cpu().contiguous().reshape(-1)
        if flat.numel():
            # Viewing as bytes covers every dtype numpy lacks (bfloat16, float8) without a copy.
            h.update(flat.view(torch.uint8).numpy())
    return h.hexdigest()
