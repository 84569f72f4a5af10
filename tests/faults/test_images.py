"""Issue 15 (hardening): images and videos, probed as a hostile user would: 16-bit, float and odd
images (modes, EXIF, palettes, animations, empty and extreme sizes), non-regular files (FIFOs, sockets,
devices, directories), decompression bombs, broken image and video files, wrong input kinds, and the
cap on frames sampled from one video.

Every hostile input is generated here (tmp_path, no binary fixtures). The scorer is a small fake
(``conftest.py``: the real spec's shapes, arithmetic instead of a model), so the file runs in seconds;
any call that could hang runs in a thread with a hard timeout (``hangs.within``), so a regression fails
instead of hanging CI. NaN, quantization, seeds and prompts are in ``test_numerics.py``.
"""

from __future__ import annotations

import io
import os
import socket
import struct
import time
import zlib

import numpy as np
import pytest
from hangs import within
from PIL import Image
from pipeline_fakes import HANG_S, refused

from fastgen.errors import InvalidArgumentError
from fastgen.pipelines import classifier_images as ci
from fastgen.pipelines import vae_images

# --- 1. 16-bit and float images are scaled by their mode's range -----------------------------------

RAMP = (np.arange(32 * 32) % 256).reshape(32, 32)  # the 8-bit level every pixel must come out as


def _wide_image(mode: str) -> Image.Image:
    if mode == "F":
        return Image.fromarray((RAMP / 255.0).astype(np.float32))
    dtype = {"I;16B": ">u2", "I": "<i4"}.get(mode, "<u2")
    im = Image.new(mode, (32, 32))
    im.frombytes((RAMP * 257).astype(dtype).tobytes())  # 257 * k is k in 16 bits, exactly
    return im


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I;16L", "I", "F"])
def test_16_bit_and_float_images_are_scaled_not_clipped(tmp_path, mode):
    im, want = _wide_image(mode), RAMP.astype(np.uint8)
    np.testing.assert_array_equal(ci.image_to_uint8(im, (32, 32), channels=1)[:, :, 0], want)
    rgb = np.repeat(want[:, :, None], 3, axis=2)
    np.testing.assert_array_equal(ci.image_to_uint8(im, (32, 32)), rgb)
    np.testing.assert_array_equal(np.asarray(vae_images.load_image(im)), rgb)  # image-to-image's input
    if mode in ("I;16", "I;16B"):  # from files too (PNG keeps I;16, TIFF I;16B)
        path = tmp_path / ("x.png" if mode == "I;16" else "x.tiff")
        im.save(path)
        assert Image.open(path).mode == mode
        np.testing.assert_array_equal(ci.image_to_uint8(path, (32, 32))[:, :, 0], want)
        np.testing.assert_array_equal(np.asarray(vae_images.load_image(str(path))), rgb)


def _png(arr: np.ndarray, color_type: int, width: int | None = None, height: int | None = None) -> bytes:
    """A 16-bit PNG written byte by byte (PIL writes no 16-bit RGB): header size may lie (bombs)."""
    h, w = arr.shape[:2]

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        return struct.pack(">I", len(data)) + kind + data + crc

    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))
    header = struct.pack(">IIBBBBB", width or w, height or h, 16, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
            + chunk(b"IEND", b""))


def test_other_modes_exif_and_odd_sizes(tmp_path):
    for color_type, channels in ((2, 3), (6, 4), (4, 2)):  # 16-bit RGB, RGBA, LA: PIL opens them as RGB(A)
        (tmp_path / "c16.png").write_bytes(_png(np.stack([RAMP * 257] * channels, axis=2), color_type))
        np.testing.assert_array_equal(ci.image_to_uint8(tmp_path / "c16.png", (32, 32))[:, :, 0], RAMP)
    red_blue = np.zeros((16, 16, 3), np.uint8)
    red_blue[:, :8, 0], red_blue[:, 8:, 2] = 255, 255  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 3  # orientation: rotated 180 degrees
    Image.fromarray(red_blue).save(tmp_path / "rot.png", exif=exif)
    upright = ci.image_to_uint8(tmp_path / "rot.png", (16, 16))  # as a viewer shows it
    assert upright[0, 0].tolist() == [0, 0, 255] and upright[0, -1].tolist() == [255, 0, 0]
    assert np.asarray(vae_images.load_image(str(tmp_path / "rot.png")))[0, 0].tolist() == [0, 0, 255]
    Image.fromarray(red_blue).save(tmp_path / "junk.png", exif=b"garbage")  # unreadable EXIF, readable pixels
    assert ci.image_to_uint8(tmp_path / "junk.png", (16, 16))[0, 0].tolist() == [255, 0, 0]
    pal = Image.new("P", (8, 8))
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    pal.save(tmp_path / "p.png", transparency=0)
    Image.new("LA", (8, 8), (100, 50)).save(tmp_path / "la.png")
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "c.jpg")
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 255, 0))]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    frames[0].save(tmp_path / "a.webp", save_all=True, append_images=frames[1:], lossless=True)
    for name, want in (("p.png", [255, 0, 0]), ("la.png", [100] * 3), ("c.jpg", [255, 0, 0]),
                       ("a.gif", [255, 0, 0]), ("a.webp", [255, 0, 0])):  # animations: the first frame
        got = ci.image_to_uint8(tmp_path / name, (4, 4))
        assert np.abs(got.astype(int) - want).max() <= 2, name
    one = Image.new("RGB", (1, 1), (9, 9, 9))
    assert (ci.image_to_uint8(one, (16, 16), center_crop=True) == 9).all()
    # A 100000x1 strip, 92 bytes as a PNG: centre-cropping must not resize it to 6.4 million x 64 first.
    Image.new("L", (100000, 1), 200).save(tmp_path / "strip.png")
    start = time.perf_counter()
    strip = within(HANG_S, lambda: ci.image_to_uint8(tmp_path / "strip.png", (64, 64), center_crop=True))
    assert (strip == 200).all() and time.perf_counter() - start < 3.0
    for empty in (Image.new("RGB", (0, 0)), Image.new("RGB", (0, 5))):
        for crop in (False, True):
            refused(lambda e=empty, c=crop: ci.image_to_uint8(e, (16, 16), center_crop=c), "pixels")


# --- 2. non-regular files, bombs, broken files -----------------------------------------------------

def _special(tmp_path, kind: str):
    """A path of ``kind`` and a function that unblocks a reader stuck on it."""
    if kind == "fifo":
        path = tmp_path / "pipe.png"
        os.mkfifo(path)
        return str(path), lambda: os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
    if kind == "directory":
        (tmp_path / "dir.png").mkdir()
        return str(tmp_path / "dir.png"), None
    if kind == "socket":
        path = tmp_path / "s.png"
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(path))
        return str(path), sock.close
    return "/dev/zero", None


@pytest.mark.parametrize("kind", ["fifo", "directory", "socket", "device"])
def test_non_regular_files_are_refused_before_opening(tmp_path, kind, image_scorer):
    from fastgen.pipelines.video import is_video_file, sample_video

    path, unblock = _special(tmp_path, kind)
    for call in (lambda: ci.image_to_uint8(path, (8, 8)), lambda: image_scorer.score_images([path]),
                 lambda: vae_images.load_image(path), lambda: sample_video(path, 2),
                 lambda: image_scorer.image_preprocessor.to_uint8([path], "item")):  # the runtime's path
        refused(call, path, "regular file", unblock=unblock)
    assert within(HANG_S, lambda: ci.is_image_file(path), unblock=unblock) is False
    assert within(HANG_S, lambda: is_video_file(path), unblock=unblock) is False


def test_runtime_submit_of_a_fifo_fails_at_once(tmp_path, image_scorer):
    """Whether the runtime reads images at submission or on its preparation thread, a FIFO fails its own
    request at once (a stuck preparation thread would stall every image request after it)."""
    import concurrent.futures

    import fastgen
    from fastgen.runtime import ScoreRequest

    path, unblock = _special(tmp_path, "fifo")
    with fastgen.Runtime(scorer=image_scorer) as rt:
        try:
            future = within(HANG_S, lambda: rt.submit(ScoreRequest(path, "image")), unblock=unblock)
            error = future.exception(timeout=HANG_S)
        except InvalidArgumentError as exc:  # refused in the caller's thread
            error = exc
        except concurrent.futures.TimeoutError:
            unblock()
            pytest.fail("the request's future did not fail in time")
        assert isinstance(error, InvalidArgumentError) and path in str(error) and "\n" not in str(error)
        white = np.full((16, 16, 3), 255, np.uint8)
        assert rt.submit(ScoreRequest(white, "image")).result(timeout=HANG_S).label  # still serving


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # PIL warns, fastgen refuses
def test_decompression_bombs_and_broken_files_are_one_line(tmp_path, monkeypatch):
    good = tmp_path / "good.png"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(good)
    data = good.read_bytes()
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("not an image\n")
    # 60000 x 60000 claimed by the header, a few bytes of pixels: PIL's hard limit refuses it.
    (tmp_path / "bomb.png").write_bytes(_png(np.zeros((1, 1), np.uint16), 0, width=60000, height=60000))
    for name in ("trunc.png", "empty.png", "text.png", "bomb.png", "nul\x00byte.png", "missing.png"):
        refused(lambda name=name: ci.image_to_uint8(str(tmp_path / name), (8, 8)), repr(name)[1:-1])
        assert ci.is_image_file(str(tmp_path / name)) is (name == "trunc.png")  # its header is whole
    # Between MAX_IMAGE_PIXELS and twice that PIL only warns, and decodes: fastgen refuses it.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64 - 1)
    for call in (lambda: ci.image_to_uint8(good, (8, 8)), lambda: vae_images.load_image(str(good))):
        refused(call, "good.png", "pixels")


def test_broken_videos_are_one_line(tmp_path, monkeypatch):
    import av

    from fastgen.pipelines.video import sample_video

    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "text.mp4").write_text("not a video\n")
    for name in ("empty.mp4", "text.mp4"):
        refused(lambda name=name: sample_video(str(tmp_path / name), 2), name)
    path = str(tmp_path / "clip.mp4")
    with av.open(path, "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        grey = [np.full((48, 64, 3), v, np.uint8) for v in (0, 99, 199)]
        frames = [av.VideoFrame.from_ndarray(a, "rgb24") for a in grey]
        for frame in [*frames, None]:  # None flushes the encoder
            container.mux(stream.encode(frame))
    assert len(sample_video(path, 2).frames) == 2
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 48 - 1)  # frames count against the same cap
    refused(lambda: sample_video(path, 2), "clip.mp4", "pixels")


# --- 3. wrong input kinds, and how many frames one video may give ----------------------------------

def test_image_inputs_reject_wrong_kinds_in_one_line():
    for bad in (np.zeros((4, 4, 3), np.uint16), io.BytesIO(b"x"), 3.5, np.zeros((0, 4, 3), np.uint8)):
        refused(lambda b=bad: ci.image_to_uint8(b, (8, 8)))
        refused(lambda b=bad: vae_images.load_image(b))


def test_frame_counts_above_the_cap_are_refused_before_any_decoding(tmp_path, image_scorer):
    """Every sampled frame is held decoded at once: a count no video needs (``frames=10**12`` tried to
    allocate it) is refused up front, for arrays and files alike; the cap itself is accepted."""
    from fastgen.pipelines.video import MAX_FRAMES, check_frames, sample_video

    assert MAX_FRAMES == 10_000 and check_frames(MAX_FRAMES) == MAX_FRAMES
    for bad in (MAX_FRAMES + 1, 10**12, np.int64(MAX_FRAMES + 1)):
        refused(lambda b=bad: check_frames(b), "frames", str(MAX_FRAMES))
    video = np.full((3, 16, 16, 3), 200, np.uint8)  # 3 frames: a sample of more keeps the distinct ones
    assert len(sample_video(video, MAX_FRAMES).frames) == 3
    assert len(image_scorer.score_video(video, frames=MAX_FRAMES).frames) == 3
    for source in (video, str(tmp_path / "missing.mp4")):  # a file is not even opened
        refused(lambda s=source: sample_video(s, MAX_FRAMES + 1), "frames", str(MAX_FRAMES))
        refused(lambda s=source: image_scorer.score_video(s, frames=MAX_FRAMES + 1), "frames", str(MAX_FRAMES))
