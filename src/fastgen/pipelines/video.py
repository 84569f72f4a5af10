"""Frame sampling of videos for per-frame classification.

``K`` frames are taken uniformly over the video: frame indices ``rint(linspace(0, T - 1, K))``
(``T`` frames; fewer than ``K`` distinct frames when ``T < K``). Files are decoded with PyAV:

- when the container states its frame count (mp4, avi...), frames are decoded in order and only the
  chosen ones are converted to RGB; decoding stops after the last chosen frame;
- when it does not (mkv, webm...), the same positions are taken by time: targets
  ``linspace(start, start + duration - 1/fps, K)``, each matched to the decoded frame whose
  timestamp is nearest (on a constant-rate video this picks the frames the index rule picks);
- when neither the count nor the duration is known, a first pass counts the frames.

Decoding is sequential (no seeking): a K-frame sample of a long video costs one decode of the video
up to its last chosen frame, which is what a seek per frame costs too for the usual short-GOP
clips, without its keyframe-accuracy pitfalls.

Files are opened as images are (:func:`fastgen.pipelines.classifier_images.open_regular`): regular
files only (a FIFO, device, socket or directory is refused before anything is read), and PyAV reads
the very descriptor that was checked. Frames larger than ``PIL.Image.MAX_IMAGE_PIXELS`` are refused
before they are converted, as images are.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fastgen.errors import InvalidArgumentError
from fastgen.pipelines.classifier_images import check_pixels, open_regular

logger = logging.getLogger(__name__)

#: Extensions treated as videos without probing (the CLI also probes unknown ones).
VIDEO_EXTENSIONS = frozenset({".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts",
                              ".m2ts", ".wmv", ".flv", ".3gp", ".ogv"})


@dataclass
class SampledFrames:
    """Frames chosen from a video, in order."""

    frames: list[np.ndarray]
    """RGB frames, each (height, width, 3) uint8."""
    indices: list[int]
    """Position of each frame in the video (0-based, decode order)."""
    timestamps: list[float | None] = field(default_factory=list)
    """Presentation time of each frame in seconds (None for arrays or streams without timestamps)."""
    total: int | None = None
    """Frame count of the video when known."""


#: Most frames sampled from one video: they are all held decoded at once (10,000 at 224x224 are 1.5 GB);
#: score a longer stretch in several calls.
MAX_FRAMES = 10_000


def check_frames(frames: Any) -> int:
    if isinstance(frames, bool) or not isinstance(frames, (int, np.integer)) or not 1 <= frames <= MAX_FRAMES:
        raise InvalidArgumentError("frames", frames, f"integers from 1 to {MAX_FRAMES}")
    return int(frames)


def sample_indices(total: int, frames: int) -> list[int]:
    """``rint(linspace(0, total - 1, frames))``, deduplicated (sorted)."""
    frames = check_frames(frames)
    if total < 1:
        return []
    idx = np.rint(np.linspace(0, total - 1, frames)).astype(np.int64)
    return sorted({int(i) for i in idx})


def sample_array(video: Any, frames: int) -> SampledFrames:
    """Sample a (T, H, W, C) uint8 numpy array or torch tensor (C in 1, 3, 4)."""
    if isinstance(video, torch.Tensor):
        video = video.detach().cpu().numpy() if video.dtype == torch.uint8 else video
    if not isinstance(video, np.ndarray) or video.dtype != np.uint8 or video.ndim != 4 \
            or video.shape[3] not in (1, 3, 4) or video.shape[0] < 1:
        desc = f"{type(video).__name__} of shape {getattr(video, 'shape', '?')} and dtype {getattr(video, 'dtype', '?')}"
        raise InvalidArgumentError("video", desc, "a video file path or a uint8 array (T, H, W, C), C in 1, 3, 4")
    idx = sample_indices(video.shape[0], frames)
    return SampledFrames([video[i] for i in idx], idx, [None] * len(idx), int(video.shape[0]))


def _fail(path: Any, exc: BaseException | str) -> InvalidArgumentError:
    detail = exc if isinstance(exc, str) else (" ".join(str(exc).split()) or type(exc).__name__)
    return InvalidArgumentError("video", os.fspath(path), reason=f"cannot decode video: {detail}")


class _Video:
    """An open container, its first video stream and the file PyAV reads from (closed together)."""

    def __init__(self, container: Any, stream: Any, file: Any) -> None:
        self.container, self.stream, self.file = container, stream, file

    def close(self) -> None:
        try:
            self.container.close()
        finally:
            self.file.close()

    def __enter__(self) -> _Video:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _open(path: Any) -> _Video:
    import av

    name = os.fspath(path)
    file = open_regular(path, "video")  # never blocks: a FIFO or a device is refused here
    try:
        container = av.open(file)  # the descriptor that was checked: nothing can be swapped in between
    except Exception as exc:  # PyAV raises many error types (FFmpegError subclasses, OSError...)
        file.close()
        raise _fail(path, exc) from None
    video = _Video(container, None, file)
    try:
        if not container.streams.video:
            raise _fail(path, "no video stream")
        video.stream = container.streams.video[0]
        video.stream.thread_type = "AUTO"  # frame + slice threads; the frames come out in the same order
        ctx = video.stream.codec_context
        check_pixels(int(ctx.width or 0), int(ctx.height or 0), "video", name)
    except BaseException:
        video.close()
        raise
    return video


def _rgb(frame: Any, path: Any) -> np.ndarray:
    # A stream may change size mid-way: every converted frame counts against the pixel limit.
    check_pixels(int(frame.width), int(frame.height), "video", os.fspath(path))
    return frame.to_ndarray(format="rgb24")  # (H, W, 3) uint8


def _decode(path: Any):
    """Yield decoded frames of the first video stream; decoder errors become one-line errors."""
    with _open(path) as video:
        try:
            yield from video.container.decode(video.stream)
        except InvalidArgumentError:
            raise
        except Exception as exc:
            raise _fail(path, exc) from None


def _by_index(path: Any, wanted: list[int]) -> tuple[SampledFrames, int]:
    """Decode up to the last wanted index; returns the sample and the number of frames decoded."""
    chosen = set(wanted)
    last = wanted[-1]
    out = SampledFrames([], [], [])
    count = 0
    gen = _decode(path)
    try:
        for i, frame in enumerate(gen):
            count = i + 1
            if i in chosen:
                out.frames.append(_rgb(frame, path))
                out.indices.append(i)
                out.timestamps.append(frame.time)
            if i >= last:
                break
    finally:
        gen.close()
    return out, count


def _count(path: Any) -> int:
    n = 0
    for _ in _decode(path):
        n += 1
    return n


def _duration(container: Any, stream: Any) -> tuple[float, float | None, float | None]:
    """(start s, duration s or None, frame period s or None) from stream or container metadata."""
    import av

    tb = stream.time_base
    start = float(stream.start_time * tb) if stream.start_time is not None and tb else 0.0
    duration = None
    if stream.duration and tb:
        duration = float(stream.duration * tb)
    elif container.duration:
        duration = container.duration / av.time_base
    rate = stream.average_rate or stream.guessed_rate
    period = 1.0 / float(rate) if rate else None
    return start, duration, period


def _header_frames(stream: Any) -> int:
    """The frame count the container states (0: unknown)."""
    return int(stream.frames or 0)


def _by_time(path: Any, targets: list[float]) -> SampledFrames:
    """For each target time, the decoded frame nearest to it (ties: the earlier frame)."""
    out = SampledFrames([], [], [])
    j = 0
    prev: tuple[int, float, Any] | None = None  # (index, time, frame) of the previous decoded frame

    def take(item: tuple[int, float, Any]) -> None:
        if not out.indices or out.indices[-1] != item[0]:  # several targets may land on one frame
            out.frames.append(_rgb(item[2], path))
            out.indices.append(item[0])
            out.timestamps.append(item[1])

    count = 0
    gen = _decode(path)
    try:
        for i, frame in enumerate(gen):
            count = i + 1
            t = frame.time
            if t is None:
                raise _fail(path, "frames without timestamps and no frame count")
            cur = (i, float(t), frame)
            while j < len(targets) and cur[1] >= targets[j]:
                nearer_prev = prev is not None and targets[j] - prev[1] <= cur[1] - targets[j]
                take(prev if nearer_prev else cur)  # type: ignore[arg-type]
                j += 1
            if j >= len(targets):
                break
            prev = cur
    finally:
        gen.close()
    if j < len(targets) and prev is not None:  # targets past the last frame: the last frame
        take(prev)
        out.total = count
    return out


def sample_file(path: str | os.PathLike, frames: int) -> SampledFrames:
    """Sample ``frames`` frames uniformly from a video file (see the module docstring)."""
    frames = check_frames(frames)
    with _open(path) as video:
        total = _header_frames(video.stream)
        start, duration, period = _duration(video.container, video.stream)
    if total <= 0 and duration:
        last = start + max(0.0, duration - (period or 0.0))
        out = _by_time(path, [float(t) for t in np.linspace(start, last, frames)])
        if not out.indices:
            raise _fail(path, "no frames")
        return out
    if total <= 0:
        total = _count(path)
    if total <= 0:
        raise _fail(path, "no frames")
    wanted = sample_indices(total, frames)
    out, decoded = _by_index(path, wanted)
    if len(out.indices) < len(wanted):
        # The header's frame count was too high: sample again over the frames that exist.
        logger.info("%s: header says %d frames, %d decoded; resampling", path, total, decoded)
        if decoded <= 0:
            raise _fail(path, "no frames")
        total = decoded
        out, _ = _by_index(path, sample_indices(total, frames))
    out.total = total
    return out


def sample_video(video: Any, frames: int) -> SampledFrames:
    """A file path or a uint8 (T, H, W, C) array / tensor -> the sampled frames."""
    if isinstance(video, (str, os.PathLike)):
        return sample_file(video, frames)
    return sample_array(video, frames)


def is_video_file(path: str | os.PathLike) -> bool:
    """Whether PyAV opens the file and finds a video stream (reads the header only)."""
    try:
        video = _open(path)
    except InvalidArgumentError:
        return False
    video.close()
    return True
