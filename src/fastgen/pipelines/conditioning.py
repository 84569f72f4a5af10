"""Prompts to UNet conditioning, as diffusers' Stable Diffusion (1.x/2.x) and SDXL pipelines compute it.

SD: the text encoder's last hidden state. SDXL: both encoders' penultimate hidden states side by side
(``encoder_hidden_states``), the second encoder's pooled projection (``text_embeds``) and the size
conditioning ``time_ids`` = (original height, width, crop top, left, target height, width).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fastgen.errors import InvalidArgumentError
from fastgen.pipelines.engine_calls import run_chunked

logger = logging.getLogger(__name__)


@dataclass
class Conditioning:
    """UNet inputs other than the latents and the timestep, one row per UNet row.

    Guided (classifier-free guidance): the unconditional rows first, then the conditional ones, each
    block in image order, so ``noise_pred.chunk(2)`` splits them as in diffusers.
    """

    encoder_hidden_states: torch.Tensor  # (rows, seq, dim)
    text_embeds: torch.Tensor | None = None  # (rows, pooled_dim), SDXL
    time_ids: torch.Tensor | None = None  # (rows, 6), SDXL
    guided: bool = False

    def feeds(self) -> dict[str, torch.Tensor]:
        out = {"encoder_hidden_states": self.encoder_hidden_states}
        if self.text_embeds is not None:
            out["text_embeds"] = self.text_embeds
            out["time_ids"] = self.time_ids  # type: ignore[assignment]
        return out


class PromptEncoder:
    """The text encoder engine(s) and tokenizer(s) of a pipeline (SD: one; SDXL: two, or the second alone)."""

    def __init__(self, pipeline: str, encoders: Sequence[tuple[Any, Any]]) -> None:
        if not encoders:
            raise InvalidArgumentError("text_encoder", None, reason="a generator needs a text encoder engine")
        for engine, tokenizer in encoders:
            if tokenizer is None:
                raise InvalidArgumentError("tokenizer", None, reason=f"no tokenizer for the {engine.spec.component} "
                                           "engine: pass one, or build the engine from a model that has one")
        self.pipeline = pipeline
        self.encoders = list(encoders)

    def _tokenize(self, engine: Any, tokenizer: Any, texts: list[str]) -> dict[str, torch.Tensor]:
        seq = engine.spec.profile.dims.get("seq")
        max_length = min(int(tokenizer.model_max_length), seq.max if seq is not None else 77)
        tokens = tokenizer(texts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
        # One batched, untruncated pass to tell which prompts were cut (CLIP keeps its end token last,
        # so the truncated ids above cannot show it).
        for text, ids in zip(texts, tokenizer(texts).input_ids):
            if len(ids) > max_length:
                logger.warning("prompt truncated to %d tokens: %r", max_length, text[:80])
        feeds = {"input_ids": tokens.input_ids.to(torch.int64)}
        if "attention_mask" in engine.spec.input_names:
            feeds["attention_mask"] = tokens.attention_mask.to(torch.int64)
        return feeds

    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Hidden states (len(texts), seq, dim) and, for SDXL, pooled embeddings (len(texts), pooled).

        Each distinct text is encoded once (the same negative prompt for every image costs one row).
        """
        unique = list(dict.fromkeys(texts))
        where = [unique.index(t) for t in texts]
        hidden: list[torch.Tensor] = []
        pooled = None
        for engine, tokenizer in self.encoders:
            out = run_chunked(engine, self._tokenize(engine, tokenizer, unique))
            if self.pipeline == "sdxl":
                hidden.append(out["penultimate_hidden_state"])
                # The pooled projection comes from the encoder that has one (the second), as in diffusers.
                two_d = [t.name for t in engine.spec.outputs if len(t.shape) == 2]
                if "text_embeds" in out:
                    pooled = out["text_embeds"]
                elif pooled is None and two_d and len(self.encoders) == 1:
                    pooled = out[two_d[0]]
            else:
                hidden.append(out["last_hidden_state"])
        if self.pipeline == "sdxl" and pooled is None:
            raise InvalidArgumentError("text_encoder_2", None,
                                       reason="SDXL needs a text encoder with a pooled projection (text_embeds)")
        index = torch.tensor(where, device=hidden[0].device)
        states = torch.cat([h.to(index.device) for h in hidden], dim=-1)[index]  # (len(texts), seq, dim_1 + dim_2)
        return states, (pooled[index.to(pooled.device)] if pooled is not None else None)


def build_conditioning(encoder: PromptEncoder, prompts: Sequence[str], images_per_prompt: Sequence[int], *,
                       negative_prompt: str | None, guided: bool, zero_negative: bool,
                       height: int, width: int) -> Conditioning:
    """Conditioning rows for ``sum(images_per_prompt)`` images, prompt-major (prompt 0's images first).

    ``zero_negative``: SDXL's ``force_zeros_for_empty_prompt`` with no negative prompt: the
    unconditional rows are zeros, not the empty prompt's embeddings.
    """
    texts = conditioning_texts(prompts, negative_prompt=negative_prompt, guided=guided, zero_negative=zero_negative)
    states, pooled = encoder.encode(texts)
    return assemble_conditioning(states, pooled, images_per_prompt, guided=guided, zero_negative=zero_negative,
                                 sdxl=encoder.pipeline == "sdxl", height=height, width=width)


def conditioning_texts(prompts: Sequence[str], *, negative_prompt: str | None, guided: bool,
                       zero_negative: bool) -> list[str]:
    """The texts :func:`build_conditioning` encodes: the prompts, then the negative prompt when it is used."""
    texts = list(prompts)
    if guided and not zero_negative:
        texts.append(negative_prompt if negative_prompt is not None else "")
    return texts


def assemble_conditioning(states: torch.Tensor, pooled: torch.Tensor | None, images_per_prompt: Sequence[int], *,
                          guided: bool, zero_negative: bool, sdxl: bool, height: int, width: int) -> Conditioning:
    """UNet rows from the encoded :func:`conditioning_texts` (states (texts, seq, dim), pooled (texts, dim)).

    Split from :func:`build_conditioning` so that a caller may encode the texts of many requests in
    one text-encoder call and assemble each request's rows from its slice.
    """
    prompts = len(images_per_prompt)
    repeat = torch.tensor(list(images_per_prompt), device=states.device)
    cond_states = states[:prompts].repeat_interleave(repeat, dim=0)  # (images, seq, dim)
    cond_pooled = pooled[:prompts].repeat_interleave(repeat, dim=0) if pooled is not None else None
    rows = cond_states.shape[0]
    if guided:
        if zero_negative:
            neg_states = torch.zeros_like(cond_states)
            neg_pooled = torch.zeros_like(cond_pooled) if cond_pooled is not None else None
        else:
            neg_states = states[-1:].expand(rows, -1, -1)
            neg_pooled = pooled[-1:].expand(rows, -1) if pooled is not None else None
        cond_states = torch.cat([neg_states, cond_states])
        if cond_pooled is not None:
            cond_pooled = torch.cat([neg_pooled, cond_pooled])
    time_ids = None
    if sdxl:
        # original size, crop top-left (0, 0), target size: what diffusers passes without overrides.
        ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32)
        time_ids = ids.expand(cond_states.shape[0], -1).contiguous()  # (rows, 6)
    return Conditioning(cond_states.contiguous(), cond_pooled.contiguous() if cond_pooled is not None else None,
                        time_ids, guided)
