"""Embeddings of texts or images (an encoder engine): ``Scorer.embed``.

A mixin of :class:`fastgen.pipelines.scorer.Scorer`: methods over the scorer's engine(s) and preprocessors.

An engine embeds when it is an encoder component (``text-encoder*``, ``image-encoder``) or when its
outputs are token states or embeddings (``last_hidden_state``, ``*_embeds``, ``pooler_output``,
``sentence_embedding``) and no ``logits``. Which output is read and how it is pooled and normalised
is :class:`~fastgen.pipelines.embeddings.EmbeddingSettings` (:func:`~fastgen.pipelines.embeddings.resolve_settings`:
the engine's metadata, e.g. a sentence-transformers folder's pooling and Normalize module).

Texts are batched exactly as ``Scorer.score_texts`` batches them (sorted by token count, each batch
padded to its longest text, the attention mask hiding the padding, results in the caller's order),
so an embedding equals the text's embedding alone. Images go through the scorer's
:class:`~fastgen.pipelines.preprocess.ImagePreprocessor`.

For callers that batch on their own (``fastgen.Runtime``): the preprocessors make the feeds,
:meth:`EmbeddingMethods.embeddings` runs one engine call on a batch of them, and
:meth:`EmbeddingMethods.embedding_rows` splits the result per row (a non-finite row becomes its
:class:`~fastgen.errors.NumericalError`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from fastgen.errors import InvalidArgumentError, NumericalError, UnsupportedError
from fastgen.pipelines.embeddings import (
    EmbeddingSettings,
    embed_outputs,
    is_embedding_output,
    resolve_settings,
)
from fastgen.pipelines.scores import nonfinite_error, pad_batch, rows_in_batches

logger = logging.getLogger(__name__)

#: Components that are encoders: their scorer's task is ``embed``.
ENCODER_COMPONENTS = ("text-encoder", "text-encoder-2", "text-encoder-3", "image-encoder")


class EmbeddingMethods:
    """Mixed into :class:`~fastgen.pipelines.scorer.Scorer`."""

    engine: Any
    kind: str
    task: str
    batch_size: int
    progress: bool
    output_name: str
    text_preprocessor: Any
    image_preprocessor: Any
    _min_batch: int

    embedding: EmbeddingSettings
    """Which output this scorer embeds from, its pooling and default normalisation (an embedding scorer)."""

    def _is_embedder(self, spec: Any) -> bool:
        """Whether an engine with this spec embeds (its task, when none is given, is ``embed``)."""
        if spec.component in ENCODER_COMPONENTS:
            return True
        names = list(spec.output_names)
        return "logits" not in names and any(is_embedding_output(n) for n in names)

    def _setup_embed(self) -> None:
        self.embedding = resolve_settings(self.engine.spec, self.engine.metadata, self.kind)
        self.output_name = self.embedding.output
        logger.debug("embedding from %s (%s pooling, normalize=%s)", self.embedding.output, self.embedding.pooling,
                     self.embedding.normalize)

    # --- settings ------------------------------------------------------------------------------

    def _embedding(self) -> EmbeddingSettings:
        settings = getattr(self, "embedding", None)
        if settings is None:
            raise UnsupportedError(f"the {self.engine.spec.component} engine is not an encoder (task "
                                   f"{self.task!r}); embeddings need a text-encoder or image-encoder engine")
        return settings

    @property
    def pooling(self) -> str:
        """How token states become one embedding (``mean``, ``cls``, ``lasttoken``, ``max``...), or ``pooled``."""
        return self._embedding().pooling

    @property
    def embedding_dim(self) -> int | None:
        """Width of the embeddings, when the engine states it."""
        return self._embedding().dim

    def _normalize(self, normalize: bool | None) -> bool:
        if normalize is None:
            return self._embedding().normalize
        if not isinstance(normalize, bool):
            raise InvalidArgumentError("normalize", normalize, ["None", "True", "False"])
        return normalize

    # --- one batch -----------------------------------------------------------------------------

    def embeddings(self, feeds: dict[str, torch.Tensor], *, normalize: bool | None = None) -> torch.Tensor:
        """One engine call over ready engine inputs (batch first, from this scorer's preprocessor): the
        (n, dim) float32 embeddings on the CPU, pooled over the feeds' ``attention_mask`` when there is
        one, L2-normalised as ``normalize`` says (None: the model's own setting). A batch under the
        engine's minimum is padded up to it and the extra rows dropped."""
        settings = self._embedding()
        norm = self._normalize(normalize)
        # Padded here rather than by padded_output: the pooling reads the padded batch's attention mask.
        feeds, n = pad_batch(feeds, self._min_batch)
        outputs = self.engine(feeds)
        out = embed_outputs(outputs, settings, feeds.get("attention_mask"), norm)
        if out.shape[0] != max(n, self._min_batch):
            raise UnsupportedError(f"engine output {settings.output!r} has {out.shape[0]} rows for a batch of "
                                   f"{max(n, self._min_batch)}")
        return out[:n]

    def embedding_rows(self, embeddings: torch.Tensor) -> list[torch.Tensor | NumericalError]:
        """Each row of a (n, dim) batch from :meth:`embeddings`, or a :class:`NumericalError` in place of a row
        with a NaN or an infinity: what a caller embedding many requests in one batch fails each request by."""
        finite = torch.isfinite(embeddings).all(dim=-1).tolist()
        return [row if ok else self._embedding_error([i], "row") for i, (row, ok) in enumerate(zip(embeddings, finite))]

    def _embedding_error(self, rows: Sequence[int], what: str) -> NumericalError:
        return nonfinite_error(f"the {self.engine.spec.component} engine", "embeddings", rows, what)

    # --- many inputs ---------------------------------------------------------------------------

    def embed(self, inputs: Any, *, normalize: bool | None = None, batch_size: int | None = None) -> torch.Tensor:
        """Embeddings of texts (a text encoder) or images (an image encoder): (n, dim) float32 on the CPU,
        one row per input in order (a single text or image gives one row).

        ``normalize``: L2-normalise the rows (None: as the model says: a sentence-transformers Normalize
        module). Texts are truncated at ``max_length`` tokens and batched by length, each batch padded to
        its longest text, so a row equals the text embedded alone; images are resized and normalised as
        the engine's metadata says. A row with a NaN or an infinity raises :class:`NumericalError`
        naming the input.
        """
        self._embedding()
        norm = self._normalize(normalize)
        bs = self._check_batch(batch_size)  # type: ignore[attr-defined]
        if self.kind == "text":
            return self._embed_texts(inputs, norm, bs)
        return self._embed_images(inputs, norm, bs)

    def _empty(self) -> torch.Tensor:
        return torch.empty(0, self._embedding().dim or 0)

    def _embed_texts(self, texts: Any, normalize: bool, bs: int) -> torch.Tensor:
        if not isinstance(texts, str) and (not isinstance(texts, Sequence) or not all(isinstance(t, str) for t in texts)):
            raise InvalidArgumentError("inputs", type(texts).__name__,
                                       reason="this scorer's model is a text encoder; pass a text or a list of texts")
        items = [texts] if isinstance(texts, str) else list(texts)
        if not items:
            return self._empty()
        prep = self.text_preprocessor
        if not prep.can_pad or ("attention_mask" not in prep.input_names and self.pooling != "pooled"):
            bs = 1  # no pad token, or token pooling with no mask to hide the padding: one text per batch
        lengths = prep.lengths(items)
        return rows_in_batches(items, sorted(range(len(items)), key=lengths.__getitem__), bs,
                               lambda chunk: self.embeddings(prep.feeds(chunk), normalize=normalize),
                               lambda rows: self._embedding_error(rows, "texts"), "embedding texts", self.progress)

    def _embed_images(self, images: Any, normalize: bool, bs: int) -> torch.Tensor:
        prep = self.image_preprocessor
        items = prep.flatten(images)
        if not items:
            return self._empty()
        return rows_in_batches(items, range(len(items)), bs,
                               lambda chunk: self.embeddings(prep.feeds(prep.to_uint8(chunk)), normalize=normalize),
                               lambda rows: self._embedding_error(rows, "images"), "embedding images", self.progress)


__all__ = ["ENCODER_COMPONENTS", "EmbeddingMethods"]
