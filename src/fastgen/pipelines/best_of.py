"""Best-of-N: generate N candidates per prompt, score them, keep the K that rank highest (the
``candidates`` / ``keep`` / ``scorer`` / ``rank_by`` arguments of :meth:`Generator.generate`)."""

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
    if scorer is None or not hasattr(scorer, "score_images"):
        raise InvalidArgumentError("scorer", scorer, reason="best-of-N needs a scorer with score_images()")
    if cfg.num_images_per_prompt != 1:
        raise InvalidArgumentError("num-images-per-prompt", cfg.num_images_per_prompt,
                                   reason="with candidates, choose how many images to return with keep")
    if cfg.output_type == "latent":
        raise InvalidArgumentError("output-type", "latent", ("pil", "np", "uint8"),
                                   reason="best-of-N scores decoded images")
    labels = list(getattr(scorer, "labels", None) or [])
    if isinstance(rank_by, str) and labels and rank_by not in labels:
        raise InvalidArgumentError("rank-by", rank_by, labels)
    if rank_by is not None and not isinstance(rank_by, str) and not callable(rank_by):
        raise InvalidArgumentError("rank-by", rank_by, "a label name or a function of a Score")
    return True


def best_of(decoded: torch.Tensor, prompt_indices: list[int], per_prompt: int, scorer: Any, keep: int,
             rank_by: Any) -> tuple[list[int], list[Any], list[float]]:
    """Indices (into ``decoded``) of the ``keep`` best images of each prompt, best first, with scores."""
    pixels = imaging.to_output(decoded, "uint8")
    scores = list(scorer.score_images(imaging.to_pil(pixels)))
    if len(scores) != len(pixels):
        raise InvalidArgumentError("scorer", type(scorer).__name__,
                                   reason=f"score_images returned {len(scores)} scores for {len(pixels)} images")
    if callable(rank_by):
        key = rank_by
    else:
        labels = list(getattr(scorer, "labels", None) or scores[0].probs)
        label = rank_by or labels[0]
        key = lambda score: float(score.probs[label])  # noqa: E731
    values = [float(key(s)) for s in scores]
    chosen: list[int] = []
    for start in range(0, len(prompt_indices), per_prompt):
        block = range(start, start + per_prompt)
        # Highest first; ties keep seed order (sorted is stable).
        chosen += sorted(block, key=lambda i: -values[i])[:keep]
    return chosen, [scores[i] for i in chosen], [values[i] for i in chosen]


__all__ = ["best_of", "check_best_of"]
