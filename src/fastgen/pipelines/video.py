"""Frame sampling of videos for per-frame classification.

Which frames (the same for every way of decoding):

- uniform, ``frames=K`` (the default, K = 8): when the container states a frame count (mp4, avi...),
  frame indices ``rint(linspace(0, T - 1, K))`` over the ``T`` frames in display order (fewer than
  ``K`` distinct frames when ``T < K``); when it does not (mkv, webm...), the frames nearest to the
  times ``linspace(t_first, t_last, K)`` (ties: the earlier frame), which on a constant-rate video
  are the frames the index rule picks;
- at a rate, ``fps=f``: the frames nearest to ``t_first + j / f`` for ``j = 0, 1...`` up to the last
  frame's time; more than ``frames`` of them (the cap, default 256) become ``frames`` targets
  spread uniformly in time instead, so a long video is still covered end to end.

``T``, ``t_first`` and ``t_last`` come from the packets (below), not from header fields: a clip
whose header states a wrong duration or frame count is sampled over the frames it really has.

How they are decoded:

1. The packets are read without decoding (a 2-minute 30 fps clip: about 30 ms, against 250 ms to
   decode it at 256x144 and 1.5 s at 640x360): their presentation timestamps, sorted, are the frames
   in display order (frame ``i`` is the one a full sequential decode outputs ``i``-th), and their
   keyframe flags the points a decode may start from.
2. For each chosen frame, in order: seek to the keyframe at or before it
   (``container.seek(pts, stream=..., backward=True, any_frame=False)``) and decode forward to its
   exact timestamp, unless that keyframe is fewer than ``SEEK_MIN_SKIP`` frames past the last frame
   decoded (a target in the group being decoded, or just after it): then decoding on costs no more
   than seeking, and the decoder goes on. Only chosen frames are converted to RGB.
3. The decoder runs threaded (``stream.thread_type = "AUTO"``: frame and slice threads; frames come
   out in the same order and with the same pixels).

A group decoded from its keyframe gives bit-identical frames to a full decode (it references no
earlier frame; the leading frames of an open GOP, shown before their keyframe, are never taken from
it). Every decoded frame is checked against the packet index: after the first frame of a seek, each
must carry the index's next timestamp (the stretches a seek skips are trusted to the index). Packets
without timestamps, duplicated timestamps, a stream not starting on a keyframe, a seek that does not
land on a known keyframe, or a decoder that skips, adds or withholds a frame fall back to sequential
decoding (a counting pass, then a pass up to the last chosen frame, by decode order), which any
file decodes by.

Files are opened as images are (:func:`fastgen.pipelines.classifier_images.open_regular`): regular
files only (a FIFO, device, socket or directory is refused before anything is read), and PyAV reads
the very descriptor that was checked. Frames larger than ``PIL.Image.MAX_IMAGE_PIXELS`` are refused
before they are converted, as images are.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import numpy as np
import torch

from fastgen.errors import InvalidArgumentError
from fastgen.pipelines.classifier_images import check_pixels, open_regular

logger = logging.getLogger(__name__)

#: Extensions treated as videos without probing (the CLI also probes unknown ones).
VIDEO_EXTENSIONS = frozenset({".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts",
                              ".m2ts", ".wmv", ".flv", ".3gp", ".ogv"})

#: Frames a uniform sample takes when ``frames`` is not given.
DEFAULT_FRAMES = 8
#: Most frames an ``fps`` sample takes when ``frames`` is not given (4 minutes at 1 frame per second).
DEFAULT_FPS_CAP = 256
#: Highest sampling rate accepted (frames per second).
MAX_FPS = 1000.0
#: A seek is made only when it skips at least this many frames of decoding: a seek flushes the
#: decoder, whose frame threads then refill before the next frame comes out, which costs about
#: that many frames of decoding.
SEEK_MIN_SKIP = 8


@dataclass
class SampledFrames:
    """Frames chosen from a video, in order."""

    frames: list[np.ndarray]
    """RGB frames, each (height, width, 3) uint8."""
    indices: list[int]
    """Position of each frame in the video (0-based, display order = a sequential decode's order)."""
    timestamps: list[float | None] = field(default_factory=list)
    """Presentation time of each frame in seconds (None for arrays or streams without timestamps)."""
    total: int | None = None
    """Frame count of the video when known."""
    decoded: int = 0
    """Frames the decoder output to get these (0 for arrays): the decode work done."""
    seeks: int = 0
    """Seeks made, the rewind after the packet scan included (0: the sequential fallback, or an array)."""


#: Most frames sampled from one video: they are all held decoded at once (10,000 at 224x224 are 1.5 GB);
#: score a longer stretch in several calls.
MAX_FRAMES = 10_000


def check_frames(frames: Any) -> int:
    if isinstance(frames, bool) or not isinstance(frames, (int, np.integer)) or not 1 <= frames <= MAX_FRAMES:
        raise InvalidArgumentError("frames", frames, f"integers from 1 to {MAX_FRAMES}")
    return int(frames)


def check_fps(fps: Any) -> float:
    """A sampling rate: a finite number of frames per second in (0, MAX_FPS]."""
    if isinstance(fps, bool) or not isinstance(fps, (int, float, np.integer, np.floating)) \
            or not math.isfinite(fps) or not 0 < fps <= MAX_FPS:
        raise InvalidArgumentError("fps", fps, f"frames per second, above 0 and at most {MAX_FPS:g}")
    return float(fps)


def _request(frames: Any, fps: Any) -> tuple[int, float | None]:
    """(frame count or cap, rate or None), checked; defaults as the module docstring says."""
    rate = None if fps is None else check_fps(fps)
    if frames is None:
        return (DEFAULT_FRAMES if rate is None else DEFAULT_FPS_CAP), rate
    return check_frames(frames), rate


def sample_indices(total: int, frames: int) -> list[int]:
    """``rint(linspace(0, total - 1, frames))``, deduplicated (sorted)."""
    frames = check_frames(frames)
    if total < 1:
        return []
    idx = np.rint(np.linspace(0, total - 1, frames)).astype(np.int64)
    return sorted({int(i) for i in idx})


def nearest_indices(times: np.ndarray, targets: np.ndarray) -> list[int]:
    """For each target time, the index of the nearest of the sorted ``times`` (ties, within a
    nanosecond of rounding: the earlier frame); deduplicated, sorted."""
    right = np.clip(np.searchsorted(times, targets, side="left"), 1, max(len(times) - 1, 1))
    left = right - 1
    if len(times) == 1:
        return [0]
    pick = np.where(targets - times[left] <= times[right] - targets + 1e-9, left, right)
    return sorted({int(i) for i in pick})


def choose(total: int, times: np.ndarray | None, frames: int, fps: float | None, by_time: bool) -> list[int]:
    """The frame indices to take from ``total`` frames shown at ``times`` (seconds, sorted; None when
    unknown: the index rule), by the rules of the module docstring."""
    if total < 1:
        return []
    if times is None or (fps is None and not by_time):
        return sample_indices(total, frames)
    first, last = float(times[0]), float(times[-1])
    if fps is not None:
        count = math.floor((last - first) * fps + 1e-6) + 1  # the epsilon: 2.9999999 periods are 3
        if count <= frames:
            return nearest_indices(times, first + np.arange(count) / fps)
    return nearest_indices(times, np.linspace(first, last, frames))


def sample_array(video: Any, frames: int | None = None, *, fps: float | None = None) -> SampledFrames:
    """Sample a (T, H, W, C) uint8 numpy array or torch tensor (C in 1, 3, 4) uniformly."""
    frames, rate = _request(frames, fps)
    if rate is not None:
        raise InvalidArgumentError("fps", fps, reason="an array has no timestamps; pass frames= (or a video file)")
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


class _Fallback(Exception):
    """Seeking cannot be trusted on this file: decode it sequentially (the message says why)."""


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


def _header_frames(stream: Any) -> int:
    """The frame count the container states (0: unknown)."""
    return int(stream.frames or 0)


# --- the packet index and seeking ------------------------------------------------------------------

@dataclass(frozen=True)
class _Index:
    """What the packets say about the frames, without decoding any."""

    pts: np.ndarray
    """(N,) int64: frame i's presentation timestamp (stream time base), sorted: display order."""
    keys: np.ndarray
    """(M,) int64: sorted timestamps of the keyframes; ``keys[0] == pts[0]``."""
    time_base: Fraction

    @property
    def times(self) -> np.ndarray:
        return self.pts.astype(np.float64) * float(self.time_base)  # (N,) seconds


def _scan(video: _Video, path: Any) -> _Index | None:
    """The packet index of the video stream (None when it cannot drive seeking; see the module docstring)."""
    pts: list[int] = []
    keys: list[int] = []
    try:
        for packet in video.container.demux(video.stream):
            if packet.size == 0 or getattr(packet, "is_discard", False):
                continue  # the end-of-stream packet; samples an edit list hides (never output)
            if packet.pts is None:
                return None
            pts.append(int(packet.pts))
            if packet.is_keyframe:
                keys.append(int(packet.pts))
    except Exception as exc:  # a damaged container: refused like any undecodable file
        raise _fail(path, exc) from None
    order = np.sort(np.asarray(pts, dtype=np.int64))
    if not len(order) or not keys or video.stream.time_base is None:
        return None
    key_arr = np.unique(np.asarray(keys, dtype=np.int64))
    if len(np.unique(order)) != len(order) or key_arr[0] != order[0]:
        return None
    return _Index(order, key_arr, Fraction(video.stream.time_base))


class _SeekingDecoder:
    """Decodes chosen frames of an indexed video, seeking to keyframes where that saves decoding."""

    def __init__(self, video: _Video, path: Any, index: _Index, seek: bool) -> None:
        self.video, self.path, self.index, self.seek = video, path, index, seek
        pts = index.pts.tolist()
        self.following = dict(zip(pts, pts[1:] + [None]))  # timestamp -> the next frame's (None: the last)
        self.frames: Any = None  # the decoded-frame iterator from the current read position
        self.pos: int | None = None  # timestamp of the last frame decoded since the last seek
        self.decoded = self.seeks = 0

    def _skip(self, key: int) -> int:
        """Frames between the last decoded one and keyframe ``key``: what a seek there saves."""
        if self.pos is None:  # nothing decoded since the last seek: the read position is that keyframe
            return 0
        pts = self.index.pts
        return int(np.searchsorted(pts, key, "left") - np.searchsorted(pts, self.pos, "right"))

    def _seek_to(self, k: int) -> None:
        """Seek to keyframe ``k`` (or an earlier one, should the demuxer overshoot) and read on from it."""
        container, stream, keys = self.video.container, self.video.stream, self.index.keys
        while True:
            try:
                container.seek(int(keys[k]), stream=stream, backward=True, any_frame=False)  # flushes the decoder
                packets = container.demux(stream)
                first = next((p for p in packets if p.size), None)
            except Exception as exc:  # a container that cannot seek, or not there: the sequential way may
                raise _Fallback(f"seek failed ({' '.join(str(exc).split())})") from None
            self.seeks += 1
            if first is None or not first.is_keyframe or first.pts is None or int(first.pts) not in self.following:
                raise _Fallback("a seek did not land on a keyframe")
            if int(first.pts) <= keys[k]:
                break
            if k == 0:
                raise _Fallback("a seek overshoots the first keyframe")
            k -= 1  # a demuxer that seeks by decode time may land one group late: start a group earlier
        self.frames = (frame for packet in itertools.chain([first], packets) for frame in packet.decode())
        self.pos = None

    def take(self, wanted: list[int]) -> SampledFrames:
        index = self.index
        out = SampledFrames([], [], [], len(index.pts))
        for i in wanted:
            target = int(index.pts[i])
            k = int(np.searchsorted(index.keys, target, "right")) - 1  # its keyframe: keys[0] == pts[0] <= target
            if self.frames is None:  # after the packet scan the container is at its end: always seek first
                self._seek_to(k if self.seek else 0)
            elif self.seek and self._skip(int(index.keys[k])) >= SEEK_MIN_SKIP:
                self._seek_to(k)
            frame = self._decode_to(target)
            out.frames.append(_rgb(frame, self.path))
            out.indices.append(i)
            out.timestamps.append(frame.time)
        out.decoded, out.seeks = self.decoded, self.seeks
        return out

    def _decode_to(self, target: int) -> Any:
        try:
            for frame in self.frames:
                self.decoded += 1
                pts = frame.pts
                # After the first frame of a seek, each frame must be the index's next one: a frame the
                # decoder skipped (or one it made up) would shift every index after it.
                if pts is None or pts not in self.following or (self.pos is not None and self.following[self.pos] != pts):
                    raise _Fallback(f"a decoded frame's timestamp ({pts}) is not the packets' next one")
                self.pos = int(pts)
                if pts == target:
                    return frame
                if pts > target:
                    break
        except (_Fallback, InvalidArgumentError):
            raise
        except Exception as exc:
            raise _fail(self.path, exc) from None
        raise _Fallback(f"the frame at timestamp {target} never came out of the decoder")


# --- sequential decoding (the fallback) ------------------------------------------------------------

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


def _sequential(path: Any, frames: int, fps: float | None, by_time: bool) -> SampledFrames:
    """A counting pass (frame times), then a pass up to the last chosen frame."""
    times = [frame.time for frame in _decode(path)]
    if not times:
        raise _fail(path, "no frames")
    known = None if any(t is None for t in times) else np.asarray(times, dtype=np.float64)
    if fps is not None and known is None:
        raise InvalidArgumentError("fps", fps, reason=f"{os.fspath(path)} has frames without timestamps; "
                                   "sample it with frames= instead")
    out, decoded = _by_index(path, choose(len(times), known, frames, fps, by_time))
    out.total, out.decoded = len(times), len(times) + decoded
    return out


# --- public -----------------------------------------------------------------------------------------

def sample_file(path: str | os.PathLike, frames: int | None = None, *, fps: float | None = None,
                seek: bool = True) -> SampledFrames:
    """Sample a video file: ``frames`` frames uniformly (default 8), or ``fps`` frames per second
    (at most ``frames``, default 256); see the module docstring. ``seek=False`` decodes from the start
    up to the last chosen frame instead of seeking (the same frames; for comparisons)."""
    frames, rate = _request(frames, fps)
    with _open(path) as video:
        by_time = rate is None and _header_frames(video.stream) <= 0
        index = _scan(video, path)
        if index is not None:
            try:
                wanted = choose(len(index.pts), index.times, frames, rate, by_time)
                return _SeekingDecoder(video, path, index, seek).take(wanted)
            except _Fallback as why:
                logger.info("%s: %s; decoding sequentially", os.fspath(path), why)
        else:
            logger.info("%s: packets without usable timestamps or keyframes; decoding sequentially",
                        os.fspath(path))
    return _sequential(path, frames, rate, by_time)


def sample_video(video: Any, frames: int | None = None, *, fps: float | None = None,
                 seek: bool = True) -> SampledFrames:
    """A file path or a uint8 (T, H, W, C) array / tensor -> the sampled frames (``fps``: files only)."""
    if isinstance(video, (str, os.PathLike)):
        return sample_file(video, frames, fps=fps, seek=seek)
    return sample_array(video, frames, fps=fps)


def is_video_file(path: str | os.PathLike) -> bool:
    """Whether PyAV opens the file and finds a video stream (reads the header only)."""
    try:
        video = _open(path)
    except InvalidArgumentError:
        return False
    video.close()
    return True
