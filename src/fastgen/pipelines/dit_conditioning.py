"""Prompts to diffusion-transformer conditioning, as diffusers' SD3, FLUX and PixArt-Sigma pipelines compute it.

- ``sd3`` (StableDiffusion3Pipeline): CLIP-L's and CLIP-G's penultimate hidden states side by side,
  zero-padded to the transformer's ``joint_dim``, then T5's last hidden states along the sequence (zeros
  when there is no third text encoder); ``pooled_projections`` = both CLIPs' ``text_embeds`` side by side.
- ``flux`` (FluxPipeline): T5's last hidden states; ``pooled_projections`` = CLIP's ``pooler_output``;
  models with guidance embeddings get the distilled ``guidance`` scale per row.
- ``pixart`` (PixArtSigmaPipeline): T5's last hidden states of the lower-cased, stripped prompt (diffusers'
  ``clean_caption=False`` path; its default caption cleaning needs bs4 and ftfy) and the token mask,
  which the transformer gets as ``encoder_attention_mask``.

SD3 and FLUX feed T5 an all-ones attention mask (their pipelines pass none, which is the same); PixArt
feeds the real one. Rows keep :mod:`fastgen.pipelines.conditioning`'s layout: the unconditional rows of
a guided request first, then its conditional rows, one per image.
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

DIT_PIPELINES = ("sd3", "flux", "pixart")
#: diffusers' default ``max_sequence_length`` (T5 tokens) of each family.
DEFAULT_SEQUENCE = {"sd3": 256, "flux": 512, "pixart": 300}
#: CLIP's token count in SD3/FLUX (their ``tokenizer_max_length``).
CLIP_LENGTH = 77


@dataclass
class DitConditioning:
    """Transformer inputs other than the latents and the timestep, one row per transformer row
    (guided: the unconditional rows first, then the conditional ones, each block in image order)."""

    tensors: dict[str, torch.Tensor]
    """``encoder_hidden_states`` (rows, seq, joint_dim); ``pooled_projections`` (rows, pooled_dim) for
    sd3/flux; ``guidance`` (rows,) for flux with guidance embeddings; ``encoder_attention_mask`` int64
    (rows, seq) for pixart."""
    guided: bool = False

    def feeds(self) -> dict[str, torch.Tensor]:
        return self.tensors


def _is_t5(engine: Any) -> bool:
    """A generic text encoder (T5): token ids and a mask in, ``last_hidden_state`` only out."""
    names = engine.spec.output_names
    return "attention_mask" in engine.spec.input_names and "penultimate_hidden_state" not in names


class DitPromptEncoder:
    """The text encoder engines and tokenizers of an SD3, FLUX or PixArt generator.

    ``encoders``: (engine, tokenizer) pairs in component order (``text-encoder``, ``-2``, ``-3``);
    ``transformer``: the denoiser engine (its input names and ``joint_dim`` decide what is fed).
    """

    def __init__(self, pipeline: str, encoders: Sequence[tuple[Any, Any]], transformer: Any) -> None:
        if pipeline not in DIT_PIPELINES:
            raise InvalidArgumentError("pipeline", pipeline, DIT_PIPELINES)
        for engine, tokenizer in encoders:
            if tokenizer is None:
                raise InvalidArgumentError("tokenizer", None, reason=f"no tokenizer for the {engine.spec.component} "
                                           "engine: pass one, or build the engine from a model that has one")
        self.pipeline = pipeline
        clips = [(e, t) for e, t in encoders if not _is_t5(e)]
        t5s = [(e, t) for e, t in encoders if _is_t5(e)]
        wanted = {"sd3": (2, (0, 1)), "flux": (1, (1,)), "pixart": (0, (1,))}[pipeline]
        if len(clips) != wanted[0] or len(t5s) not in wanted[1]:
            kinds = ", ".join("T5" if _is_t5(e) else "CLIP" for e, _ in encoders) or "none"
            need = {"sd3": "CLIP-L, CLIP-G and optionally T5", "flux": "CLIP-L and T5", "pixart": "T5"}[pipeline]
            raise InvalidArgumentError("text_encoder", kinds, reason=f"a {pipeline} generator needs {need}")
        self.clips, self.t5 = clips, (t5s[0] if t5s else None)
        self.encoders = list(encoders)
        inputs = {t.name: t for t in transformer.spec.inputs}
        self.joint_dim = int(inputs["encoder_hidden_states"].shape[2])
        self.inputs = set(inputs)
        seq = transformer.spec.profile.dims.get("seq")
        self.seq_max = seq.max if seq is not None else None

    def sequence_length(self, requested: int | None) -> int:
        """T5 tokens per prompt: ``requested`` or the family's default."""
        return int(requested) if requested is not None else DEFAULT_SEQUENCE[self.pipeline]

    def check_length(self, requested: int | None) -> None:
        """A one-line error unless the T5 engine and the transformer take this many T5 tokens (their
        ``seq`` profiles; SD3's transformer sees CLIP's 77 tokens before them)."""
        length = self.sequence_length(requested)
        limits = []
        if self.t5 is not None and "seq" in self.t5[0].spec.profile.dims:
            limits.append(self.t5[0].spec.profile.dims["seq"].max)
        if self.seq_max is not None:
            limits.append(self.seq_max - (CLIP_LENGTH if self.pipeline == "sd3" else 0))
        if limits and length > min(limits):
            raise InvalidArgumentError("max-sequence-length", length, f"1 to {min(limits)} (the engines' profiles)")

    # --- tokenising --------------------------------------------------------------------------------

    def _texts(self, texts: list[str]) -> list[str]:
        # PixArtSigmaPipeline._text_preprocessing without caption cleaning.
        return [t.lower().strip() for t in texts] if self.pipeline == "pixart" else texts

    @staticmethod
    def _tokens(tokenizer: Any, texts: list[str], length: int) -> Any:
        tokens = tokenizer(texts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        # One untruncated pass tells which prompts were cut (as diffusers warns).
        for text, ids in zip(texts, tokenizer(texts).input_ids):
            if len(ids) > length:
                logger.warning("prompt truncated to %d tokens: %r", length, text[:80])
        return tokens

    def _clip(self, engine: Any, tokenizer: Any, texts: list[str]) -> dict[str, torch.Tensor]:
        seq = engine.spec.profile.dims.get("seq")
        length = min(int(tokenizer.model_max_length), seq.max if seq is not None else CLIP_LENGTH)
        tokens = self._tokens(tokenizer, texts, length)
        return run_chunked(engine, {"input_ids": tokens.input_ids.to(torch.int64)})

    def _t5(self, texts: list[str], length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """T5 states (texts, length, d_model) and the token mask (texts, length) int64."""
        engine, tokenizer = self.t5  # type: ignore[misc]
        tokens = self._tokens(tokenizer, texts, length)
        mask = tokens.attention_mask.to(torch.int64)
        fed = mask if self.pipeline == "pixart" else torch.ones_like(mask)
        out = run_chunked(engine, {"input_ids": tokens.input_ids.to(torch.int64), "attention_mask": fed})
        return out["last_hidden_state"], mask

    # --- encoding ---------------------------------------------------------------------------------

    def encode(self, texts: Sequence[str], lengths: Sequence[int]) -> list[dict[str, torch.Tensor]]:
        """Per text, its conditioning row: name -> (1, ...) tensor (no ``guidance``: that is per request).

        ``lengths``: the T5 length of each text. Each distinct (text, length) is encoded once, one
        text-encoder call per length.
        """
        keys = list(dict.fromkeys(zip(texts, lengths)))
        rows: dict[tuple[str, int], dict[str, torch.Tensor]] = {}
        for length in dict.fromkeys(lengths):
            group = [t for t, n in keys if n == length]
            encoded = self._encode_group(self._texts(group), length)
            for i, text in enumerate(group):
                rows[(text, length)] = {name: value[i:i + 1] for name, value in encoded.items()}
        return [rows[(t, n)] for t, n in zip(texts, lengths)]

    def _encode_group(self, texts: list[str], length: int) -> dict[str, torch.Tensor]:
        if self.pipeline == "pixart":
            states, mask = self._t5(texts, length)
            return {"encoder_hidden_states": states, "encoder_attention_mask": mask}
        if self.pipeline == "flux":
            clip_engine, clip_tokenizer = self.clips[0]
            out = self._clip(clip_engine, clip_tokenizer, texts)
            pooled = out["pooler_output"] if "pooler_output" in out else out["text_embeds"]
            states, _ = self._t5(texts, length)
            return {"encoder_hidden_states": states, "pooled_projections": pooled}
        # sd3: both CLIPs' penultimate states side by side, padded to joint_dim, then T5's along seq.
        outs = [self._clip(e, t, texts) for e, t in self.clips]
        clip_states = torch.cat([o["penultimate_hidden_state"] for o in outs], dim=-1)  # (texts, 77, dim_l + dim_g)
        if clip_states.shape[-1] > self.joint_dim:
            raise InvalidArgumentError("text_encoder_2", clip_states.shape[-1],
                                       reason=f"the CLIP states are wider than the transformer's joint_dim "
                                              f"{self.joint_dim}")
        clip_states = torch.nn.functional.pad(clip_states, (0, self.joint_dim - clip_states.shape[-1]))
        if self.t5 is not None:
            t5_states, _ = self._t5(texts, length)
        else:  # StableDiffusion3Pipeline without text_encoder_3: zeros in T5's place
            t5_states = torch.zeros((len(texts), length, self.joint_dim), dtype=clip_states.dtype,
                                    device=clip_states.device)
        pooled = torch.cat([o["text_embeds"] for o in outs], dim=-1)  # (texts, proj_l + proj_g)
        return {"encoder_hidden_states": torch.cat([clip_states, t5_states.to(clip_states.device)], dim=1),
                "pooled_projections": pooled}

    def encode_states(self, states: Sequence[Any], texts: list[str], negatives: Sequence[str | None]) -> None:
        """:func:`fastgen.pipelines.stepping.encode_prompts` for SD3/FLUX/PixArt: ``texts`` are the states'
        prompts then their non-None ``negatives``; each state gets its rows (``state.cond``), its T5 length
        from its own config."""
        lengths = [self.sequence_length(s.config.max_sequence_length) for s in states]
        rows = self.encode(texts, lengths + [n for n, neg in zip(lengths, negatives) if neg is not None])
        next_negative = len(states)
        for i, (s, negative) in enumerate(zip(states, negatives)):
            uncond = None
            if negative is not None:
                uncond, next_negative = rows[next_negative], next_negative + 1
            distilled = s.config.resolved(self.pipeline).guidance_scale  # FLUX's guidance input
            s.cond = self.assemble(rows[i], uncond, s.images, guided=s.guided, guidance=float(distilled))

    def assemble(self, prompt: dict[str, torch.Tensor], negative: dict[str, torch.Tensor] | None, images: int,
                 *, guided: bool, guidance: float) -> DitConditioning:
        """One request's rows: ``negative``'s repeated per image first when guided, then ``prompt``'s.

        ``guidance``: FLUX's distilled guidance scale, fed per row when the transformer takes it."""
        if guided and negative is None:
            raise InvalidArgumentError("negative_prompt", None, reason="a guided request needs its unconditional rows")
        blocks = [negative, prompt] if guided else [prompt]
        tensors = {name: torch.cat([b[name].expand(images, *b[name].shape[1:]) for b in blocks]).contiguous()  # type: ignore[index]
                   for name in prompt}
        if "guidance" in self.inputs:
            rows = tensors["encoder_hidden_states"].shape[0]
            tensors["guidance"] = torch.full((rows,), float(guidance), dtype=torch.float32,
                                             device=tensors["encoder_hidden_states"].device)
        return DitConditioning(tensors, guided)


__all__ = ["DEFAULT_SEQUENCE", "DIT_PIPELINES", "DitConditioning", "DitPromptEncoder"]
