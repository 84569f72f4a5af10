"""Image-text similarity over two towers (CLIP / SigLIP): ``Scorer.similarity``.

A mixin of :class:`fastgen.pipelines.scorer.Scorer`: methods over the scorer's engine(s) and preprocessors."""

from __future__ import annotations

from typing import Any


class SimilarityMethods:
    """Mixed into :class:`~fastgen.pipelines.scorer.Scorer`."""

    engine: Any
    # (filled by the similarity work)
