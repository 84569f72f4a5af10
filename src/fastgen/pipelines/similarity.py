"""Image-text similarity of two-tower models (CLIP, SigLIP), and an aesthetic head on image embeddings.

The similarity is computed from the towers' embeddings exactly as transformers' ``CLIPModel`` /
``SiglipModel`` compute it, in float32 and in the same order: both embeddings L2-normalised, ``text @
image.T``, times ``exp(logit_scale)`` (SigLIP: plus ``logit_bias``), transposed to (n_images, n_texts):
that is ``logits_per_image``. CLIP reads it as logits (a softmax over texts gives zero-shot probabilities);
SigLIP as independent sigmoid probabilities.

:class:`AestheticHead`: LAION's aesthetic predictors, a linear layer (v1) or a stack of linear layers with
no activations between them (the "improved" MLP: its dropouts are identity at inference), on the L2-normalised
CLIP image embedding, one score per image. Read from a safetensors file (``weight`` / ``bias``, or
``<prefix>.<i>.weight`` / ``.bias`` applied in index order).
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastgen.errors import InvalidArgumentError, ModelNotFoundError

# The embeddings' normaliser (x / max(||x||, 1e-12)): the same float32 division as transformers' x / ||x|| for
# every row with a norm above 1e-12, and a zero row stays zero instead of becoming NaN.
from fastgen.pipelines.embeddings import l2_normalize

logger = logging.getLogger(__name__)

#: The aesthetic head's file name, looked for beside a model's towers (a model or engine folder's root).
AESTHETIC_FILE = "aesthetic.safetensors"
#: The label of an aesthetic head's score.
AESTHETIC_LABEL = "aesthetic"
#: The label of a prompt-adherence score (an image against its own prompt): best-of-N's default ranking.
SIMILARITY_LABEL = "similarity"


def similarity_logits(image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: float,
                      logit_bias: float | None = None) -> torch.Tensor:
    """``logits_per_image`` (n_images, n_texts) float32 from unnormalised (n_images, dim) and (n_texts, dim)
    embeddings: ``scale * cos`` (+ ``bias``), in transformers' order of operations."""
    image = l2_normalize(image_embeds.float())
    text = l2_normalize(text_embeds.float())
    per_text = torch.matmul(text, image.t()) * torch.tensor(logit_scale, dtype=torch.float32)  # (n_texts, n_images)
    if logit_bias is not None:
        per_text = per_text + torch.tensor(logit_bias, dtype=torch.float32)
    return per_text.t().contiguous()


class AestheticHead(nn.Module):
    """Linear layers applied in order to L2-normalised image embeddings (batch, dim) -> scores (batch,).

    No activation between the layers, as LAION's improved aesthetic predictor (whose dropouts do nothing at
    inference); a single ``Linear(dim, 1)`` is LAION's first predictor.
    """

    def __init__(self, layers: list[nn.Linear]) -> None:
        super().__init__()
        if not layers or layers[-1].out_features != 1:
            raise InvalidArgumentError("aesthetic", f"{len(layers)} layers",
                                       reason="an aesthetic head ends in a layer with one output")
        for a, b in zip(layers, layers[1:]):
            if a.out_features != b.in_features:
                raise InvalidArgumentError("aesthetic", f"a {a.out_features}-wide layer before a {b.in_features}-wide "
                                           "one", reason="the head's layers do not chain")
        self.layers = nn.ModuleList(layers)

    @property
    def in_features(self) -> int:
        return self.layers[0].in_features

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        x = l2_normalize(embeds.float())  # (batch, dim)
        for layer in self.layers:
            x = layer(x)
        return x[:, 0]  # (batch,)

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor], origin: str = "state dict") -> AestheticHead:
        """``weight`` / ``bias`` (one layer), or ``<prefix>.<i>.weight`` / ``.bias`` (layers in index order)."""
        if "weight" in state:
            groups = {0: ""}
        else:
            groups = {}
            for key in state:
                m = re.fullmatch(r"(.*?)(\d+)\.weight", key)
                if m:
                    groups[int(m.group(2))] = f"{m.group(1)}{m.group(2)}."
        if not groups:
            raise InvalidArgumentError("aesthetic", origin, reason="no linear layer weights (weight, or layers.<i>.weight)")
        layers = []
        for index in sorted(groups):
            prefix = groups[index]
            weight = state[f"{prefix}weight"].float()
            if weight.dim() != 2:
                raise InvalidArgumentError("aesthetic", origin, reason=f"{prefix}weight has shape {tuple(weight.shape)}; "
                                           "a linear layer's is (out, in)")
            layer = nn.Linear(weight.shape[1], weight.shape[0], bias=f"{prefix}bias" in state)
            with torch.no_grad():
                layer.weight.copy_(weight)
                if layer.bias is not None:
                    layer.bias.copy_(state[f"{prefix}bias"].float().reshape(-1))
            layers.append(layer)
        return cls(layers).eval()

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> AestheticHead:
        """A head saved as safetensors (never a pickle)."""
        from safetensors.torch import load_file

        path = Path(path).expanduser()
        if not path.is_file():
            raise ModelNotFoundError(f"{path}: no aesthetic head file")
        try:
            state = load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types for a bad header
            raise InvalidArgumentError("aesthetic", str(path), reason=f"not a readable safetensors file ({exc})") from None
        return cls.from_state_dict(state, str(path))


def load_aesthetic(value: Any) -> nn.Module | None:
    """An aesthetic head from a module (used as it is), a safetensors path, or None."""
    if value is None or isinstance(value, nn.Module):
        return value.eval() if isinstance(value, nn.Module) else None
    if isinstance(value, (str, os.PathLike)):
        return AestheticHead.from_file(value)
    raise InvalidArgumentError("aesthetic", type(value).__name__, "a torch.nn.Module, a .safetensors path or None")


def aesthetic_scores(head: nn.Module, image_embeds: torch.Tensor) -> torch.Tensor:
    """The head on (n, dim) unnormalised image embeddings -> (n,) float32. Any module is given the L2-normalised
    embeddings, as LAION's predictors are (its (n, 1) output is flattened)."""
    with torch.inference_mode():
        param = next(head.parameters(), None)
        x = l2_normalize(image_embeds.float())
        if param is not None:
            x = x.to(param.device, param.dtype)
        out = head(x)
    out = out.float().cpu()
    if out.dim() == 2 and out.shape[1] == 1:
        out = out[:, 0]
    if out.dim() != 1 or out.shape[0] != image_embeds.shape[0]:
        raise InvalidArgumentError("aesthetic", type(head).__name__, reason=f"returned shape {tuple(out.shape)} for "
                                   f"{image_embeds.shape[0]} embeddings; expected (n,) or (n, 1)")
    return out


def sigmoid(x: torch.Tensor) -> torch.Tensor:
    """SigLIP's probabilities from its logits (float32)."""
    return torch.sigmoid(x.float())


def check_scale(value: Any, what: str) -> float:
    """A recorded logit scale or bias as a float (finite; a scale > 0)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or (
            what == "logit_scale" and value <= 0):
        raise InvalidArgumentError(what, value, "a finite number" + (" > 0" if what == "logit_scale" else ""))
    return float(value)


__all__ = ["AESTHETIC_FILE", "AESTHETIC_LABEL", "SIMILARITY_LABEL", "AestheticHead", "aesthetic_scores",
           "l2_normalize", "load_aesthetic", "similarity_logits"]
