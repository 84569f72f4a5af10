"""Embeddings of texts or images (an encoder engine): ``Scorer.embed``.

A mixin of :class:`fastgen.pipelines.scorer.Scorer`: methods over the scorer's engine(s) and preprocessors."""

from __future__ import annotations

from typing import Any


class EmbeddingMethods:
    """Mixed into :class:`~fastgen.pipelines.scorer.Scorer`."""

    engine: Any

    def _is_embedder(self, spec: Any) -> bool:
        """Whether an engine with this spec embeds (its task, when none is given, is ``embed``)."""
        return False
