"""Image-text similarity over two towers (CLIP / SigLIP): ``Scorer.similarity``.

A mixin of :class:`fastgen.pipelines.scorer.Scorer`: methods over the scorer's engine(s) and preprocessors.

A similarity scorer (task ``similarity``) holds the ``image-tower`` engine as its ``engine`` and the
``text-tower`` engine as :attr:`SimilarityMethods.text_engine`, and/or an aesthetic head on image embeddings
(:class:`~fastgen.pipelines.similarity.AestheticHead`). ``Scorer.from_pretrained`` of a two-tower model (a
preset such as ``tiny-clip``, a local CLIPModel / SiglipModel folder, a folder of ``text-tower/`` and
``image-tower/`` engine directories) builds or loads both towers, and takes ``aesthetic.safetensors`` from
the folder when there is one.

- :meth:`SimilarityMethods.similarity`: (n_images, n_texts) float32: CLIP's ``logits_per_image``, SigLIP's
  sigmoid probabilities (``logits=True``: SigLIP's raw logits);
- :meth:`SimilarityMethods.embed` on a two-tower scorer: texts (``str``) through the text tower, images through
  the image tower, projected and unnormalised unless ``normalize=True`` (other scorers: ``EmbeddingMethods``);
- ``Scorer.score_images(images, texts=...)``: zero-shot classification, one ``Score`` per image over the texts
  (CLIP: softmax of the logits, SigLIP: sigmoid); without texts, the aesthetic head's ``Score``;
- :meth:`SimilarityMethods.score_pairs`: each image against its own text (best-of-N's prompt adherence).

Batch steps for callers that batch on their own (``fastgen.Runtime``): ``image_preprocessor.feeds`` /
``text_preprocessor.feeds`` make feeds, :meth:`SimilarityMethods.tower_embeddings` runs one tower call on
one batch, :meth:`SimilarityMethods.similarity_from_embeddings`, :meth:`SimilarityMethods.aesthetic_from_embeddings`
and the ``Score`` makers :meth:`SimilarityMethods.aesthetic_scores_from_embeddings` /
:meth:`SimilarityMethods.pair_scores_from_embeddings` postprocess; texts are sorted by length and batched as
``Scorer.score_texts`` batches them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastgen.errors import InvalidArgumentError, NumericalError, UnsupportedError
from fastgen.models.metadata import ImageTowerMetadata, TextTowerMetadata
from fastgen.pipelines import similarity as sim
from fastgen.pipelines.scores import Score, nonfinite_error, padded_output, rows_in_batches

logger = logging.getLogger(__name__)

#: The two towers' component names.
TOWERS = ("text-tower", "image-tower")


class SimilarityMethods:
    """Mixed into :class:`~fastgen.pipelines.scorer.Scorer`."""

    engine: Any
    task: str
    kind: str
    progress: bool
    batch_size: int
    text_preprocessor: Any
    image_preprocessor: Any
    _labels: Any
    _min_batch: int

    text_engine: Any = None
    """The text tower's engine of a two-tower scorer (None: none)."""
    aesthetic_head: Any = None
    """The aesthetic head on image embeddings (an ``nn.Module``), or None."""

    # --- set-up --------------------------------------------------------------------------------

    def _init_similarity(self, text_engine: Any, aesthetic: Any, *, tokenizer: Any = None,
                         max_length: int | None = None) -> None:
        """Called first by ``Scorer.__init__``: the second engine and the head, before the task is inferred."""
        from fastgen.engines.base import Engine

        if text_engine is not None and not isinstance(text_engine, Engine):
            raise InvalidArgumentError("text_engine", type(text_engine).__name__,
                                       "a fastgen Engine of a text tower (fastgen.build / load_engine)")
        self.text_engine = text_engine
        self.aesthetic_head = sim.load_aesthetic(aesthetic)
        self._tower_text_options = {"tokenizer": tokenizer, "max_length": max_length}

    def _is_similarity(self, spec: Any) -> bool:
        """Whether the scorer's task is ``similarity``: a text tower or an aesthetic head was given."""
        return self.text_engine is not None or self.aesthetic_head is not None

    def _setup_similarity(self) -> None:
        from fastgen.pipelines.preprocess import TextPreprocessor, positive_int

        if self.kind != "image":
            raise InvalidArgumentError("engine", self.engine.spec.component,
                                       reason="a similarity scorer's engine is the image tower (text_engine: the text tower)")
        image_meta = self.engine.metadata
        self.family: str = getattr(image_meta, "family", None) or "clip"
        """``clip`` or ``siglip``: how similarities are read (softmax logits or sigmoid probabilities)."""
        scale = getattr(image_meta, "logit_scale", None)
        bias = getattr(image_meta, "logit_bias", None)
        self._text_batch = self._text_max_batch = 1
        if self.text_engine is not None:
            text_meta = self.text_engine.metadata
            if isinstance(text_meta, TextTowerMetadata) and isinstance(image_meta, ImageTowerMetadata):
                if (text_meta.logit_scale, text_meta.logit_bias, text_meta.family) != (scale, bias, image_meta.family):
                    raise InvalidArgumentError("text_engine", self.text_engine.spec.component,
                                               reason="its logit scale, bias or family differ from the image tower's: "
                                               "the towers are from different models")
            scale = scale if scale is not None else getattr(text_meta, "logit_scale", None)
            bias = bias if bias is not None else getattr(text_meta, "logit_bias", None)
            reason = TextPreprocessor.unsupported(self.text_engine)
            if reason is not None:
                raise InvalidArgumentError("text_engine", self.text_engine.spec.component, reason=reason)
            self.text_preprocessor = TextPreprocessor(self.text_engine, **self._tower_text_options)
            dims = (self.engine.spec.outputs[0].shape[-1], self.text_engine.spec.outputs[0].shape[-1])
            if all(isinstance(d, int) for d in dims) and dims[0] != dims[1]:
                raise InvalidArgumentError("text_engine", f"{dims[1]}-d text embeddings",
                                           reason=f"the image tower's embeddings are {dims[0]}-d")
            first = self.text_engine.spec.inputs[0].shape[0]
            rng = self.text_engine.spec.profile.dims.get(first) if isinstance(first, str) else None
            self._text_batch = first if isinstance(first, int) else positive_int("batch", rng.opt if rng else 8)
            self._text_max_batch = first if isinstance(first, int) else (rng.max if rng is not None else 1 << 30)
            self._text_min_batch = first if isinstance(first, int) else (
                rng.min if rng is not None and self.text_engine.strict_profile else 1)
        self.logit_scale: float = sim.check_scale(scale if scale is not None else 1.0, "logit_scale")
        """The multiplier of the cosine similarity (``exp`` of the model's parameter)."""
        self.logit_bias: float | None = sim.check_scale(bias, "logit_bias") if bias is not None else None
        """SigLIP's bias (None for CLIP)."""
        if self.text_engine is not None and scale is None:
            logger.warning("the towers record no logit scale: similarities are plain cosines")
        self._labels = [sim.AESTHETIC_LABEL] if self.aesthetic_head is not None else []

    @classmethod
    def _tower_engines(cls, model: Any, component: str | None, **build: Any) -> tuple[Any, Any, Any] | None:
        """(image engine, text engine, aesthetic head path or None) when ``model`` is a two-tower model and
        ``component`` names no single tower; None otherwise (the caller builds one engine as usual)."""
        if component is not None or not isinstance(model, (str, os.PathLike)):
            return None
        path = Path(model).expanduser()
        head = path / sim.AESTHETIC_FILE if (path / sim.AESTHETIC_FILE).is_file() else None
        if path.is_dir() and all((path / t / "manifest.json").is_file() for t in TOWERS):
            from fastgen.engines.loading import load_engine

            device = build.get("device")
            if build.get("quantization") not in (None, "none"):
                raise InvalidArgumentError("quantization", str(build["quantization"]), ("none",),
                                           reason=f"{path} holds built engines; quantize when building them")
            engines = {t: load_engine(path / t, device=None if device in (None, "auto") else device,
                                      execution=build.get("execution")) for t in TOWERS}
            return engines["image-tower"], engines["text-tower"], head
        from fastgen.models import model_components

        try:
            offered = model_components(model)
        except Exception:  # not a model fastgen reads: the usual path reports it
            return None
        if not all(t in offered for t in TOWERS):
            return None
        from fastgen.engines.build import build as build_engine

        execution = build.pop("execution", None)
        extra = {} if execution is None else {"execution": execution}
        engines = {t: build_engine(model, component=t, **build, **extra) for t in TOWERS}
        return engines["image-tower"], engines["text-tower"], head

    # --- checks --------------------------------------------------------------------------------

    def _need_towers(self, what: str) -> None:
        if self.task != "similarity" or self.text_engine is None:
            raise UnsupportedError(f"{what} needs a two-tower scorer (CLIP / SigLIP: Scorer.from_pretrained of a "
                                   "model with text-tower and image-tower components)")

    @property
    def needs_texts(self) -> bool:
        """Whether best-of-N ranks by :meth:`score_pairs` (each image against its own prompt): a two-tower scorer."""
        return self.task == "similarity" and self.text_engine is not None

    @property
    def pair_labels(self) -> list[str]:
        """The labels of :meth:`score_pairs`' scores: ``similarity``, then ``aesthetic`` with a head."""
        return [sim.SIMILARITY_LABEL] + ([sim.AESTHETIC_LABEL] if self.aesthetic_head is not None else [])

    # --- one batch -----------------------------------------------------------------------------

    def tower_embeddings(self, feeds: dict[str, torch.Tensor], tower: str, *, normalize: bool = False
                         ) -> torch.Tensor:
        """One call of the ``image`` or ``text`` tower on ready feeds (from ``image_preprocessor`` /
        ``text_preprocessor``): (n, dim) float32 on the CPU, L2-normalised when ``normalize``. A batch under
        the engine's minimum is padded up to it (its last row repeated) and the extra rows dropped."""
        if tower == "image":
            engine, name, least = self.engine, self.engine.spec.output_names[0], self._min_batch
        elif tower == "text":
            self._need_towers("text embeddings")
            engine, name, least = self.text_engine, self.text_engine.spec.output_names[0], self._text_min_batch
        else:
            raise InvalidArgumentError("tower", tower, ("image", "text"))
        out = padded_output(engine, feeds, least, name, dims=2, expected="(batch, dim)").float().cpu()
        return sim.l2_normalize(out) if normalize else out

    def similarity_from_embeddings(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor, *,
                                   logits: bool = False) -> torch.Tensor:
        """(n_images, n_texts) float32 from unnormalised tower embeddings: CLIP's logits; SigLIP's sigmoid
        probabilities, or its logits with ``logits=True``."""
        out = sim.similarity_logits(image_embeds, text_embeds, self.logit_scale, self.logit_bias)
        return sim.sigmoid(out) if self.family == "siglip" and not logits else out

    def aesthetic_from_embeddings(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """The aesthetic head on (n, dim) unnormalised image embeddings: (n,) float32."""
        if self.aesthetic_head is None:
            raise UnsupportedError("this scorer has no aesthetic head (Scorer.from_pretrained(..., aesthetic=PATH))")
        return sim.aesthetic_scores(self.aesthetic_head, image_embeds)

    def aesthetic_scores_from_embeddings(self, image_embeds: torch.Tensor) -> list[Score]:
        """One ``Score`` per row of (n, dim) unnormalised image embeddings: the aesthetic head's value as the
        ``aesthetic`` label's probability and logit (what ``score_images`` without texts gives)."""
        values = self.aesthetic_from_embeddings(image_embeds).tolist()
        return [Score({sim.AESTHETIC_LABEL: v}, [(sim.AESTHETIC_LABEL, v)], [v]) for v in values]

    def pair_scores_from_embeddings(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor,
                                    columns: Sequence[int]) -> list[Score]:
        """:meth:`score_pairs` from embeddings: image ``i`` (a row of ``image_embeds``) against text
        ``columns[i]`` (a row of ``text_embeds``, so that images sharing a text share its embedding)."""
        matrix = self.similarity_from_embeddings(image_embeds, text_embeds, logits=True)  # (n_images, n_texts)
        logits = matrix[torch.arange(len(columns)), torch.tensor(list(columns), dtype=torch.long)]  # (n,)
        values = (sim.sigmoid(logits) if self.family == "siglip" else logits).tolist()
        extra = self.aesthetic_from_embeddings(image_embeds).tolist() if self.aesthetic_head is not None else None
        out = []
        for i, (v, lg) in enumerate(zip(values, logits.tolist())):
            probs = {sim.SIMILARITY_LABEL: v, **({sim.AESTHETIC_LABEL: extra[i]} if extra is not None else {})}
            top = sorted(probs.items(), key=lambda kv: -kv[1])
            out.append(Score(probs, top, [lg] + ([extra[i]] if extra is not None else [])))
        return out

    # --- many inputs ---------------------------------------------------------------------------

    def _tower_error(self, rows: Sequence[int], what: str) -> NumericalError:
        return nonfinite_error(f"the {what[:-1]} tower", "embeddings", rows, what)

    def embed_images(self, images: Any, *, normalize: bool = False, batch_size: int | None = None) -> torch.Tensor:
        """Image tower embeddings: (n, dim) float32, one row per image (see ``score_images`` for the kinds)."""
        prep = self.image_preprocessor
        items = prep.flatten(images)
        bs = self._check_batch(batch_size)  # type: ignore[attr-defined]
        if not items:
            return torch.empty(0, int(self.engine.spec.outputs[0].shape[-1]))
        return rows_in_batches(items, range(len(items)), bs,
                               lambda chunk: self.tower_embeddings(prep.feeds(prep.to_uint8(chunk)), "image",
                                                                   normalize=normalize),
                               lambda rows: self._tower_error(rows, "images"), "embedding images", self.progress)

    def embed_texts(self, texts: str | Sequence[str], *, normalize: bool = False, batch_size: int | None = None
                    ) -> torch.Tensor:
        """Text tower embeddings: (n, dim) float32, one row per text in order; texts are sorted by length and
        each batch padded to its longest (SigLIP: always to its fixed length), so a row equals the text alone."""
        self._need_towers("text embeddings")
        items = [texts] if isinstance(texts, str) else list(texts) if isinstance(texts, Sequence) else None
        if items is None or not all(isinstance(t, str) for t in items):
            raise InvalidArgumentError("texts", type(texts).__name__, "a text or a list of texts")
        prep = self.text_preprocessor
        prep.check(items)
        if not items:
            return torch.empty(0, int(self.text_engine.spec.outputs[0].shape[-1]))
        from fastgen.pipelines.preprocess import positive_int

        bs = self._text_batch if batch_size is None else positive_int("batch_size", batch_size)
        if bs > self._text_max_batch:  # the text tower's own profile, not the image tower's
            raise InvalidArgumentError("batch_size", bs, f"1 to {self._text_max_batch} (the text tower's batch profile)")
        if not prep.can_pad:
            bs = 1
        lengths = prep.lengths(items)
        return rows_in_batches(items, sorted(range(len(items)), key=lengths.__getitem__), bs,
                               lambda chunk: self.tower_embeddings(prep.feeds(chunk), "text", normalize=normalize),
                               lambda rows: self._tower_error(rows, "texts"), "embedding texts", self.progress)

    def embed(self, inputs: Any, *, normalize: bool | None = None, batch_size: int | None = None) -> torch.Tensor:
        """Two-tower scorer: a text or list of texts (``str``) through the text tower, images (PIL, arrays,
        tensors, ``Path`` objects) through the image tower: (n, dim) float32, unnormalised unless
        ``normalize``. Other scorers: the encoder's embeddings (``EmbeddingMethods.embed``)."""
        if self.task != "similarity":
            return super().embed(inputs, normalize=normalize, batch_size=batch_size)  # type: ignore[misc]
        norm = bool(normalize)
        texts = isinstance(inputs, str) or (isinstance(inputs, (list, tuple)) and inputs and
                                            all(isinstance(t, str) for t in inputs))
        if texts and self.text_engine is not None:
            return self.embed_texts(inputs, normalize=norm, batch_size=batch_size)
        return self.embed_images(inputs, normalize=norm, batch_size=batch_size)

    def similarity(self, images: Any, texts: str | Sequence[str], *, logits: bool = False,
                   batch_size: int | None = None) -> torch.Tensor:
        """(n_images, n_texts) float32 as the model computes it: CLIP ``logit_scale * cosine``
        (``logits_per_image``); SigLIP ``sigmoid(logit_scale * cosine + logit_bias)``, or with ``logits=True``
        its logits. Images are batched by the image tower's batch size, texts by length."""
        self._need_towers("similarity")
        image_embeds = self.embed_images(images, batch_size=batch_size)
        text_embeds = self.embed_texts(texts, batch_size=batch_size)
        return self.similarity_from_embeddings(image_embeds, text_embeds, logits=logits)

    def _similarity_scores(self, images: Any, texts: Any, batch_size: int | None) -> list[Any]:
        """``Scorer.score_images`` of a similarity scorer: zero-shot over ``texts``, or the aesthetic head."""
        if texts is None:
            return self.aesthetic_scores_from_embeddings(self.embed_images(images, batch_size=batch_size))
        items = [texts] if isinstance(texts, str) else list(texts)
        if not items or len(set(items)) != len(items):
            raise InvalidArgumentError("texts", f"{len(items)} texts", reason="zero-shot scoring needs one or more "
                                       "distinct texts (they are the labels)")
        logits = self.similarity(images, items, logits=True, batch_size=batch_size).numpy()  # (n, n_texts)
        if self.family == "siglip":
            probs = 1.0 / (1.0 + np.exp(-logits))
        else:
            e = np.exp(logits - logits.max(axis=-1, keepdims=True))
            probs = e / e.sum(axis=-1, keepdims=True)
        probs = probs.astype(np.float32)
        k = min(getattr(self, "top_k", 3), len(items))
        order = np.argsort(-probs, axis=-1, kind="stable")[:, :k].tolist()
        return [Score(dict(zip(items, p)), [(items[j], p[j]) for j in top], lg)
                for p, top, lg in zip(probs.tolist(), order, logits.tolist())]

    def score_pairs(self, images: Any, texts: Sequence[str], *, batch_size: int | None = None) -> list[Any]:
        """One ``Score`` per image against its own text (``texts[i]`` for image ``i``): ``similarity`` (what
        :meth:`similarity` gives for the pair) and, with a head, ``aesthetic``. Each distinct text is embedded
        once (best-of-N candidates share their prompt)."""
        self._need_towers("score_pairs")
        texts = [texts] if isinstance(texts, str) else list(texts)
        image_embeds = self.embed_images(images, batch_size=batch_size)
        if len(texts) != len(image_embeds):
            raise InvalidArgumentError("texts", f"{len(texts)} texts", f"one per image ({len(image_embeds)})")
        position = {t: i for i, t in enumerate(dict.fromkeys(texts))}  # each distinct text's column
        text_embeds = self.embed_texts(list(position), batch_size=batch_size)
        return self.pair_scores_from_embeddings(image_embeds, text_embeds, [position[t] for t in texts])


__all__ = ["SimilarityMethods", "TOWERS"]
