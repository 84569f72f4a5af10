"""Sampling videos by seeking (fastgen.pipelines.video) against a full sequential decode.

Every clip is written here with PyAV (small frames, so the whole set stays fast): h264 mp4 with a long
GOP (a keyframe every 250 frames; 2 minutes at 30 fps) and a short one, h264 mkv and VP9 webm (the
container states no frame count), variable frame rate (mp4 and mkv), mkv files whose duration header is
wrong (too short, too long), 1-, 2- and 3-frame clips, and a raw h264 stream (no timestamps at all: the
sequential fallback). The reference is an independent plain PyAV loop that decodes every frame; the
expected frames follow the documented rules, computed here by brute force over the reference's frame
times. Sampled frames must equal the reference's pixel for pixel, and ``Scorer.score_video`` must equal
scoring those reference frames as images.
"""

from __future__ import annotations

import json
import math
import struct
from fractions import Fraction

import av
import numpy as np
import pytest
from click.testing import CliRunner

import fastgen
from fastgen.errors import InvalidArgumentError
from fastgen.pipelines import video as video_mod
from fastgen.pipelines.scorer import Scorer
from fastgen.pipelines.video import DEFAULT_FPS_CAP, sample_video

SIZE = 32  # even: yuv420p


def clip_frames(n: int) -> list[np.ndarray]:
    """(SIZE, SIZE, 3) uint8 frames that all differ: a noise texture moving right, a block of level 37 i."""
    base = np.random.default_rng(1).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    out = []
    for i in range(n):
        a = np.roll(base, i, axis=1)
        a[:8, :8] = (37 * i) % 256
        out.append(a)
    return out


def write(path, n: int, *, codec: str = "libx264", gop: int = 250, pts_ms=None, fmt: str | None = None) -> str:
    with av.open(str(path), "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=30)
        stream.width = stream.height = SIZE
        stream.pix_fmt = "yuv420p"
        if codec == "libx264":  # B-frames: decode order differs from display order
            stream.options = {"preset": "veryfast", "bframes": "2", "keyint": str(gop), "min-keyint": str(gop)}
        stream.codec_context.gop_size = gop
        if pts_ms is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
        for i, arr in enumerate(clip_frames(n)):
            frame = av.VideoFrame.from_ndarray(arr, format="rgb24")
            if pts_ms is not None:
                frame.pts, frame.time_base = int(pts_ms[i]), Fraction(1, 1000)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return str(path)


def with_duration(src: str, dst, seconds: float) -> str:
    """A copy of an mkv whose Segment Duration element (id 0x4489, an 8-byte float in ms) says ``seconds``."""
    data = bytearray(open(src, "rb").read())
    at = data.find(b"\x44\x89\x88")
    assert at > 0, "no 8-byte Duration element"
    data[at + 3:at + 11] = struct.pack(">d", seconds * 1000.0)
    dst.write_bytes(bytes(data))
    return str(dst)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    if "libx264" not in av.codecs_available:
        pytest.skip("no libx264 encoder in this PyAV build")
    root = tmp_path_factory.mktemp("seek-clips")
    vfr = np.cumsum(np.random.default_rng(0).integers(10, 90, 60))
    vfr -= vfr[0]  # 60 frames 10 to 90 ms apart
    out = {"long_gop.mp4": write(root / "long_gop.mp4", 3600, gop=250),  # 2 minutes at 30 fps
           "short_gop.mp4": write(root / "short_gop.mp4", 90, gop=10),
           "h264.mkv": write(root / "h264.mkv", 90, gop=30),
           "vfr.mp4": write(root / "vfr.mp4", 60, gop=12, pts_ms=vfr),
           "vfr.mkv": write(root / "vfr.mkv", 60, gop=12, pts_ms=vfr),
           "one.mp4": write(root / "one.mp4", 1),
           "two.mkv": write(root / "two.mkv", 2),
           "three.mp4": write(root / "three.mp4", 3),
           "raw.h264": write(root / "raw.h264", 40, gop=10, fmt="h264")}
    out["short.mkv"] = with_duration(out["h264.mkv"], root / "short.mkv", 1.0)  # 3 s of frames
    out["long.mkv"] = with_duration(out["h264.mkv"], root / "long.mkv", 30.0)
    if "libvpx-vp9" in av.codecs_available:
        out["vp9.webm"] = write(root / "vp9.webm", 40, codec="libvpx-vp9", gop=12)
    return out


_REFS: dict[str, tuple[list[float | None], list[np.ndarray]]] = {}


def reference(path: str) -> tuple[list[float | None], list[np.ndarray]]:
    """(frame times, RGB frames) of every frame, from a plain sequential PyAV decode (no threads, no seeks)."""
    if path not in _REFS:
        with av.open(path) as container:
            times, rgb = [], []
            for frame in container.decode(video=0):  # converted at once: holding 3600 decoded frames is slow
                times.append(frame.time)
                rgb.append(frame.to_ndarray(format="rgb24"))
            _REFS[path] = times, rgb
    return _REFS[path]


def expected(path: str, frames: int | None = None, fps: float | None = None) -> list[int]:
    """The documented rule, by brute force over the reference's frame times."""
    times, _ = reference(path)
    n = len(times)
    by_time = fps is not None or path.endswith((".mkv", ".webm"))
    if not by_time or times[0] is None:
        k = frames or 8
        return sorted({int(np.rint(x)) for x in np.linspace(0, n - 1, k)})
    cap = frames or DEFAULT_FPS_CAP
    first, last = times[0], times[-1]
    if fps is not None and math.floor((last - first) * fps + 1e-6) + 1 <= cap:
        targets = [first + j / fps for j in range(math.floor((last - first) * fps + 1e-6) + 1)]
    else:
        targets = list(np.linspace(first, last, frames or (8 if fps is None else cap)))
    dist = np.abs(np.asarray(times)[None, :] - np.asarray(targets)[:, None])  # (targets, frames)
    nearest = dist <= dist.min(axis=1, keepdims=True) + 1e-9  # ties (within 1 ns of rounding): the earlier
    return sorted({int(row.argmax()) for row in nearest})


CLIPS = ["long_gop.mp4", "short_gop.mp4", "h264.mkv", "vp9.webm", "vfr.mp4", "vfr.mkv", "short.mkv", "long.mkv",
         "one.mp4", "two.mkv", "three.mp4", "raw.h264"]
REQUESTS = [{"frames": 1}, {"frames": 3}, {}, {"frames": 40}, {"fps": 1}, {"fps": 2.5}, {"fps": 12},
            {"fps": 30, "frames": 5}]


@pytest.mark.parametrize("name", CLIPS)
def test_same_frames_as_a_full_decode(clips, name):
    if name not in clips:
        pytest.skip(f"{name}: no encoder for it in this PyAV build")
    path = clips[name]
    times, ref = reference(path)
    for request in REQUESTS:
        if name == "raw.h264" and "fps" in request:
            with pytest.raises(InvalidArgumentError, match="fps.*timestamps"):
                sample_video(path, **request)
            continue
        want = expected(path, **request)
        for seek in (True, False) if name != "long_gop.mp4" or request in ({}, {"fps": 1}) else (True,):
            s = sample_video(path, **request, seek=seek)
            assert s.indices == want, (request, seek)
            assert s.total == len(ref)
            for frame, i in zip(s.frames, s.indices):
                np.testing.assert_array_equal(frame, ref[i], err_msg=f"{name} {request} seek={seek} frame {i}")
            assert s.timestamps == [times[i] for i in want]
            assert len(want) <= request.get("frames", 8 if "fps" not in request else DEFAULT_FPS_CAP)


def test_rules_on_known_clips(clips):
    assert expected(clips["long_gop.mp4"]) == [0, 514, 1028, 1542, 2057, 2571, 3085, 3599]  # rint(linspace)
    assert expected(clips["long_gop.mp4"], fps=1) == list(range(0, 3600, 30))  # 120 frames, one a second
    assert expected(clips["one.mp4"], fps=5) == [0] and expected(clips["two.mkv"], frames=8) == [0, 1]
    assert len(reference(clips["short.mkv"])[0]) == 90  # the headers lie, the frames do not
    for name in ("short.mkv", "long.mkv"):
        with av.open(clips[name]) as container:
            assert container.duration / av.time_base in (1.0, 30.0)
        assert sample_video(clips[name], 8).indices == expected(clips["h264.mkv"], 8)


def test_seeks_on_a_long_gop_and_decodes_on_within_one(clips):
    """Behaviour, not timing: 8 frames of the 2-minute clip decode a small part of it; targets closer
    than the keyframe interval are reached by decoding on, with no seek."""
    far = sample_video(clips["long_gop.mp4"], 8)
    assert far.seeks >= 7 and far.decoded < 3600 // 4
    near = sample_video(clips["short_gop.mp4"], fps=10)  # a target every 3 frames, a keyframe every 10
    assert near.seeks == 1 and near.decoded == near.indices[-1] + 1
    full = sample_video(clips["long_gop.mp4"], 8, seek=False)
    assert full.seeks == 1 and full.decoded == 3600


def test_untrustworthy_indexes_still_give_the_reference(clips, monkeypatch):
    """Keyframe flags that lie (every frame claimed a keyframe: seeks land earlier) and a frame the decoder
    never gives (a phantom timestamp: the sequential fallback) both still give the reference's frames."""
    path = clips["h264.mkv"]
    _, ref = reference(path)
    real = video_mod._scan

    def all_keys(video, p):
        index = real(video, p)
        return video_mod._Index(index.pts, index.pts.copy(), index.time_base)

    monkeypatch.setattr(video_mod, "_scan", all_keys)
    s = sample_video(path, 8)
    assert s.indices == expected(path, 8) and all(np.array_equal(f, ref[i]) for f, i in zip(s.frames, s.indices))

    def phantom(video, p):
        index = real(video, p)
        pts = np.sort(np.append(index.pts, index.pts[40] + 1))
        return video_mod._Index(pts, index.keys, index.time_base)

    monkeypatch.setattr(video_mod, "_scan", phantom)
    s = sample_video(path, fps=3)
    assert s.indices == expected(path, fps=3) and s.total == 90
    assert all(np.array_equal(f, ref[i]) for f, i in zip(s.frames, s.indices))


@pytest.mark.parametrize("fps", [0, -1, float("nan"), float("inf"), 1001, True, "2"])
def test_bad_fps_is_one_line(clips, fps):
    for video in (clips["one.mp4"], np.zeros((4, 8, 8, 3), np.uint8)):
        with pytest.raises(InvalidArgumentError, match="fps") as exc:
            sample_video(video, fps=fps)
        assert "\n" not in str(exc.value)
    with pytest.raises(InvalidArgumentError, match="fps.*no timestamps"):
        sample_video(np.zeros((4, 8, 8, 3), np.uint8), fps=2)


# --- Scorer.score_video ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def scorer():
    return Scorer(fastgen.build("tiny", component="classifier", backend="onnxruntime", device="cpu"))


@pytest.mark.parametrize("name, request_", [("long_gop.mp4", {"frames": 8}), ("long_gop.mp4", {"fps": 1}),
                                            ("vfr.mkv", {"frames": 8}), ("vp9.webm", {"fps": 4}),
                                            ("one.mp4", {}), ("long.mkv", {"frames": 5})])
def test_score_video_equals_scoring_the_reference_frames(clips, scorer, name, request_):
    if name not in clips:
        pytest.skip(f"{name}: no encoder for it in this PyAV build")
    path = clips[name]
    _, ref = reference(path)
    want = expected(path, **request_)
    vs = scorer.score_video(path, **request_, batch_size=4)
    assert vs.indices == want and vs.total_frames == len(ref)
    exp = scorer.score_images([ref[i] for i in want], batch_size=4)
    np.testing.assert_allclose([s.logits for s in vs.frames], [s.logits for s in exp], rtol=0, atol=1e-6)
    probs = np.array([[s.probs[k] for k in scorer.labels] for s in exp])  # (K, num_labels)
    np.testing.assert_allclose([vs.mean[k] for k in scorer.labels], probs.mean(0), atol=1e-6)
    np.testing.assert_allclose([vs.max[k] for k in scorer.labels], probs.max(0), atol=1e-6)
    assert vs.decode_ms > 0 and vs.inference_ms > 0 and vs.decoded_frames >= len(want)
    d = json.loads(json.dumps(vs.to_dict()))
    assert {"decode_ms", "inference_ms", "decoded_frames"} <= set(d) and [f["index"] for f in d["frames"]] == want


def test_score_video_arrays_and_errors(scorer, clips):
    clip = np.stack(clip_frames(13))
    vs = scorer.score_video(clip, frames=5)
    assert vs.indices == [0, 3, 6, 9, 12] and vs.decoded_frames == 0 and vs.inference_ms > 0
    with pytest.raises(InvalidArgumentError, match="fps"):
        scorer.score_video(clip, fps=2)
    with pytest.raises(InvalidArgumentError, match="fps"):
        scorer.score_video(clips["one.mp4"], fps=0)


def test_aggregate_video_is_the_runtime_path(scorer, clips):
    """Sample, score the frames through the public batch steps, aggregate: the same as score_video."""
    path = clips["vfr.mp4"]
    sampled = sample_video(path, 6)
    prep = scorer.image_preprocessor
    scores = scorer.scores(scorer.logits(prep.feeds(prep.to_uint8(sampled.frames))))
    vs, direct = scorer.aggregate_video(sampled, scores), scorer.score_video(path, frames=6)
    assert vs.indices == direct.indices and vs.decoded_frames == direct.decoded_frames
    for label in scorer.labels:
        assert vs.mean[label] == pytest.approx(direct.mean[label], abs=1e-6)
        assert vs.max[label] == pytest.approx(direct.max[label], abs=1e-6)
    with pytest.raises(InvalidArgumentError, match="scores"):
        scorer.aggregate_video(sampled, scores[:-1])


# --- fastgen score --fps / --frames -----------------------------------------------------------------------

def test_cli_json_reports_decode_and_inference(clips, scorer):
    from fastgen.cli.score import score

    path = clips["long_gop.mp4"]
    result = CliRunner().invoke(score, ["--model", "tiny", "--device", "cpu", "--json", "--fps", "0.5",
                                        "--frames", "20", path])
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.stdout)["results"]
    assert row["kind"] == "video" and row["decode_ms"] > 0 and row["inference_ms"] > 0
    want = expected(path, frames=20, fps=0.5)
    assert [f["index"] for f in row["frames"]] == want and len(want) == 20  # 60 targets capped to 20
    vs = scorer.score_video(path, frames=20, fps=0.5)
    np.testing.assert_allclose([row["mean"][k] for k in scorer.labels], [vs.mean[k] for k in scorer.labels],
                               atol=1e-6)
    table = CliRunner().invoke(score, ["--model", "tiny", "--device", "cpu", "--frames", "3", path])
    assert table.exit_code == 0 and "decode" in table.output and "inference" in table.output
    for bad in ("0", "-1", "inf", "x"):
        result = CliRunner().invoke(score, ["--model", "tiny", "--device", "cpu", "--fps", bad, path])
        assert result.exit_code == 2 and "--fps" in result.output
