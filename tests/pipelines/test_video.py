"""Video frame sampling (fastgen.pipelines.video) and Scorer.score_video.

Test videos are written with PyAV itself: 30 frames of 64x48 where frame i is a flat grey of level
4 + 8 i, so the decoded frames say which index they are despite lossy coding.
"""

from __future__ import annotations

import json

import av
import numpy as np
import pytest
import torch

import fastgen
from fastgen.errors import InvalidArgumentError
from fastgen.pipelines import video as video_mod
from fastgen.pipelines.scorer import Scorer
from fastgen.pipelines.video import sample_indices, sample_video

N_FRAMES, FPS = 30, 30
EXPECTED_8 = [0, 4, 8, 12, 17, 21, 25, 29]  # rint(linspace(0, 29, 8))


def level_frames(n: int = N_FRAMES) -> np.ndarray:
    """(n, 48, 64, 3) uint8, frame i a flat grey of 4 + 8 i."""
    return np.stack([np.full((48, 64, 3), 4 + 8 * i, np.uint8) for i in range(n)])


def write_video(path, codec: str = "mpeg4", frames: np.ndarray | None = None) -> str:
    frames = level_frames() if frames is None else frames
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=FPS)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        if codec == "mpeg4":
            stream.options = {"qscale": "2"}
        for arr in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return str(path)


def decoded_index(frame: np.ndarray) -> int:
    return int(round((float(frame.mean()) - 4) / 8))


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    out = {"mp4": write_video(root / "clip.mp4"),  # the container states the frame count
           "mkv": write_video(root / "clip.mkv")}  # it does not: sampled by timestamps
    codecs = av.codecs_available
    if "libx264" in codecs:
        out["h264"] = write_video(root / "clip264.mkv", "libx264")
    return out


@pytest.fixture(scope="module")
def scorer():
    return Scorer(fastgen.build("tiny", component="classifier", backend="onnxruntime", device="cpu"))


# --- index rule -----------------------------------------------------------------------------------

@pytest.mark.parametrize("total", [1, 2, 7, 30, 31, 1000])
@pytest.mark.parametrize("k", [1, 2, 3, 8, 30, 40])
def test_sample_indices_rule(total, k):
    idx = sample_indices(total, k)
    expected = sorted(set(np.rint(np.linspace(0, total - 1, k)).astype(int).tolist()))
    assert idx == expected
    assert len(idx) == min(total, k)  # distinct frames: min(T, K)
    assert idx[0] == 0 and (k == 1 or idx[-1] == total - 1)


def test_sample_indices_values_and_errors():
    assert sample_indices(30, 8) == EXPECTED_8
    assert sample_indices(5, 8) == [0, 1, 2, 3, 4]
    assert sample_indices(0, 3) == []
    for bad in (0, -2, 1.5, True, "8"):
        with pytest.raises(InvalidArgumentError, match="frames"):
            sample_indices(10, bad)


# --- arrays ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("total, k", [(30, 8), (7, 3), (1, 4), (5, 5)])
def test_sample_array(total, k):
    frames = level_frames(total)
    for video in (frames, torch.from_numpy(frames)):
        s = sample_video(video, k)
        assert s.indices == sample_indices(total, k) and s.total == total
        assert all(decoded_index(f) == i for f, i in zip(s.frames, s.indices))
        assert s.timestamps == [None] * len(s.indices)


@pytest.mark.parametrize("bad", [np.zeros((4, 8, 8, 3), np.float32), np.zeros((8, 8, 3), np.uint8),
                                 np.zeros((0, 8, 8, 3), np.uint8), torch.zeros(4, 3, 8, 8), [1, 2]])
def test_bad_arrays(bad):
    with pytest.raises(InvalidArgumentError, match="video") as exc:
        sample_video(bad, 4)
    assert "\n" not in str(exc.value)


# --- files -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["mp4", "mkv", "h264"])
def test_sample_file_picks_the_right_frames(videos, kind):
    if kind not in videos:
        pytest.skip(f"no {kind} encoder in this PyAV build")
    s = sample_video(videos[kind], 8)
    assert s.indices == EXPECTED_8
    assert [decoded_index(f) for f in s.frames] == EXPECTED_8  # the pixels are those frames
    assert all(f.shape == (48, 64, 3) and f.dtype == np.uint8 for f in s.frames)
    np.testing.assert_allclose(s.timestamps, [i / FPS for i in EXPECTED_8], atol=2e-3)
    if kind == "mp4":
        assert s.total == N_FRAMES


@pytest.mark.parametrize("k", [1, 3, 30, 45])
def test_sample_file_counts(videos, k):
    for kind in ("mp4", "mkv"):
        s = sample_video(videos[kind], k)
        assert s.indices == sample_indices(N_FRAMES, k), kind
        assert [decoded_index(f) for f in s.frames] == s.indices


def test_sample_file_without_packet_index(videos, monkeypatch):
    """Packets that cannot drive seeking: a counting pass, then the same rule over the decoded frames."""
    monkeypatch.setattr(video_mod, "_scan", lambda video, path: None)
    s = sample_video(videos["mkv"], 8)
    assert s.indices == EXPECTED_8 and s.total == N_FRAMES and s.seeks == 0
    assert [decoded_index(f) for f in s.frames] == EXPECTED_8


def test_header_count_too_high(videos, monkeypatch):
    """A header that claims more frames than exist: resampled over the frames that decode."""
    monkeypatch.setattr(video_mod, "_header_frames", lambda stream: 90)
    s = sample_video(videos["mp4"], 8)
    assert s.indices == EXPECTED_8 and s.total == N_FRAMES


def test_unreadable_videos(tmp_path):
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"\x00\x01 definitely not a video " * 20)
    text = tmp_path / "notes.mkv"
    text.write_text("hello")
    for path in (garbage, text, tmp_path / "missing.mp4", tmp_path):
        with pytest.raises(InvalidArgumentError, match="video") as exc:
            sample_video(path, 4)
        assert str(path) in str(exc.value) and "\n" not in str(exc.value)
    audio = tmp_path / "audio.wav"  # a valid file without a video stream
    with av.open(str(audio), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    with pytest.raises(InvalidArgumentError, match="no video stream"):
        sample_video(audio, 4)


# --- score_video --------------------------------------------------------------------------------------

def check_aggregates(vs, labels):
    probs = np.array([[s.probs[k] for k in labels] for s in vs.frames])  # (K, L)
    np.testing.assert_allclose([vs.mean[k] for k in labels], probs.mean(0), rtol=0, atol=1e-12)
    np.testing.assert_array_equal([vs.max[k] for k in labels], probs.max(0))
    assert vs.top[0][0] == max(vs.mean, key=vs.mean.get)
    assert [p for _, p in vs.top] == sorted((p for _, p in vs.top), reverse=True)


def test_score_video_from_array(scorer):
    rng = np.random.default_rng(0)
    clip = rng.integers(0, 256, (13, 40, 56, 3), dtype=np.uint8)
    vs = scorer.score_video(clip, frames=5, batch_size=2)
    assert vs.indices == sample_indices(13, 5) and vs.total_frames == 13
    expected = scorer.score_images(clip[vs.indices])
    np.testing.assert_allclose([s.logits for s in vs.frames], [s.logits for s in expected], atol=1e-6)
    check_aggregates(vs, scorer.labels)


def test_score_video_from_file(scorer, videos):
    for kind in ("mp4", "mkv"):
        vs = scorer.score_video(videos[kind], frames=8)
        assert vs.indices == EXPECTED_8 and len(vs.frames) == 8
        frames = sample_video(videos[kind], 8).frames
        expected = scorer.score_images(frames)
        np.testing.assert_allclose([s.logits for s in vs.frames], [s.logits for s in expected], atol=1e-6)
        check_aggregates(vs, scorer.labels)
        d = json.loads(json.dumps(vs.to_dict()))
        assert [f["index"] for f in d["frames"]] == EXPECTED_8
        assert set(d["mean"]) == set(scorer.labels) and d["top"][0]["label"] == vs.top[0][0]


def test_score_video_multi_label(scorer):
    ms = Scorer(scorer.engine, multi_label=True)
    vs = ms.score_video(level_frames(10), frames=4)
    check_aggregates(vs, ms.labels)
    logits = torch.tensor([s.logits for s in vs.frames], dtype=torch.float64)
    np.testing.assert_allclose([[s.probs[k] for k in ms.labels] for s in vs.frames], torch.sigmoid(logits), atol=1e-6)


def test_score_video_errors(scorer, tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"nope")
    with pytest.raises(InvalidArgumentError, match="bad.mp4"):
        scorer.score_video(bad)
    with pytest.raises(InvalidArgumentError, match="frames"):
        scorer.score_video(level_frames(4), frames=0)
