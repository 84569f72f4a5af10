"""Video classification: ``Scorer.score_video`` (frames sampled by :mod:`fastgen.pipelines.video`).

A mixin of :class:`fastgen.pipelines.scorer.Scorer`: methods over the scorer's engine and image
preprocessor. The frames are sampled first (seeking to keyframes; uniformly or at a rate), then
scored in batches of ``batch_size`` through the same path as images (``Scorer._image_probs``: one
engine call per batch), so a frame scores exactly as the same picture passed as an image. The time
spent decoding and the time spent scoring are measured apart (``decode_ms``, ``inference_ms``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fastgen.errors import InvalidArgumentError
from fastgen.pipelines.video import SampledFrames, sample_video


@dataclass
class VideoScore:
    """Classification of a video: per-frame scores and their mean and max per label."""

    mean: dict[str, float]
    """Label to its probability averaged over the sampled frames."""
    max: dict[str, float]
    """Label to its largest probability over the sampled frames."""
    top: list[tuple[str, float]]
    """The ``top_k`` labels by mean probability, most probable first."""
    frames: list[Any] = field(default_factory=list)
    """:class:`~fastgen.pipelines.scorer.Score` of each sampled frame, in video order."""
    indices: list[int] = field(default_factory=list)
    """Frame index (0-based, display order) of each sampled frame."""
    timestamps: list[float | None] = field(default_factory=list)
    """Presentation time in seconds of each sampled frame (None for arrays)."""
    total_frames: int | None = None
    """Frame count of the video, when known."""
    decode_ms: float = 0.0
    """Wall time spent opening, indexing, seeking, decoding and converting the frames to RGB."""
    inference_ms: float = 0.0
    """Wall time spent scoring the frames: preprocessing, engine calls and probabilities."""
    decoded_frames: int = 0
    """Frames the decoder output to get the sampled ones (0 for arrays): the decode work done."""

    def to_dict(self) -> dict[str, Any]:
        return {"mean": dict(self.mean), "max": dict(self.max),
                "top": [{"label": k, "prob": p} for k, p in self.top],
                "frames": [{"index": i, "timestamp": t, **s.to_dict()}
                           for i, t, s in zip(self.indices, self.timestamps, self.frames)],
                "total_frames": self.total_frames, "decode_ms": self.decode_ms,
                "inference_ms": self.inference_ms, "decoded_frames": self.decoded_frames}


class VideoMethods:
    """Mixed into :class:`~fastgen.pipelines.scorer.Scorer`."""

    labels: list[str]
    _require: Any
    _image_probs: Any
    _top: Any

    def score_video(self, video: Any, *, frames: int | None = None, fps: float | None = None,
                    batch_size: int | None = None) -> VideoScore:
        """Score frames sampled from ``video`` and aggregate them per label (mean and max).

        ``frames``: how many frames, uniformly over the video (default 8); with ``fps``, frames are
        taken at that rate (frames per second, files only) and ``frames`` caps their number (default
        256; past it they are spread uniformly). ``video``: a file path (PyAV, seeking to keyframes)
        or a uint8 (T, H, W, C) array / tensor. See :mod:`fastgen.pipelines.video` for the rules.
        Unreadable videos raise :class:`~fastgen.errors.InvalidArgumentError`.
        """
        self._require("image", "video", os.fspath(video) if isinstance(video, os.PathLike) else video)
        start = time.perf_counter()
        sampled = sample_video(video, frames, fps=fps)
        decoded = time.perf_counter()
        scores, _ = self._image_probs(sampled.frames, batch_size, "frames")
        result = self.aggregate_video(sampled, scores)
        result.decode_ms, result.inference_ms = (decoded - start) * 1e3, (time.perf_counter() - decoded) * 1e3
        return result

    def aggregate_video(self, sampled: SampledFrames, scores: Sequence[Any]) -> VideoScore:
        """The :class:`VideoScore` of sampled frames from their scores (one ``Score`` per frame, in order):
        what a caller that batches frames with other requests (``fastgen.Runtime``) finishes with, after
        :func:`~fastgen.pipelines.video.sample_video` and the scorer's image path (preprocessor,
        :meth:`logits`, :meth:`scores`). ``decode_ms`` / ``inference_ms`` are left for the caller to set."""
        if len(scores) != len(sampled.frames) or not scores:
            raise InvalidArgumentError("scores", f"{len(scores)} scores",
                                       f"one per sampled frame ({len(sampled.frames)})")
        labels = self.labels
        probs = np.array([[s.probs[k] for k in labels] for s in scores], dtype=np.float64)  # (K, num_labels)
        mean = probs.mean(axis=0)  # (num_labels,)
        (order,) = self._top(mean[None])
        mean_list, peak = mean.tolist(), probs.max(axis=0).tolist()
        top = [(labels[j], mean_list[j]) for j in order]
        return VideoScore(dict(zip(labels, mean_list)), dict(zip(labels, peak)), top, list(scores),
                          list(sampled.indices), list(sampled.timestamps), sampled.total,
                          decoded_frames=sampled.decoded)


__all__ = ["VideoMethods", "VideoScore"]
