"""``/v1/embeddings`` and ``/v1/detect``: embedding and detection requests of the HTTP API over a Service.

Embeddings follow OpenAI's API: ``{"input": "text" | ["texts"], "model": ID, "encoding_format":
"float" | "base64"}`` -> ``{"object": "list", "data": [{"object": "embedding", "index": i,
"embedding": [...]}], "model": ID, "usage": {"prompt_tokens": n, "total_tokens": n}}``; base64 is
the float32 little-endian bytes of each vector, as OpenAI's clients decode it; tokens are the
encoder's own (special tokens included). fastgen's own ``images`` (base64 or ``data:`` URLs, as
``/v1/score`` takes) embeds images with an image encoder instead. Each text or image is one runtime
:class:`~fastgen.runtime.requests.EmbedRequest`, batched with every other client's.

Detections: ``{"images": [...], "model": ID, "conf", "iou", "max_det"}`` -> per image its boxes
(label, confidence, class id, x1 y1 x2 y2 in the image's own pixels) and each label's best
confidence; ``/v1/score`` naming a detector answers the same, with its own thresholds.
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np

from fastgen.errors import InvalidArgumentError
from fastgen.runtime.requests import DetectRequest, EmbedRequest
from fastgen.serve.awaiting import gather, submit_all
from fastgen.serve.generation import score_body
from fastgen.serve.scorers import ServedScorer, pick

#: ``encoding_format`` values of ``/v1/embeddings``.
ENCODINGS = ("float", "base64")


def encode_vector(vector: Any, encoding_format: str) -> list[float] | str:
    """One embedding as OpenAI sends it: a list of floats, or base64 of its float32 little-endian bytes."""
    array = np.asarray(vector, dtype="<f4")
    if encoding_format == "base64":
        return base64.b64encode(array.tobytes()).decode("ascii")
    return array.tolist()


async def detections_body(service: Any, detector: ServedScorer, images: list[Any], *, deadline_s: float | None = None,
                          conf: float | None = None, iou: float | None = None, max_det: int | None = None
                          ) -> list[dict[str, Any]]:
    """One entry per image of a detector's detections: ``scores`` (each label's best confidence, as
    ``/v1/score`` gives for a classifier), ``top``, and ``detections`` (label, confidence, class id,
    box x1 y1 x2 y2 in the image's pixels). Thresholds: given, else the detector's own."""
    s = detector.scorer
    conf, iou, max_det = (s.conf if conf is None else conf), (s.iou if iou is None else iou), (
        s.max_det if max_det is None else max_det)
    requests = [DetectRequest(im, scorer=detector.name, conf=conf, iou=iou, max_det=max_det, deadline_s=deadline_s)
                for im in images]
    found = await gather(submit_all(service.runtime, requests))
    scores = s.detection_scores(found) if found else []
    return [{"index": i, "kind": "image", **score_body(score), **d.to_dict()}
            for i, (d, score) in enumerate(zip(found, scores))]


async def pair_scores(service: Any, ranker: ServedScorer, images: list[Any], texts: list[str], *,
                      deadline_s: float | None = None) -> list[Any]:
    """A two-tower scorer's ``Score`` of each image against its own text (best-of-N: its prompt), as
    ``Scorer.score_pairs`` gives it (``similarity``, and ``aesthetic`` with a head), from embeddings the
    runtime batches with every other request's (each distinct text embedded once)."""
    import torch

    position = {t: i for i, t in enumerate(dict.fromkeys(texts))}  # each distinct text's column
    requests = [EmbedRequest(im, scorer=ranker.name, kind="image", deadline_s=deadline_s) for im in images]
    requests += [EmbedRequest(t, scorer=ranker.name, kind="text", deadline_s=deadline_s) for t in position]
    embeds = await gather(submit_all(service.runtime, requests))
    # The scorer's own tail of score_pairs, so both score a pair alike.
    return ranker.scorer.pair_scores_from_embeddings(torch.stack(embeds[:len(images)]),
                                                      torch.stack(embeds[len(images):]),
                                                      [position[t] for t in texts])


async def embeddings(service: Any, *, texts: list[str], images: list[Any], model: str | None,
                     encoding_format: str = "float", deadline_s: float | None = None) -> dict[str, Any]:
    """The body of a ``/v1/embeddings`` response (texts, or images, never both)."""
    if encoding_format not in ENCODINGS:
        raise InvalidArgumentError("encoding_format", encoding_format, ENCODINGS)
    if texts and images:
        raise InvalidArgumentError("images", f"{len(images)} images", reason="give input (texts) or images, not both")
    items: list[Any] = texts or images
    if not items:
        raise InvalidArgumentError("input", None, reason="give a text or a list of texts (or images)")
    service.config.check_items(len(items), "input" if texts else "images")
    kind = "text" if texts else "image"
    chosen = pick(service.served, model, kind=kind, request="EmbedRequest", what=f"{kind} embedding model")
    if chosen is None:
        raise InvalidArgumentError("model", model, reason=f"this server has no {kind} embedding model: start it with "
                                   "--scorer NAME=MODEL:text-encoder (or image-encoder)")
    futures = submit_all(service.runtime, [EmbedRequest(x, scorer=chosen.name, kind=kind, deadline_s=deadline_s)
                                           for x in items])
    vectors = await gather(futures)
    tokens = sum(f.tokens or 0 for f in futures)  # counted when the runtime tokenized them (0 for images)
    return {"object": "list", "model": chosen.id,
            "data": [{"object": "embedding", "index": i, "embedding": encode_vector(v, encoding_format)}
                     for i, v in enumerate(vectors)],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


async def detect(service: Any, *, images: list[Any], model: str | None, conf: float | None = None,
                 iou: float | None = None, max_det: int | None = None, deadline_s: float | None = None
                 ) -> dict[str, Any]:
    """The body of a ``/v1/detect`` response: one entry per image."""
    if not images:
        raise InvalidArgumentError("images", None, reason="give one image or more")
    service.config.check_items(len(images), "images")
    chosen = pick(service.served, model, kind="image", request="DetectRequest", what="image detector")
    if chosen is None:
        raise InvalidArgumentError("model", model, reason="this server has no detector: start it with "
                                   "--scorer NAME=DETECTOR.onnx")
    data = await detections_body(service, chosen, images, deadline_s=deadline_s, conf=conf, iou=iou, max_det=max_det)
    return {"object": "list", "model": chosen.id, "data": data}


__all__ = ["ENCODINGS", "detect", "detections_body", "embeddings", "encode_vector", "pair_scores"]
