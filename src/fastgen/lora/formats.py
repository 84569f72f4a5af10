"""LoRA files to :class:`LoraAdapter`: diffusers/PEFT safetensors, diffusers' older attention-processor
keys, and kohya-style (``lora_unet_...``/``lora_te_...``) keys, for the UNet and the text encoders.

Keys are normalised to ``(component, module key)``: the component is ``unet``, ``text_encoder`` or
``text_encoder_2`` (diffusers' pipeline attribute names) and the module key is diffusers' dotted module
path (``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``), except for kohya files, whose
underscore-joined paths are ambiguous (``to_out_0`` vs ``to_out.0``) and are resolved against the target
model's module names later (:func:`fastgen.lora.targets.resolve_keys`).

Scaling follows diffusers/PEFT: a layer adds ``scale * (alpha / rank) * up @ down``, where ``alpha`` is a
per-module ``.alpha`` tensor (kohya), the ``lora_adapter_metadata`` JSON that diffusers'
``save_lora_weights`` writes (``unet.lora_alpha``, ``unet.alpha_pattern``...), or else the rank (scale 1,
diffusers' convention when a file carries no alpha).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from fastgen.errors import InvalidArgumentError

logger = logging.getLogger(__name__)

#: Components a LoRA file can target (diffusers' pipeline attribute names).
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
#: diffusers' metadata key (``diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY``).
METADATA_KEY = "lora_adapter_metadata"
#: kohya prefixes -> component. ``lora_te_`` is SD 1.x/2.x's only text encoder, ``lora_te1_``/``lora_te2_`` SDXL's.
KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2",
                  "lora_te_": "text_encoder"}
#: diffusers' older attention-processor names -> the module they adapt.
_PROCESSOR_NAMES = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
_PEFT = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$")
_OLD = re.compile(r"^(?P<module>.+?)(?:\.lora(?:_linear_layer)?|_lora)\.(?P<which>down|up)\.weight$")
_KOHYA = re.compile(r"^(?P<module>lora_(?:unet|te\d?)_[A-Za-z0-9_]+)\.(?P<which>lora_down|lora_up|alpha)(?:\.weight)?$")


@dataclasses.dataclass(frozen=True)
class LoraLayer:
    """One adapted module: ``delta = (alpha / rank) * up @ down`` (before the adapter's scale)."""

    down: torch.Tensor
    """``A``/``lora_down``: (rank, in_features) for a Linear, (rank, in_channels, kh, kw) for a Conv2d."""
    up: torch.Tensor
    """``B``/``lora_up``: (out_features, rank) for a Linear, (out_channels, rank, 1, 1) for a Conv2d."""
    alpha: float
    """LoRA alpha (the rank when the file gives none)."""

    def __post_init__(self) -> None:
        if self.down.dim() not in (2, 4) or self.up.dim() != self.down.dim() or self.up.shape[1] != self.down.shape[0]:
            raise InvalidArgumentError("lora layer", f"down {tuple(self.down.shape)}, up {tuple(self.up.shape)}",
                                       reason="up's second dim must be down's rank (Linear or Conv2d weights)")

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight update at scale 1, in the adapted module's weight layout (out, in[, kh, kw])."""
        down, up = self.down.to(dtype), self.up.to(dtype)
        # (out, rank) @ (rank, in * kh * kw): a 1x1 up projection after any down kernel.
        flat = up.flatten(1) @ down.flatten(1)
        shape = (up.shape[0], *down.shape[1:])
        return flat.reshape(shape) * (self.alpha / self.rank)


@dataclasses.dataclass(frozen=True)
class LoraAdapter:
    """A LoRA file's layers by component and module key (see the module docstring)."""

    name: str
    """The adapter's name (``set_adapters`` refers to it)."""
    layers: Mapping[str, Mapping[str, LoraLayer]]
    """component -> module key -> layer."""
    kohya: bool = False
    """Whether module keys are kohya's underscore-joined paths (resolved against the target's modules)."""
    path: str = ""
    """The file it was read from ('' when built in memory)."""

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise InvalidArgumentError("name", self.name, reason="an adapter needs a non-empty name")
        unknown = [c for c in self.layers if c not in COMPONENTS]
        if unknown:
            raise InvalidArgumentError("lora component", unknown[0], COMPONENTS)

    @property
    def num_layers(self) -> int:
        return sum(len(v) for v in self.layers.values())


def _metadata_alphas(metadata: Mapping[str, Any] | None, component: str) -> tuple[float | None, dict[str, float]]:
    """(lora_alpha, alpha_pattern) of ``component`` from diffusers' adapter metadata (both may be absent)."""
    if not metadata:
        return None, {}
    alpha = metadata.get(f"{component}.lora_alpha")
    pattern = metadata.get(f"{component}.alpha_pattern") or {}
    return (float(alpha) if alpha is not None else None), {str(k): float(v) for k, v in dict(pattern).items()}


def _pattern_alpha(pattern: Mapping[str, float], module: str) -> float | None:
    """PEFT's alpha_pattern lookup: a key matches a module path that equals it or ends with ``.key``
    (``^key``: anchored at the start)."""
    for key, value in pattern.items():
        regex = key[1:] if key.startswith("^") else rf"(.*\.)?{key}"
        if re.fullmatch(regex, module):
            return value
    return None


def parse_state_dict(state_dict: Mapping[str, torch.Tensor], *, name: str, metadata: Mapping[str, Any] | None = None,
                     default_component: str = "unet", path: str = "") -> LoraAdapter:
    """A LoRA state dict (any supported format) as a :class:`LoraAdapter`.

    Keys without a component prefix belong to ``default_component`` (diffusers' convention for
    un-prefixed UNet files). A key that is none of the formats is an error naming it.
    """
    if default_component not in COMPONENTS:
        raise InvalidArgumentError("default_component", default_component, COMPONENTS)
    if not state_dict:
        raise InvalidArgumentError("lora", path or name, reason="holds no tensors")
    pairs: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    alphas: dict[tuple[str, str], float] = {}
    kohya = any(k.startswith(tuple(KOHYA_PREFIXES)) for k in state_dict)
    for key, tensor in state_dict.items():
        if kohya:
            m = _KOHYA.match(key)
            if m is None:
                raise InvalidArgumentError("lora key", key, reason="not a kohya LoRA key "
                                           "(lora_unet_<module>.lora_down.weight / .lora_up.weight / .alpha)")
            module = m["module"]
            prefix = next(p for p in KOHYA_PREFIXES if module.startswith(p))
            where = (KOHYA_PREFIXES[prefix], module[len(prefix):])
            if m["which"] == "alpha":
                alphas[where] = float(tensor.float().reshape(-1)[0])
            else:
                pairs.setdefault(where, {})["down" if m["which"] == "lora_down" else "up"] = tensor
            continue
        component, rest = default_component, key
        for c in sorted(COMPONENTS, key=len, reverse=True):  # text_encoder_2 before text_encoder
            if key.startswith(f"{c}."):
                component, rest = c, key[len(c) + 1:]
                break
        rest = rest.removeprefix("base_model.model.")  # a raw PEFT model's state dict
        if rest.endswith(".alpha"):
            alphas[(component, rest[: -len(".alpha")])] = float(tensor.float().reshape(-1)[0])
            continue
        m = _PEFT.match(rest)
        if m is not None:
            pairs.setdefault((component, m["module"]), {})["down" if m["which"] == "A" else "up"] = tensor
            continue
        m = _OLD.match(rest)
        if m is None:
            raise InvalidArgumentError("lora key", key, reason="not a LoRA weight (diffusers/PEFT lora_A/lora_B, "
                                       "lora.down/lora.up, or kohya lora_unet_/lora_te_ keys)")
        module = m["module"]
        for old, new in _PROCESSOR_NAMES.items():  # ...attn1.processor.to_out_lora.down -> ...attn1.to_out.0
            if module.endswith(f".processor.{old}"):
                module = module[: -len(f"processor.{old}")] + new
        pairs.setdefault((component, module), {})["down" if m["which"] == "down" else "up"] = tensor
    layers: dict[str, dict[str, LoraLayer]] = {}
    for (component, module), pair in sorted(pairs.items()):
        if set(pair) != {"down", "up"}:
            missing = "up (lora_B)" if "up" not in pair else "down (lora_A)"
            raise InvalidArgumentError("lora", path or name, reason=f"{component} module {module} has no {missing} weight")
        meta_alpha, pattern = _metadata_alphas(metadata, component)
        rank = int(pair["down"].shape[0])
        alpha = alphas.get((component, module))
        if alpha is None:
            alpha = _pattern_alpha(pattern, module)
        if alpha is None:
            alpha = meta_alpha if meta_alpha is not None else float(rank)
        layers.setdefault(component, {})[module] = LoraLayer(pair["down"], pair["up"], alpha)
    stray = sorted(set(alphas) - set(pairs))
    if stray:
        raise InvalidArgumentError("lora", path or name, reason=f"alpha for {stray[0][1]} without its weights")
    return LoraAdapter(name=name, layers=layers, kohya=kohya, path=path)


def read_lora(path: str | os.PathLike, *, name: str | None = None, default_component: str = "unet") -> LoraAdapter:
    """Read a LoRA ``.safetensors`` file (or a folder holding ``pytorch_lora_weights.safetensors``, as
    diffusers saves it). ``name`` defaults to the file's stem (the folder's name for a folder). Pickled ``.bin`` files are refused."""
    from safetensors import SafetensorError, safe_open

    p = Path(path).expanduser()
    default_name = p.name if p.is_dir() else p.stem
    if p.is_dir():
        candidates = sorted(p.glob("*.safetensors"))
        p = p / "pytorch_lora_weights.safetensors" if (p / "pytorch_lora_weights.safetensors").is_file() else (
            candidates[0] if len(candidates) == 1 else p)
    if not p.is_file():
        raise InvalidArgumentError("lora", os.fspath(path), reason="no such .safetensors file (or a folder with "
                                   "exactly one)")
    if p.suffix != ".safetensors":
        raise InvalidArgumentError("lora", os.fspath(path), ".safetensors files",
                                   reason="pickled checkpoints are never loaded")
    try:
        with safe_open(str(p), framework="pt", device="cpu") as f:
            file_meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as exc:
        raise InvalidArgumentError("lora", os.fspath(path), reason=f"not a readable safetensors file ({exc})") from exc
    metadata = None
    if file_meta.get(METADATA_KEY):
        try:
            metadata = json.loads(file_meta[METADATA_KEY])
        except json.JSONDecodeError as exc:
            raise InvalidArgumentError("lora", os.fspath(path), reason=f"bad {METADATA_KEY} JSON ({exc})") from exc
    adapter = parse_state_dict(tensors, name=name or default_name, metadata=metadata, default_component=default_component,
                               path=str(p))
    logger.info("LoRA %s: %d layers from %s (%s)", adapter.name, adapter.num_layers, p.name,
                ", ".join(f"{c}: {len(v)}" for c, v in adapter.layers.items()))
    return adapter


__all__ = ["COMPONENTS", "KOHYA_PREFIXES", "LoraAdapter", "LoraLayer", "parse_state_dict", "read_lora"]
