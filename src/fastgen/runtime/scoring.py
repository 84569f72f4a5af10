"""Scoring requests: preparation in the client's thread, request-level batches on the device thread.

The inputs go through the scorer's own preprocessors (:mod:`fastgen.pipelines.preprocess`), so a
request scores as ``Scorer.score_texts`` / ``score_images`` would score it alone:

A text is tokenized once, at submission (:meth:`TextPreprocessor.encode_batch`: the preparation
thread tokenizes every text submitted meanwhile in one call): its length picks its bucket, the
smallest edge of ``RuntimeConfig.text_buckets`` (capped at the scorer's max length) that holds it,
and its ids are kept; its batch pads them to that edge as the tokenizer would
(:meth:`TextPreprocessor.pad`: the attention mask hides the padding), and its cost is the edge in
tokens. With no buckets, every text shares one queue and each batch is padded to its longest text
(plain request-level batching). An image is only checked at submission (its type, and an array's
dtype and layout, on one pixel: a bad one raises there); the preparation thread decodes files and
resizes to the scorer's input size, so a large JPEG never blocks the submitting thread (an asyncio
event loop), and a file that cannot be read fails its future with a one-line error. An array or a
tensor is copied at submission (the client may reuse its buffer). Its bucket is the input size and
its cost the pixel count.

With ``RuntimeConfig.text_merge_tokens`` None, the executor times its text batches and fits their
cost (:class:`~fastgen.runtime.batch_tuning.CallCost`); every so often its outcomes carry the padding
one call is worth (``Outcomes.merge_cost``), and the scheduler lets a batch pad shorter buckets'
texts only up to that. On a CPU with onnxruntime an engine call of the tiny classifier costs about
0.5 ms plus 5 us per padded token, so a 16-token text padded to 128 costs more than a call of its
own; in eager PyTorch the fixed cost is several times larger and padding a few texts pays.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import numpy as np
import torch

from fastgen.errors import InvalidArgumentError
from fastgen.models.spec import parse_dim
from fastgen.runtime.batch_tuning import CallCost
from fastgen.runtime.config import RuntimeConfig
from fastgen.runtime.execution import Outcome, Outcomes, isolate
from fastgen.runtime.request_scheduler import Decision
from fastgen.runtime.requests import RequestStatus, ScoreRequest

#: The bucket of texts padded to the longest of their batch (no length buckets).
LONGEST = "longest"
#: Images decoded at once by the preparation thread (itself included).
_DECODERS = max(1, min(8, os.cpu_count() or 1))


class ScoringExecutor:
    """Batches of one scorer (``kind``: ``text`` or ``image``; ``name``: the runtime's name for it,
    its lane's and its metrics' label; default its kind). ``engine``: the engine that runs the
    batches when it is not ``scorer.engine`` (a two-tower scorer's text tower, whose texts are
    ``kind`` text on an image scorer)."""

    def __init__(self, scorer: Any, kind: str, config: RuntimeConfig, *, name: str | None = None,
                 engine: Any = None) -> None:
        if engine is None and getattr(scorer, "kind", None) != kind:
            raise InvalidArgumentError("scorer", repr(scorer), reason=f"expected a {kind} scorer")
        self.scorer = scorer
        self.kind = kind
        self.name = name or kind
        self.engine = engine if engine is not None else scorer.engine
        self.max_batch_cap = self._engine_batch_cap()
        self.edges: tuple[int, ...] = ()
        self.text = scorer.text_preprocessor if kind == "text" else None
        self.image = scorer.image_preprocessor if kind == "image" else None
        if self.text is not None:
            self.edges = self.text.bucket_edges(config.text_buckets)
            if not self.text.can_pad:
                self.max_batch_cap = 1  # texts of different lengths cannot share a batch without padding
            self.text.encoder  # noqa: B018 - made now, not at the first submission
        # Measured only where buckets can nest (two edges or more) and nothing fixed the price.
        self.call_cost: CallCost | None = None
        if kind == "text" and len(self.edges) > 1 and config.text_merge_tokens is None:
            self.call_cost = CallCost(cap=float(config.max_batch_tokens))

    def _engine_batch_cap(self) -> int | None:
        """Largest batch the engine takes: a fixed batch, or a strict (TensorRT) profile's max."""
        engine = self.engine
        first = engine.spec.inputs[0].shape[0]
        if isinstance(first, int):
            return first
        rng = engine.spec.profile.dims.get(parse_dim(first)[0])  # type: ignore[index]
        return rng.max if rng is not None and getattr(engine, "strict_profile", False) else None

    @property
    def buckets(self) -> list[Any]:
        """The queues this executor can have (for auto-tuning)."""
        if self.image is not None:
            return [self.image.size]
        return list(self.edges) or [LONGEST]

    @property
    def defers(self) -> bool:
        """Texts with a fast tokenizer are prepared in batches (:meth:`prepare_many`), not one by one;
        images always are (decoding and resizing stay off the submitting thread)."""
        return self.image is not None or (self.text is not None and self.text.encoder is not None)

    def check(self, request: ScoreRequest) -> Any:
        """The item of a request that :meth:`prepare_many` will prepare; bad input raises here."""
        item = request.item
        if self.kind == "text" and not isinstance(item, str):
            raise InvalidArgumentError("item", type(item).__name__, "a text (str) for a text scorer")
        if self.image is None or isinstance(item, (str, os.PathLike)):
            return item  # a file is read by the preparation thread: its errors arrive through the future
        from PIL import Image

        if isinstance(item, Image.Image):
            return item  # possibly not decoded yet (Image.open is lazy): prepared later
        probe = item
        if isinstance(item, np.ndarray) and item.ndim >= 2:
            probe, item = item[:1, :1], np.array(item, copy=True)
        elif isinstance(item, torch.Tensor) and item.dim() >= 2:
            probe = item[:1, :1] if item.dtype == torch.uint8 else item[..., :1, :1]  # (H, W, C) / (C, H, W)
            item = item.detach().to("cpu", copy=True)
        # The preprocessor's own checks on one pixel (dtype, layout, channels, type): a bad item
        # raises here exactly as it would when prepared, at the cost of a 1x1 image.
        self.image.to_uint8([probe], argument="item")
        return item

    def prepare_many(self, items: list[Any]) -> list[Any]:
        """(bucket, rows, cost, data), or the exception, of each item. Texts: one tokenizer call for all
        of them (the fast tokenizer releases the GIL and may use every core), one per text on failure.
        Images: each decoded and resized on its own (a bad file fails alone)."""
        if self.image is not None:
            return self._images(items)
        text = self.text
        texts = items
        assert text is not None
        try:
            encodings = text.encode_batch(texts)
        except Exception:
            out = []
            for item in texts:
                try:
                    out.append(self._entry(text.encode(item)))
                except Exception as exc:
                    out.append(exc)
            return out
        return [self._entry(e) for e in encodings]

    def _entry(self, ids: dict[str, list[int]]) -> tuple[Any, int, float, Any]:
        length = len(ids["input_ids"])
        if not self.edges:
            return LONGEST, 1, float(length), ids
        edge = self.text.bucket(length, self.edges)  # type: ignore[union-attr]
        return edge, 1, float(edge), ids

    def token_count(self, data: Any) -> int | None:
        """The token count of a prepared text (its ``data``: token ids); None for an image."""
        return len(data["input_ids"]) if self.text is not None else None

    def prepare(self, request: ScoreRequest) -> tuple[Any, int, float, Any]:
        """(bucket, rows, cost, data) of one request, in the caller's thread; bad input raises here."""
        item = self.check(request)
        if self.text is not None:
            # Tokenized once, here: the batch is padded from these ids, never tokenized again.
            return self._entry(self.text.encode(item))
        return self._image_entry(item)

    def _images(self, items: list[Any]) -> list[Any]:
        """Entries (or exceptions) of images, decoded on up to ``_DECODERS`` short-lived threads at once
        (PIL releases the GIL while it decodes and resizes: clients that decoded in their own threads
        did so in parallel, and the preparation thread must not serialize them)."""
        out: list[Any] = [None] * len(items)

        def work(start: int, step: int) -> None:
            for i in range(start, len(items), step):
                try:
                    out[i] = self._image_entry(items[i])
                except Exception as exc:
                    out[i] = exc

        n = min(len(items), _DECODERS)
        threads = [threading.Thread(target=work, args=(i, n), name="fastgen-runtime-decode", daemon=True)
                   for i in range(1, n)]
        for t in threads:
            t.start()
        work(0, n)
        for t in threads:
            t.join()
        return out

    def _image_entry(self, item: Any) -> tuple[Any, int, float, Any]:
        image = self.image
        assert image is not None
        pixels = image.to_uint8([item], argument="item")[0]  # (H, W, C) uint8
        return image.size, 1, float(image.size[0] * image.size[1]), pixels

    def score(self, bucket: Any, items: list[Any]) -> list[Any]:
        """One engine call over prepared items of one bucket."""
        if self.text is not None:
            length = max(len(e["input_ids"]) for e in items) if bucket == LONGEST else int(bucket)
            feeds = self.text.pad(items, length)
        else:
            feeds = self.image.feeds(torch.stack(items))  # type: ignore[union-attr]  # (n, H, W, C) uint8 at size
        logits = self.scorer.logits(feeds)
        # A non-finite row fails its own request (a NumericalError in its place), not the batch; a
        # scorer-like object without score_rows (a test double, a plugin) scores the batch whole.
        score_rows = getattr(self.scorer, "score_rows", None)
        return score_rows(logits) if score_rows is not None else self.scorer.scores(logits)

    def run(self, decision: Decision) -> Outcomes:
        """One batch: a Score (or the error) per request, the sizes that fit in device memory and those
        that did not, and, now and then, the padding one text engine call is worth (fitted to the
        timed batches)."""
        bucket = decision.queue[1]  # type: ignore[index]
        whole = len(decision.jobs)
        result = Outcomes()

        def oom(group: list) -> None:
            result.memory.append((len(group), False))

        def call(jobs: list) -> list[Any]:
            start = time.perf_counter()
            values = self.score(bucket, [j.payload.data for j in jobs])
            result.memory.append((len(jobs), True))
            if self.call_cost is not None and len(jobs) == whole:  # retried halves would skew the fit
                merge = self.call_cost.add(len(jobs) * int(bucket), time.perf_counter() - start)
                if merge is not None:
                    result.merge_cost = merge
            return values

        with torch.inference_mode():
            results = isolate(call, decision.jobs, what=f"{self.name} scoring batch", on_oom=oom)
        result.ended = [Outcome(job, RequestStatus.FAILED if not ok or isinstance(value, BaseException)
                                else RequestStatus.SUCCEEDED, value) for job, ok, value in results]
        return result

    def synthetic(self, bucket: Any, size: int) -> list[Any]:
        """``size`` prepared items of ``bucket`` that cost what real ones cost (for auto-tuning)."""
        if self.text is not None:
            return [self.prepare(ScoreRequest("a", "text"))[3]] * size
        h, w = self.image.size  # type: ignore[union-attr]
        return [torch.zeros((h, w, self.image.channels), dtype=torch.uint8)] * size  # type: ignore[union-attr]


def make_executors(name: str, scorer: Any, config: RuntimeConfig) -> dict[str, Any]:
    """The executors of one of a runtime's scorers by lane (``name``; a two-tower scorer's texts:
    ``name:text`` too), by what the scorer does (its ``task``): an encoder's embeds
    (:class:`~fastgen.runtime.embed_detect.EmbeddingExecutor`), a detector's detects and scores
    (:class:`~fastgen.runtime.embed_detect.DetectionExecutor`), a two-tower (similarity) scorer's
    embeds with each tower and scores with its aesthetic head
    (:class:`~fastgen.runtime.embed_detect.TowerExecutor`), any other's classifies."""
    from fastgen.runtime.embed_detect import DetectionExecutor, EmbeddingExecutor, TowerExecutor
    from fastgen.runtime.scorer_names import lane, task_of

    task = task_of(scorer)
    if task == "similarity":
        out = {name: TowerExecutor(scorer, "image", config, name=name)}
        if getattr(scorer, "text_engine", None) is not None:
            key = lane(name, scorer, "text")
            out[key] = TowerExecutor(scorer, "text", config, name=key)
        return out
    kind = {"embed": EmbeddingExecutor, "detect": DetectionExecutor}.get(task, ScoringExecutor)
    return {name: kind(scorer, scorer.kind, config, name=name)}


__all__ = ["LONGEST", "ScoringExecutor", "make_executors"]
