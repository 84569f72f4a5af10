"""Embedding and detection requests: the executors of an embedding scorer and of a detector.

Both batch as :class:`~fastgen.runtime.scoring.ScoringExecutor` does (same preparation thread,
same shape buckets, same budgets, same failure isolation), and differ in what one batch runs:

- :class:`EmbeddingExecutor` (a scorer whose task is ``embed``): texts in length buckets, padded to
  the bucket's edge (the attention mask hides the padding from the pooling), images in one bucket
  of the encoder's input size; one ``Scorer.embeddings`` call per batch, then
  ``Scorer.embedding_rows``: each request's (dim,) float32 row (a copy, so a kept result does not
  hold the batch's memory), or its NumericalError. Requests that ask for different ``normalize``
  share the call: it runs unnormalised and each row is normalised as its request asks
  (``l2_normalize``, the model's own Normalize).
- :class:`DetectionExecutor` (a scorer whose task is ``detect``): images letterboxed to the
  detector's input size at preparation (their :class:`~fastgen.pipelines.detection.Letterbox` kept),
  one bucket per input size; one ``Scorer.detector_outputs`` call per batch, then
  ``Scorer.detection_rows`` once per group of rows with the same thresholds, boxes mapped back to
  each image's pixels (a row with a NaN or an infinity fails its own request only). A :class:`~fastgen.runtime.requests.ScoreRequest` to a detector shares those
  batches: its ``Score`` holds each label's best confidence (``Scorer.detection_scores``, the
  detector's own ``conf`` / ``iou`` / ``max_det``), as ``Scorer.score_images`` gives.
- :class:`TowerExecutor` (a two-tower scorer, task ``similarity``: CLIP / SigLIP): one per tower,
  the text tower's on its own lane (``NAME:text``, texts in length buckets), each call one
  ``Scorer.tower_embeddings``; an image EmbedRequest's row, normalised if asked (``Scorer.embed``'s
  default for towers: not), and on the image tower ScoreRequests get the aesthetic head's ``Score``
  from the same call.

A request's own options (``normalize``; ``conf``, ``iou``, ``max_det``) travel with its prepared
data as a :class:`Tagged` item.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from fastgen.runtime.config import RuntimeConfig
from fastgen.runtime.scoring import LONGEST, ScoringExecutor


@dataclass(frozen=True)
class Tagged:
    """A request's item (checked, then prepared) and its own options (None: a ScoreRequest's)."""

    data: Any
    options: Any = None


class _TaggedExecutor(ScoringExecutor):
    """Requests' options carried through checking and preparation beside their items."""

    def options(self, request: Any) -> Any:  # pragma: no cover - each subclass says
        raise NotImplementedError

    def check(self, request: Any) -> Tagged:
        return Tagged(super().check(request), self.options(request))

    def prepare_many(self, items: list[Any]) -> list[Any]:
        out = super().prepare_many([t.data for t in items])
        return [v if isinstance(v, BaseException) else (*v[:3], Tagged(v[3], t.options)) for v, t in zip(out, items)]

    def prepare(self, request: Any) -> tuple[Any, int, float, Any]:
        bucket, rows, cost, data = super().prepare(request)
        return bucket, rows, cost, Tagged(data, self.options(request))

    def token_count(self, data: Any) -> int | None:
        return super().token_count(data.data)

    def synthetic(self, bucket: Any, size: int) -> list[Any]:
        return [Tagged(d.data if isinstance(d, Tagged) else d, None) for d in super().synthetic(bucket, size)]


class EmbeddingExecutor(_TaggedExecutor):
    """Batches of an embedding scorer's EmbedRequests."""

    def __init__(self, scorer: Any, kind: str, config: RuntimeConfig, *, name: str | None = None) -> None:
        super().__init__(scorer, kind, config, name=name)
        self.default_normalize = bool(scorer.embedding.normalize)
        if self.text is not None and "attention_mask" not in self.text.input_names and scorer.pooling != "pooled":
            self.max_batch_cap = 1  # token pooling with no mask to hide padding: one text per call (as embed does)

    def options(self, request: Any) -> bool:
        normalize = getattr(request, "normalize", None)
        return self.default_normalize if normalize is None else normalize

    def score(self, bucket: Any, items: list[Any]) -> list[Any]:
        data = [t.data for t in items]
        if self.text is not None:
            length = max(len(e["input_ids"]) for e in data) if bucket == LONGEST else int(bucket)
            feeds = self.text.pad(data, length)
        else:
            feeds = self.image.feeds(torch.stack(data))  # type: ignore[union-attr]  # (n, H, W, C) uint8
        wanted = [t.options for t in items]
        same = all(w == wanted[0] for w in wanted)
        out = self.scorer.embeddings(feeds, normalize=wanted[0] if same else False)  # (n, dim) float32, CPU
        if not same:
            from fastgen.pipelines.embeddings import l2_normalize

            out = torch.stack([l2_normalize(row[None])[0] if w else row for row, w in zip(out, wanted)])
        return [r if isinstance(r, BaseException) else r.clone() for r in self.scorer.embedding_rows(out)]


class DetectionExecutor(_TaggedExecutor):
    """Batches of a detector's DetectRequests and ScoreRequests (one engine call for both)."""

    def options(self, request: Any) -> tuple[float, float, int] | None:
        if type(request).__name__ != "DetectRequest":
            return None  # a ScoreRequest: the detector's own thresholds, each label's best confidence
        from fastgen.pipelines.scorer_detect import DEFAULT_CONF, DEFAULT_IOU, DEFAULT_MAX_DET

        return (DEFAULT_CONF if request.conf is None else float(request.conf),
                DEFAULT_IOU if request.iou is None else float(request.iou),
                DEFAULT_MAX_DET if request.max_det is None else int(request.max_det))

    def _image_entry(self, item: Any) -> tuple[Any, int, float, Any]:
        image = self.image
        assert image is not None
        pixels, boxes = image.letterbox([item], argument="item")  # (1, H, W, C) uint8 at the input size
        return image.size, 1, float(image.size[0] * image.size[1]), (pixels[0], boxes[0])

    def synthetic(self, bucket: Any, size: int) -> list[Any]:
        from fastgen.pipelines.detection import Letterbox

        h, w = self.image.size  # type: ignore[union-attr]
        pixels = torch.zeros((h, w, self.image.channels), dtype=torch.uint8)  # type: ignore[union-attr]
        return [Tagged((pixels, Letterbox.fit(h, w, (h, w))), None)] * size

    def score(self, bucket: Any, items: list[Any]) -> list[Any]:
        scorer = self.scorer
        raw = scorer.detector_outputs(self.image.feeds(torch.stack([t.data[0] for t in items])))  # type: ignore[union-attr]
        groups: dict[Any, list[int]] = {}
        for i, t in enumerate(items):
            groups.setdefault(t.options, []).append(i)
        out: list[Any] = [None] * len(items)
        for options, rows in groups.items():
            index = torch.tensor(rows, device=raw.device)
            conf, iou, max_det = (scorer.conf, scorer.iou, scorer.max_det) if options is None else options
            # detection_rows: a row with a NaN or an infinity is its own NumericalError, never the batch's.
            values = scorer.detection_rows(raw[index], [items[i].data[1] for i in rows], conf=conf, iou=iou,
                                           max_det=max_det)
            if options is None:  # ScoreRequests: each label's best confidence (boxes not needed)
                found = [v for v in values if not isinstance(v, BaseException)]
                scores = iter(scorer.detection_scores(found) if found else [])
                values = [v if isinstance(v, BaseException) else next(scores) for v in values]
            for i, value in zip(rows, values):
                out[i] = value
        return out


class TowerExecutor(_TaggedExecutor):
    """Batches of one tower of a two-tower (similarity: CLIP / SigLIP) scorer: EmbedRequests (``kind``
    text: the text tower, in length buckets; image: the image tower), and, on the image tower,
    ScoreRequests scored by the aesthetic head on the same embeddings."""

    def __init__(self, scorer: Any, kind: str, config: RuntimeConfig, *, name: str | None = None) -> None:
        super().__init__(scorer, kind, config, name=name, engine=scorer.text_engine if kind == "text" else None)

    def options(self, request: Any) -> bool | None:
        if type(request).__name__ != "EmbedRequest":
            return None  # a ScoreRequest: the aesthetic head's Score
        return bool(request.normalize)  # a tower's embeddings are unnormalised unless asked (Scorer.embed)

    def score(self, bucket: Any, items: list[Any]) -> list[Any]:
        from fastgen.pipelines.embeddings import l2_normalize
        from fastgen.pipelines.scores import nonfinite_error

        data = [t.data for t in items]
        if self.text is not None:
            length = max(len(e["input_ids"]) for e in data) if bucket == LONGEST else int(bucket)
            out = self.scorer.tower_embeddings(self.text.pad(data, length), "text")  # (n, dim) float32, CPU
        else:
            out = self.scorer.tower_embeddings(self.image.feeds(torch.stack(data)), "image")  # type: ignore[union-attr]
        finite = torch.isfinite(out).all(dim=-1).tolist()
        rows = [i for i, t in enumerate(items) if t.options is None]  # ScoreRequests: the aesthetic head's
        heads = dict(zip(rows, self.scorer.aesthetic_scores_from_embeddings(out[rows]))) if rows else {}
        values: list[Any] = []
        for i, (row, t, ok) in enumerate(zip(out, items, finite)):
            if not ok:
                values.append(nonfinite_error(f"the {self.kind} tower", "embeddings"))
            elif t.options is None:
                values.append(heads[i])
            else:
                values.append((l2_normalize(row[None])[0] if t.options else row).clone())
        return values

__all__ = ["DetectionExecutor", "EmbeddingExecutor", "Tagged", "TowerExecutor"]
