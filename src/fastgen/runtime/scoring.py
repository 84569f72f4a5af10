"""Scoring requests: preparation in the client's thread, request-level batches on the device thread.

A text is tokenized once, at submission: its length picks its bucket, the smallest edge of
``RuntimeConfig.text_buckets`` (capped at the scorer's max length) that holds it, and its ids are
kept; its batch pads them to that edge as the tokenizer would (the attention mask hides the
padding, so the score equals scoring the text alone), and its cost is the edge in tokens. With no buckets, every text shares one queue and each
batch is padded to its longest text (plain request-level batching). An image is decoded and
resized to the scorer's input size at submission (a bad image fails there, alone); its bucket is
that size and its cost its pixel count.

With ``RuntimeConfig.text_merge_tokens`` None, the executor times its text batches and fits their
cost (:class:`~fastgen.runtime.tuning.CallCost`); every so often it reports the padding one call is
worth (``on_merge_cost``), and the scheduler lets a batch pad shorter buckets' texts only up to that.
On a CPU with onnxruntime an engine call of the tiny classifier costs about 0.5 ms plus 5 us per
padded token, so a 16-token text padded to 128 costs more than a call of its own; in eager PyTorch
the fixed cost is several times larger and padding a few texts pays.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from fastgen.errors import InvalidArgumentError
from fastgen.models.spec import parse_dim
from fastgen.runtime.config import RuntimeConfig
from fastgen.runtime.requests import RequestStatus, ScoreRequest
from fastgen.runtime.scheduler import Decision
from fastgen.runtime.tuning import CallCost
from fastgen.runtime.worker import Outcome, isolate

logger = logging.getLogger(__name__)

#: The bucket of texts padded to the longest of their batch (no length buckets).
LONGEST = "longest"


def text_edges(buckets: tuple[int, ...], max_length: int) -> tuple[int, ...]:
    """Bucket edges capped at ``max_length``, which is always the last edge (empty in, empty out)."""
    if not buckets:
        return ()
    return tuple(sorted({min(b, max_length) for b in buckets} | {max_length}))


def _fast_encoder(tokenizer: Any, max_length: int) -> Any:
    """A private copy of a fast tokenizer's Rust backend that encodes one text as
    ``tokenizer(text, truncation=True, max_length=max_length)`` does, never padding; None for a slow
    tokenizer.

    Submissions are tokenized in the clients' threads, and the transformers wrapper costs about twice
    the encoding itself (it re-applies truncation and padding settings and builds a BatchEncoding
    per call) while holding the GIL that the device thread needs between engine calls. A copy, not
    the tokenizer's own backend: the Scorer's batch calls change that one's padding settings.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if not getattr(tokenizer, "is_fast", False) or backend is None:
        return None
    from tokenizers import Tokenizer

    encoder = Tokenizer.from_str(backend.to_str())
    encoder.no_padding()
    encoder.enable_truncation(max_length, strategy="longest_first",
                              direction=getattr(tokenizer, "truncation_side", "right"))
    return encoder


class ScoringExecutor:
    """Batches of one scorer (``kind``: ``text`` or ``image``)."""

    def __init__(self, scorer: Any, kind: str, config: RuntimeConfig,
                 on_oom: Callable[[str, Any, int], None] | None = None,
                 on_merge_cost: Callable[[str, float], None] | None = None) -> None:
        if getattr(scorer, "kind", None) != kind:
            raise InvalidArgumentError("scorer", repr(scorer), reason=f"expected a {kind} scorer")
        self.scorer = scorer
        self.kind = kind
        self.on_oom = on_oom
        self.max_batch_cap = self._engine_batch_cap()
        self.edges: tuple[int, ...] = ()
        self._encoder: Any = None
        if kind == "text":
            tok = scorer.tokenizer
            self._inputs = list(scorer.engine.spec.input_names)
            self._pad_values = {"input_ids": tok.pad_token_id or 0, "attention_mask": 0,
                                "token_type_ids": getattr(tok, "pad_token_type_id", 0) or 0}
            self._seq_min = int(getattr(scorer, "_seq_min", 1) or 1)
            self._encoder = _fast_encoder(tok, scorer.max_length)
            # Without character offsets (tokenizers >= 0.20), which nothing here reads: 15-20% faster.
            self._encode_batch = getattr(self._encoder, "encode_batch_fast", None) or getattr(
                self._encoder, "encode_batch", None)
            static = getattr(scorer, "_static_seq", None)
            self.edges = (static,) if static else text_edges(config.text_buckets, scorer.max_length)
            if getattr(scorer.tokenizer, "pad_token", None) is None:
                self.max_batch_cap = 1  # texts of different lengths cannot share a batch without padding
                self.edges = ()
        # Measured only where buckets can nest (two edges or more) and nothing fixed the price.
        self.on_merge_cost = on_merge_cost
        self.call_cost: CallCost | None = None
        if kind == "text" and len(self.edges) > 1 and config.text_merge_tokens is None:
            self.call_cost = CallCost(cap=float(config.max_batch_tokens))

    def _engine_batch_cap(self) -> int | None:
        """Largest batch the engine takes: a fixed batch, or a strict (TensorRT) profile's max."""
        engine = self.scorer.engine
        first = engine.spec.inputs[0].shape[0]
        if isinstance(first, int):
            return first
        rng = engine.spec.profile.dims.get(parse_dim(first)[0])  # type: ignore[index]
        return rng.max if rng is not None and getattr(engine, "strict_profile", False) else None

    @property
    def buckets(self) -> list[Any]:
        """The queues this executor can have (for auto-tuning)."""
        if self.kind == "image":
            return [tuple(self.scorer.image_size)]
        return list(self.edges) or [LONGEST]

    @property
    def defers(self) -> bool:
        """Texts with a fast tokenizer are prepared in batches (:meth:`prepare_many`), not one by one."""
        return self._encoder is not None

    def check(self, request: ScoreRequest) -> Any:
        """The item of a request that :meth:`prepare_many` will prepare; bad input raises here."""
        if self.kind == "text" and not isinstance(request.item, str):
            raise InvalidArgumentError("item", type(request.item).__name__, "a text (str) for a text scorer")
        return request.item

    def prepare_many(self, texts: list[str]) -> list[Any]:
        """(bucket, rows, cost, data), or the exception, of each text: one tokenizer call for all of
        them (the fast tokenizer releases the GIL and may use every core), one per text on failure."""
        try:
            encodings = self._encode_batch(texts)
        except Exception:
            out: list[Any] = []
            for text in texts:
                try:
                    out.append(self._entry(self._ids(self._encoder.encode(text))))  # type: ignore[union-attr]
                except Exception as exc:
                    out.append(exc)
            return out
        return [self._entry(self._ids(e)) for e in encodings]

    def _ids(self, e: Any) -> dict[str, list[int]]:
        # Each Encoding attribute is a fresh Python list: read only what is not implied. With no
        # padding the attention mask is all ones (``_pad`` writes it from the length).
        if "token_type_ids" in self._inputs:
            return {"input_ids": e.ids, "token_type_ids": e.type_ids}
        return {"input_ids": e.ids}

    def _entry(self, ids: dict[str, list[int]]) -> tuple[Any, int, float, Any]:
        length = len(ids["input_ids"])
        if not self.edges:
            return LONGEST, 1, float(length), ids
        edge = self.edges[min(bisect.bisect_left(self.edges, length), len(self.edges) - 1)]
        return edge, 1, float(edge), ids

    def prepare(self, request: ScoreRequest) -> tuple[Any, int, float, Any]:
        """(bucket, rows, cost, data) of one request, in the caller's thread; bad input raises here."""
        item = self.check(request)
        if self.kind == "text":
            # Tokenized once, here: the batch is padded from these ids, never tokenized again.
            if self._encoder is not None:
                return self._entry(self._ids(self._encoder.encode(item)))
            enc = self.scorer.tokenizer(item, truncation=True, max_length=self.scorer.max_length,
                                        return_attention_mask=True,
                                        return_token_type_ids="token_type_ids" in self._inputs)
            return self._entry({name: enc[name] for name in self._inputs if name in enc})
        from fastgen.pipelines import imageio

        s = self.scorer
        pixels = imageio.images_to_uint8([item], s.image_size, channels=s.channels, resample=s.resample,
                                         center_crop=s.center_crop, argument="item")[0]  # (H, W, C) uint8
        return tuple(s.image_size), 1, float(s.image_size[0] * s.image_size[1]), pixels

    def _pad(self, encodings: list[dict[str, list[int]]], length: int) -> dict[str, torch.Tensor]:
        """Token ids padded as the tokenizer pads (its side, pad id, pad token type; mask 0) to ``length``."""
        length = max(length, self._seq_min)
        left = getattr(self.scorer.tokenizer, "padding_side", "right") == "left"
        feeds = {}
        for name in self._inputs:
            batch = np.full((len(encodings), length), self._pad_values[name], dtype=np.int64)  # (n, length)
            for row, enc in zip(batch, encodings):
                values = enc.get(name)
                if values is None:  # the attention mask of an unpadded encoding: ones over its ids
                    values = 1
                    n = len(enc["input_ids"])
                    if left:
                        row[length - n:] = values
                    else:
                        row[:n] = values
                    continue
                if left:
                    row[length - len(values):] = values
                else:
                    row[:len(values)] = values
            feeds[name] = torch.from_numpy(batch)
        return feeds

    def score(self, bucket: Any, items: list[Any]) -> list[Any]:
        """One engine call over prepared items of one bucket."""
        if self.kind == "text":
            length = max(len(e["input_ids"]) for e in items) if bucket == LONGEST else int(bucket)
            return self.scorer.score_feeds(self._pad(items, length))
        return self.scorer.score_batch([torch.stack(items)])  # (n, H, W, C) uint8: already at size

    def run(self, decision: Decision) -> list[Outcome]:
        bucket = decision.queue[1]  # type: ignore[index]
        whole = len(decision.jobs)

        def oom(group: list) -> None:
            if self.on_oom is not None:
                self.on_oom(self.kind, bucket, max(1, len(group) // 2))

        def call(jobs: list) -> list[Any]:
            start = time.perf_counter()
            values = self.score(bucket, [j.payload.data for j in jobs])
            if self.call_cost is not None and len(jobs) == whole:  # retried halves would skew the fit
                self._observe(len(jobs) * int(bucket), time.perf_counter() - start)
            return values

        with torch.inference_mode():
            results = isolate(call, decision.jobs, what=f"{self.kind} scoring batch", on_oom=oom)
        return [Outcome(job, RequestStatus.SUCCEEDED if ok else RequestStatus.FAILED, value)
                for job, ok, value in results]

    def _observe(self, tokens: int, seconds: float) -> None:
        merge = self.call_cost.add(tokens, seconds)  # type: ignore[union-attr]
        if merge is not None and self.on_merge_cost is not None:
            logger.debug("text batches: one engine call is worth %.0f padded tokens", merge)
            self.on_merge_cost(self.kind, merge)

    def synthetic(self, bucket: Any, size: int) -> list[Any]:
        """``size`` prepared items of ``bucket`` that cost what real ones cost (for auto-tuning)."""
        if self.kind == "text":
            return [self.prepare(ScoreRequest("a", "text"))[3]] * size
        h, w = self.scorer.image_size
        return [torch.zeros((h, w, self.scorer.channels), dtype=torch.uint8)] * size


__all__ = ["LONGEST", "ScoringExecutor", "text_edges"]
