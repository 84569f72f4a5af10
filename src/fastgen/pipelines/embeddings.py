"""Embeddings from encoder outputs: which engine output to read, how to pool it, whether to normalise.

An encoder engine gives either token states (``last_hidden_state`` / ``token_embeddings``: (batch,
seq, hidden) for texts, (batch, tokens, hidden) for images) or an already pooled (batch, dim) output
(``sentence_embedding``, ``text_embeds`` / ``image_embeds``, ``pooler_output``). :func:`resolve_settings`
chooses from the engine's spec and metadata (:class:`~fastgen.models.metadata.TextEncoderMetadata` /
:class:`~fastgen.models.metadata.ImageEncoderMetadata`, filled from a sentence-transformers folder's
``modules.json``): the recorded pooling mode, else the pooled output when there is one, else mean
pooling for texts (what sentence-transformers does for a plain transformers model) and the first (CLS)
token for images (and for a ViT, whose pooler is a classification pre-training head).

:func:`pool` computes the pooling modes as sentence-transformers' ``Pooling`` module does, over the
attention mask (padding never counts; ``cls`` and ``lasttoken`` take the first and last unmasked
token, so left padding works too); :func:`l2_normalize` is its ``Normalize`` module
(``x / max(||x||, 1e-12)``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from fastgen.errors import InvalidArgumentError, UnsupportedError
from fastgen.models.metadata import POOLING_MODES, ImageEncoderMetadata, TextEncoderMetadata

logger = logging.getLogger(__name__)

#: Outputs that hold one state per token (pooled by :func:`pool`).
TOKEN_OUTPUTS = ("last_hidden_state", "token_embeddings")
#: Outputs that hold one embedding per input, best first (``*_embeds`` are ranked with ``sentence_embedding``).
POOLED_OUTPUTS = ("sentence_embedding", "text_embeds", "image_embeds", "pooler_output")
#: Pooling modes over token states (every mode but ``pooled``).
TOKEN_POOLING = tuple(m for m in POOLING_MODES if m != "pooled")


def is_embedding_output(name: str) -> bool:
    """Whether an engine output of this name is an embedding or the token states one is pooled from."""
    return name in TOKEN_OUTPUTS or name in POOLED_OUTPUTS or name.endswith("_embeds")


@dataclass(frozen=True)
class EmbeddingSettings:
    """How one encoder engine's output becomes embeddings."""

    output: str
    """The engine output read: token states (``last_hidden_state``) or a pooled (batch, dim) output."""
    pooling: str
    """A :data:`TOKEN_POOLING` mode over the token states, or ``pooled``: the output is already one row per input."""
    normalize: bool = False
    """L2-normalise each embedding unless the caller says otherwise (a sentence-transformers Normalize module)."""
    dim: int | None = None
    """Embedding width, when the engine's output shape states it."""

    def __post_init__(self) -> None:
        if self.pooling not in POOLING_MODES:
            raise InvalidArgumentError("pooling", self.pooling, POOLING_MODES)
        if not isinstance(self.normalize, bool):
            raise InvalidArgumentError("normalize", self.normalize, "true or false")


def _pooled_output(spec: Any) -> str | None:
    two_d = [t.name for t in spec.outputs if len(t.shape) == 2]
    for name in POOLED_OUTPUTS:
        if name in two_d:
            return name
    return next((n for n in two_d if n.endswith("_embeds")), None)


def _token_output(spec: Any) -> str | None:
    three_d = [t.name for t in spec.outputs if len(t.shape) == 3]
    return next((n for n in TOKEN_OUTPUTS if n in three_d), None)


def resolve_settings(spec: Any, metadata: Any, kind: str, *, pooling: str | None = None) -> EmbeddingSettings:
    """The :class:`EmbeddingSettings` of an encoder engine (its ``spec`` and ``metadata``) of ``kind``
    (``text`` or ``image``); ``pooling`` overrides the recorded mode."""
    recorded = metadata if isinstance(metadata, (TextEncoderMetadata, ImageEncoderMetadata)) else None
    mode = pooling if pooling is not None else (recorded.pooling if recorded is not None else None)
    if mode is not None and mode not in POOLING_MODES:
        raise InvalidArgumentError("pooling", mode, POOLING_MODES)
    pooled, tokens = _pooled_output(spec), _token_output(spec)
    if mode is None:
        mode = "pooled" if pooled is not None else ("mean" if kind == "text" else "cls")
        if kind == "image" and spec.model_type == "ViTModel" and tokens is not None:
            # A ViT's pooler is a head of its classification pre-training (tanh(dense(CLS))), missing from
            # many checkpoints and then randomly initialised: the CLS token is its embedding.
            mode = "cls"
    if mode == "pooled":
        if pooled is None:
            raise UnsupportedError(f"the {spec.component} engine has no pooled (batch, dim) output "
                                   f"(outputs: {', '.join(spec.output_names)}); pool its token states instead")
        output = pooled
    else:
        if tokens is None:
            raise UnsupportedError(f"{mode} pooling needs token states ({' or '.join(TOKEN_OUTPUTS)}); the "
                                   f"{spec.component} engine has {', '.join(spec.output_names)}")
        output = tokens
    shape = spec.outputs[spec.output_names.index(output)].shape
    dim = shape[-1] if isinstance(shape[-1], int) else None
    normalize = bool(recorded.normalize) if recorded is not None and recorded.normalize is not None else False
    return EmbeddingSettings(output=output, pooling=mode, normalize=normalize, dim=dim)


def pool(states: torch.Tensor, mask: torch.Tensor | None, mode: str) -> torch.Tensor:
    """Token states (n, seq, hidden) -> (n, hidden) float32, over ``mask`` (n, seq) (1: a token, 0: padding;
    None: every token counts), as sentence-transformers' Pooling computes ``mode``."""
    if mode not in TOKEN_POOLING:
        raise InvalidArgumentError("pooling", mode, TOKEN_POOLING)
    states = states.float()
    n, seq, _ = states.shape
    if mask is None:
        mask = torch.ones(n, seq, dtype=torch.int64, device=states.device)
    mask = mask.to(states.device)
    if mode == "cls":  # the first real token (left padding puts it after the pads)
        first = mask.to(torch.int32).argmax(dim=1)  # (n,)
        return states[torch.arange(n, device=states.device), first]
    if mode == "lasttoken":  # the last real token; a row with no token at all gives zeros, as in sentence-transformers
        values, back = mask.flip(1).max(dim=1)  # (n,), (n,)
        last = torch.where(values == 0, torch.full_like(back, seq - 1), seq - 1 - back)
        return states[torch.arange(n, device=states.device), last] * values.clamp(max=1).unsqueeze(-1).to(states.dtype)
    weights = mask.unsqueeze(-1).to(states.dtype)  # (n, seq, 1)
    if mode == "max":
        return states.masked_fill(weights == 0, float("-inf")).max(dim=1).values
    total = (states * weights).sum(dim=1)  # (n, hidden)
    count = weights.sum(dim=1).clamp(min=1e-9)  # (n, 1)
    return total / (count if mode == "mean" else count.sqrt())


def l2_normalize(embeddings: torch.Tensor) -> torch.Tensor:
    """Each row divided by its L2 norm (at least 1e-12), as ``torch.nn.functional.normalize``."""
    return torch.nn.functional.normalize(embeddings.float(), p=2.0, dim=-1)


def embed_outputs(outputs: dict[str, torch.Tensor], settings: EmbeddingSettings, mask: torch.Tensor | None,
                  normalize: bool) -> torch.Tensor:
    """One engine call's outputs -> (n, dim) float32 embeddings on the CPU."""
    value = outputs[settings.output]
    if settings.pooling == "pooled":
        if value.dim() != 2:
            raise UnsupportedError(f"engine output {settings.output!r} has shape {tuple(value.shape)}; "
                                   "a pooled embedding is (batch, dim)")
        out = value.float()
    else:
        if value.dim() != 3:
            raise UnsupportedError(f"engine output {settings.output!r} has shape {tuple(value.shape)}; "
                                   "token states are (batch, seq, hidden)")
        out = pool(value, mask, settings.pooling)
    if normalize:
        out = l2_normalize(out)
    return out.cpu().contiguous()


__all__ = ["POOLED_OUTPUTS", "TOKEN_OUTPUTS", "TOKEN_POOLING", "EmbeddingSettings", "embed_outputs",
           "is_embedding_output", "l2_normalize", "pool", "resolve_settings"]
