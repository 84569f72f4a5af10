"""LoRA files for the tests, written with peft and diffusers' own functions (nothing downloaded)."""

from __future__ import annotations

from pathlib import Path

import torch

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def peft_layers(model: torch.nn.Module, targets: list[str], *, rank: int, alpha: float, seed: int, std: float = 0.2):
    """peft's LoRA state dict for ``model`` (a copy is adapted) with seeded random A and B."""
    import copy

    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False)
    adapted = inject_adapter_in_model(config, copy.deepcopy(model))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return get_peft_model_state_dict(adapted), config


def save_diffusers_lora(out: Path, models: dict, *, rank: int, alpha: float, seed: int, text: bool = True,
                        convert: bool = False) -> Path:
    """A LoRA of the tiny UNet (and text encoder) saved by ``StableDiffusionPipeline.save_lora_weights``
    with its adapter metadata (alpha); returns the file. ``convert``: keys in diffusers' older spelling
    (``convert_state_dict_to_diffusers``: ``lora.down``/``lora_linear_layer.down``), else PEFT's
    (``lora_A``/``lora_B``)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers

    unet_sd, unet_cfg = peft_layers(models["unet"], UNET_TARGETS, rank=rank, alpha=alpha, seed=seed)
    fmt = convert_state_dict_to_diffusers if convert else dict
    kwargs = {"unet_lora_layers": fmt(unet_sd),
              "unet_lora_adapter_metadata": unet_cfg.to_dict()}
    if text:
        te_sd, te_cfg = peft_layers(models["text-encoder"], TEXT_TARGETS, rank=rank, alpha=alpha, seed=seed + 1)
        kwargs.update(text_encoder_lora_layers=fmt(te_sd),
                      text_encoder_lora_adapter_metadata=te_cfg.to_dict())
    StableDiffusionPipeline.save_lora_weights(str(out), **kwargs)
    return out / "pytorch_lora_weights.safetensors"


def to_kohya(path: Path, out: Path) -> Path:
    """The diffusers file at ``path`` rewritten with kohya keys (``lora_unet_<module>.lora_down.weight``,
    ``.lora_up.weight``, ``.alpha``), the alpha read from its metadata."""
    import json
    import re

    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    kohya = {}
    for key, value in tensors.items():
        component, _, rest = key.partition(".")
        m = re.fullmatch(r"(.+)\.(?:lora_linear_layer|lora)\.(down|up)\.weight|(.+)\.lora_([AB])\.weight", rest)
        module, which = (m[1], m[2]) if m[1] else (m[3], "down" if m[4] == "A" else "up")
        prefix = {"unet": "lora_unet_", "text_encoder": "lora_te_text_model_"}[component]  # kohya's 4.x CLIP names
        name = prefix + module.replace(".", "_")
        kohya[f"{name}.{'lora_down' if which.startswith('down') else 'lora_up'}.weight"] = value
        kohya[f"{name}.alpha"] = torch.tensor(float(meta[f"{component}.lora_alpha"]))
    save_file(kohya, str(out))
    return out
