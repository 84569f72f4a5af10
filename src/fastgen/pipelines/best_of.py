"""Best-of-N: generate N candidates per prompt, score them, keep the K that rank highest (the
``candidates`` / ``keep`` / ``scorer`` / ``rank_by`` arguments of :meth:`Generator.generate`).

A scorer ranks candidates in one of two ways:

- by ``scorer.score_images(images) -> list[Score]`` (a classifier, an aesthetic head): ``rank_by`` is one of
  ``scorer.labels`` (default: the first) or a function of a ``Score``;
- by prompt adherence, when ``scorer.needs_texts`` is true (a two-tower CLIP / SigLIP scorer):
  ``scorer.score_pairs(images, texts) -> list[Score]`` scores each candidate against its own prompt;
  ``rank_by`` is one of ``scorer.pair_labels`` (default: ``similarity``, CLIP's ``logit_scale * cosine`` or
  SigLIP's probability; ``aesthetic`` with a head) or a function of a ``Score``.
"""

from __future__ import annotations

from typing import Any

import torch

from fastgen.errors import InvalidArgumentError
from fastgen.pipelines import vae_images as imaging
from fastgen.pipelines.config import GenerateConfig


def check_best_of(candidates: int | None, scorer: Any, keep: int, rank_by: Any, cfg: GenerateConfig) -> bool:
    if candidates is None:
        return False
    if isinstance(candidates, bool) or not isinstance(candidates, int) or candidates < 1:
        raise InvalidArgumentError("candidates", candidates, "integers >= 1")
    if isinstance(keep, bool) or not isinstance(keep, int) or not 1 <= keep <= candidates:
        raise InvalidArgumentError("keep", keep, f"integers from 1 to candidates ({candidates})")
    if scorer is None or not hasattr(scorer, "score_pairs" if needs_texts(scorer) else "score_images"):
        raise InvalidArgumentError("scorer", scorer, reason="best-of-N needs a scorer with score_images() (or, "
                                   "when it needs the prompts, score_pairs())")
    if cfg.num_images_per_prompt != 1:
        raise InvalidArgumentError("num-images-per-prompt", cfg.num_images_per_prompt,
                                   reason="with candidates, choose how many images to return with keep")
    if cfg.output_type == "latent":
        raise InvalidArgumentError("output-type", "latent", ("pil", "np", "uint8"),
                                   reason="best-of-N scores decoded images")
    labels = rank_labels(scorer)
    if isinstance(rank_by, str) and labels and rank_by not in labels:
        raise InvalidArgumentError("rank-by", rank_by, labels)
    if rank_by is not None and not isinstance(rank_by, str) and not callable(rank_by):
        raise InvalidArgumentError("rank-by", rank_by, "a label name or a function of a Score")
    return True


def needs_texts(scorer: Any) -> bool:
    """Whether ``scorer`` ranks images against their prompts (``score_pairs``) rather than alone."""
    return bool(getattr(scorer, "needs_texts", False))


def rank_labels(scorer: Any) -> list[str]:
    """The labels ``rank_by`` may name: ``scorer.pair_labels`` for a scorer that needs the prompts, else
    ``scorer.labels`` (empty when the scorer states none)."""
    return list(getattr(scorer, "pair_labels" if needs_texts(scorer) else "labels", None) or [])


def best_of(decoded: torch.Tensor, prompt_indices: list[int], per_prompt: int, scorer: Any, keep: int,
            rank_by: Any, prompts: list[str] | None = None) -> tuple[list[int], list[Any], list[float]]:
    """Indices (into ``decoded``) of the ``keep`` best images of each prompt, best first, with scores.

    ``prompts``: the prompts ``prompt_indices`` point into; a scorer that needs texts scores each image
    against its own prompt with them."""
    pixels = imaging.to_output(decoded, "uint8")
    images = imaging.to_pil(pixels)
    if needs_texts(scorer):
        if prompts is None:
            raise InvalidArgumentError("scorer", type(scorer).__name__, reason="it ranks by prompt adherence and "
                                       "needs the prompts")
        scores = list(scorer.score_pairs(images, [prompts[p] for p in prompt_indices]))
    else:
        scores = list(scorer.score_images(images))
    if len(scores) != len(pixels):
        raise InvalidArgumentError("scorer", type(scorer).__name__,
                                   reason=f"the scorer returned {len(scores)} scores for {len(pixels)} images")
    if callable(rank_by):
        key = rank_by
    else:
        labels = rank_labels(scorer) or list(scores[0].probs)
        label = rank_by or labels[0]
        key = lambda score: float(score.probs[label])  # noqa: E731
    values = [float(key(s)) for s in scores]
    chosen: list[int] = []
    for start in range(0, len(prompt_indices), per_prompt):
        block = range(start, start + per_prompt)
        # Highest first; ties keep seed order (sorted is stable).
        chosen += sorted(block, key=lambda i: -values[i])[:keep]
    return chosen, [scores[i] for i in chosen], [values[i] for i in chosen]


__all__ = ["best_of", "check_best_of", "needs_texts", "rank_labels"]
