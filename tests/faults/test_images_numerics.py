"""Issue 15 (hardening): images, numerics and pipeline inputs, probed as a hostile user would.

Every hostile input is generated here (tmp_path, no binary fixtures). The engines are small fakes
(the real specs' shapes, arithmetic instead of models), so the whole file runs in seconds; any call
that could hang runs in a thread with a hard timeout, so a regression fails instead of hanging CI.
"""

from __future__ import annotations

import io
import json
import os
import socket
import struct
import threading
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from fastgen.engines.base import Engine
from fastgen.errors import FastgenError, InvalidArgumentError, NumericalError
from fastgen.models.spec import DimRange, ExportSpec, ShapeProfile, TensorSpec
from fastgen.pipelines import classifier_images as ci
from fastgen.pipelines import stepping, vae_images
from fastgen.pipelines.config import MAX_SEED, GenerateConfig

HANG_S = 10.0


def no_hang(fn, timeout: float = HANG_S, unblock=None):
    """``fn()`` in a daemon thread; fails the test if it is still running after ``timeout`` seconds."""
    box: dict = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        if unblock is not None:
            unblock()  # let the stuck thread finish instead of leaking it
        pytest.fail(f"hung for more than {timeout} s")
    if "error" in box:
        raise box["error"]
    return box.get("value")


def one_line_error(error, *needles: str) -> str:
    message = str(getattr(error, "value", error))  # a pytest ExceptionInfo or the exception
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, (needle, message)
    return message


def refused(fn, *needles: str, error: type = InvalidArgumentError, unblock=None) -> str:
    """``fn()`` raises ``error`` (without hanging) in one line holding every needle."""
    with pytest.raises(error) as info:
        no_hang(fn, unblock=unblock)
    return one_line_error(info, *needles)


# --- fakes: engines with real specs, arithmetic inside --------------------------------------------

def _spec(component, inputs, outputs, **dims) -> ExportSpec:
    profile = ShapeProfile({k: DimRange(*v) for k, v in dims.items()})
    inputs, outputs = (tuple(TensorSpec(*t) for t in ts) for ts in (inputs, outputs))
    multiples = {"height": 16} if component == "unet" else {}
    return ExportSpec(component, inputs, outputs, profile, multiples=multiples)


LATENT, IDS = ("batch", 4, "height/8", "width/8"), ("input_ids", "int64", ("batch", "seq"), 0, 1000)
SIZES = {"height": (32, 32, 64), "width": (32, 32, 64)}
UNET_SPEC = _spec("unet", [("sample", "float32", LATENT), ("timestep", "float32", ("batch",), 0, 1000),
                           ("encoder_hidden_states", "float32", ("batch", "seq", 8))],
                  [("noise_pred", "float32", LATENT)], batch=(1, 2, 8), seq=(77, 77, 77), **SIZES)
TEXT_SPEC = _spec("text-encoder", [IDS], [("last_hidden_state", "float32", ("batch", "seq", 8))],
                  batch=(1, 2, 8), seq=(1, 77, 77))
VAE_SPEC = _spec("vae-decoder", [("latent", "float32", LATENT)],
                 [("image", "float32", ("batch", 3, "height", "width"))], batch=(1, 1, 8), **SIZES)
CLASSIFIER_SPEC = _spec("classifier", [("pixel_values", "float32", ("batch", 3, 16, 16))],
                        [("logits", "float32", ("batch", 3))], batch=(1, 2, 8))
MASK = ("attention_mask", "int64", ("batch", "seq"), None, None, "mask")
TEXT_CLASSIFIER_SPEC = _spec("text-classifier", [IDS, MASK], [("logits", "float32", ("batch", 2))],
                             batch=(1, 2, 8), seq=(1, 16, 64))
SCHEDULER = {"_class_name": "EulerDiscreteScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
             "beta_end": 0.012, "beta_schedule": "scaled_linear"}
POISON = "poison"  # a prompt with this word makes the fake UNet return NaN for its rows


class FakeEngine(Engine):
    backend = "fake"

    def __init__(self, spec: ExportSpec, fn) -> None:
        super().__init__(spec)
        self.fn = fn

    def _run(self, inputs):
        return self.fn(inputs)


@pytest.fixture(scope="module")
def tokenizer():
    from fastgen.models.tokenizers import clip_tokenizer

    return clip_tokenizer()


@pytest.fixture(scope="module")
def make_generator(tokenizer):
    from fastgen.pipelines.generator import Generator

    poison_id = tokenizer(POISON).input_ids[1]

    def text(inputs):
        ids = inputs["input_ids"]
        hidden = torch.zeros(*ids.shape, 8)
        hidden[..., 0] = (ids == poison_id).any(dim=1, keepdim=True).float()  # the poisoned rows' marker
        return {"last_hidden_state": hidden}

    def unet(inputs):
        out = 0.1 * inputs["sample"]
        out[inputs["encoder_hidden_states"][:, :, 0].amax(dim=1) > 0.5] = float("nan")
        return {"noise_pred": out}

    def make(vae_nan_rows=()):
        def vae(inputs):
            image = torch.tanh(torch.nn.functional.interpolate(inputs["latent"][:, :3], scale_factor=8))
            image[[r for r in vae_nan_rows if r < image.shape[0]]] = float("nan")
            return {"image": image}

        return Generator(unet=FakeEngine(UNET_SPEC, unet), vae_decoder=FakeEngine(VAE_SPEC, vae),
                         text_encoder=FakeEngine(TEXT_SPEC, text), tokenizer=tokenizer,
                         scheduler_config=SCHEDULER, scaling_factor=0.18215)

    return make


@pytest.fixture(scope="module")
def gen(make_generator):
    return make_generator()


@pytest.fixture(scope="module")
def image_scorer():
    from fastgen.pipelines.scorer import Scorer

    def run(inputs):
        logits = inputs["pixel_values"].mean(dim=(2, 3))  # (n, 3) of the normalised pixels
        logits[logits.mean(dim=1) < -1.0] = float("nan")  # a model that overflows on dark images
        return {"logits": logits}

    return Scorer(FakeEngine(CLASSIFIER_SPEC, run))


@pytest.fixture(scope="module")
def text_scorer(tokenizer):
    from fastgen.pipelines.scorer import Scorer

    def run(inputs):
        length = inputs["attention_mask"].sum(1).float()
        return {"logits": torch.stack([length, torch.zeros_like(length)], 1)}

    return Scorer(FakeEngine(TEXT_CLASSIFIER_SPEC, run), tokenizer=tokenizer)


GEN = {"steps": 2, "progress": False, "height": 32, "width": 32}


# --- 1. 16-bit and float images are scaled by their mode's range ---------------------------------

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
    strip = no_hang(lambda: ci.image_to_uint8(tmp_path / "strip.png", (64, 64), center_crop=True))
    assert (strip == 200).all() and time.perf_counter() - start < 3.0
    for empty in (Image.new("RGB", (0, 0)), Image.new("RGB", (0, 5))):
        for crop in (False, True):
            refused(lambda e=empty, c=crop: ci.image_to_uint8(e, (16, 16), center_crop=c), "pixels")


# --- 2. non-regular files, bombs, broken files ----------------------------------------------------

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
    assert no_hang(lambda: ci.is_image_file(path), unblock=unblock) is False
    assert no_hang(lambda: is_video_file(path), unblock=unblock) is False


def test_runtime_submit_of_a_fifo_fails_at_once(tmp_path, image_scorer):
    """Whether the runtime reads images at submission or on its preparation thread, a FIFO fails its own
    request at once (a stuck preparation thread would stall every image request after it)."""
    import concurrent.futures

    import fastgen
    from fastgen.runtime import ScoreRequest

    path, unblock = _special(tmp_path, "fifo")
    with fastgen.Runtime(scorer=image_scorer) as rt:
        try:
            future = no_hang(lambda: rt.submit(ScoreRequest(path, "image")), unblock=unblock)
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


# --- 3. int8 quantization never hides NaN ----------------------------------------------------------

def test_int8_per_token_keeps_a_non_finite_row_nan_and_finite_rows_bit_identical():
    from fastgen.ops import quant as q

    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(0))
    wq, ws = q.quantize_weight(torch.randn(8, 32, generator=torch.Generator().manual_seed(1)), dtype="int8")
    clean_q, clean_s = q.quantize_per_token(x, backend="reference")
    clean = q.int8_gemm(clean_q, clean_s, wq, ws, out_dtype=torch.float32, backend="reference")
    for bad in (float("nan"), float("inf"), float("-inf")):
        y = x.clone()
        y[1, 5] = bad
        xq, xs = q.quantize_per_token(y, backend="reference")
        assert torch.isnan(xs[1]) and torch.equal(xs[[0, 2, 3]], clean_s[[0, 2, 3]])
        assert torch.equal(xq[[0, 2, 3]], clean_q[[0, 2, 3]])
        out = q.int8_gemm(xq, xs, wq, ws, out_dtype=torch.float32, backend="reference")
        assert torch.isnan(out[1]).all() and torch.equal(out[[0, 2, 3]], clean[[0, 2, 3]])
    zero = q.quantize_per_token(torch.zeros(2, 8), backend="reference")[1]
    assert torch.equal(zero, torch.ones(2))  # an all-zero row keeps scale 1


@pytest.mark.parametrize("preset", ["dynamic", "static"])
def test_quantized_linear_propagates_a_nan_row(preset):
    from fastgen.quant import calibrate, quantize_
    from fastgen.quant.config import Int8DynamicConfig, Int8StaticConfig

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 8))
    x = torch.randn(3, 16)
    config = Int8DynamicConfig(skip=()) if preset == "dynamic" else Int8StaticConfig(skip=())
    if preset == "static":
        calibrate(net, [x])
    quantize_(net, config)
    clean = net(x)
    for bad in (float("nan"), float("inf")):
        y = x.clone()
        y[2, 3] = bad
        out = net(y)
        assert torch.isnan(out[2]).all() and torch.equal(out[:2], clean[:2])


def test_non_finite_weights_are_refused_naming_the_layer():
    from fastgen.ops import quant as q
    from fastgen.quant import quantize_
    from fastgen.quant.config import Int4WeightOnlyConfig, Int8DynamicConfig

    for bad in (float("nan"), float("inf")):
        net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
        with torch.no_grad():
            net[1].weight[3, 2] = bad
        for config in (Int8DynamicConfig(skip=()), Int4WeightOnlyConfig(skip=(), group_size=32)):
            refused(lambda n=net, c=config: quantize_(n, c), "'1'", "non-finite")
            assert type(net[0]) is torch.nn.Linear  # nothing replaced
        refused(lambda w=net[1].weight: q.quantize_weight(w, dtype="int8"), "non-finite")


# --- 4. non-finite model outputs are errors, per request ------------------------------------------

def test_nan_unet_fails_naming_step_and_prompt(gen):
    ok = gen.generate(["fine", "also fine"], seed=1, **GEN)
    assert len(ok.images) == 2
    refused(lambda: gen.generate(["fine", f"a {POISON} prompt"], seed=1, **GEN), "prompt 1", "step 1",
            error=NumericalError)
    assert issubclass(NumericalError, FastgenError)  # the CLI's one-line error path


def test_unet_step_reports_only_the_affected_request(gen):
    """What the batched runtime relies on: one state's NaN is that state's error, the others advance."""
    states = [stepping.prepare(gen, p, GenerateConfig(steps=2, height=32, width=32), seed=3)
              for p in ("fine", POISON, "fine too")]
    stepping.encode_prompts(gen, states)
    stepping.init_latents(gen, states)
    before = states[1].latents.clone()
    errors = stepping.denoise_step(gen, states)
    assert errors[0] is None and errors[2] is None and isinstance(errors[1], NumericalError)
    assert [s.index for s in states] == [1, 0, 1] and torch.equal(states[1].latents, before)
    rows = torch.zeros(5, 2, 2)
    rows[3, 1, 0] = float("inf")
    assert stepping.nonfinite_rows(rows) == [3] and stepping.nonfinite_rows(rows[:3]) == []


def test_runtime_fails_only_the_request_that_went_nan(gen):
    import fastgen
    from fastgen.runtime import GenerateRequest

    cfg = GenerateConfig(steps=2, height=32, width=32, seed=4, output_type="uint8")
    with fastgen.Runtime(gen) as rt:
        futures = [rt.submit(GenerateRequest(p, cfg)) for p in ("fine", f"a {POISON} prompt", "also fine")]
        errors = [f.exception(timeout=30) for f in futures]
    assert errors[0] is None and errors[2] is None and isinstance(errors[1], NumericalError)
    one_line_error(errors[1], "step 1")
    assert futures[0].result().images.shape == (1, 32, 32, 3)


def test_nan_vae_output_fails_naming_the_prompt(make_generator):
    bad = make_generator(vae_nan_rows=(2,))  # the first image of the second prompt
    refused(lambda: bad.generate(["a", "b"], seed=1, num_images_per_prompt=2, **GEN), "prompt 1",
            "VAE decoder", error=NumericalError)
    decoded = torch.zeros(2, 3, 4, 4)
    decoded[1, 0, 0, 0] = float("nan")
    for output_type in ("pil", "np", "uint8"):  # the runtime converts each request's images alone
        refused(lambda t=output_type: vae_images.to_output(decoded, t), "image(s) 1", error=NumericalError)


def test_nan_logits_fail_naming_the_input(image_scorer):
    white, dark = np.full((16, 16, 3), 255, np.uint8), np.zeros((16, 16, 3), np.uint8)
    assert len(image_scorer.score_images([white, white])) == 2
    refused(lambda: image_scorer.score_images([white, white, dark], batch_size=2), "images[2]",
            error=NumericalError)
    rows = image_scorer.score_rows(torch.tensor([[0.0, 1.0, 2.0], [float("nan"), 0.0, 0.0]]))
    assert rows[0].label == "label_2" and isinstance(rows[1], NumericalError)


# --- 5. seeds, prompts, texts, calibration ---------------------------------------------------------

def test_numpy_integer_seeds_are_seeds(gen):
    want = gen.generate("a", seed=3, output_type="latent", **GEN)
    for kwargs in ({"seed": np.int64(3)}, {"seeds": [np.int32(3)]}, {"seeds": np.array([3])},
                   {"config": GenerateConfig(seed=np.uint8(3))}):
        got = gen.generate("a", output_type="latent", **GEN, **kwargs)
        assert torch.equal(got.images, want.images) and got.seeds == [3] and type(got.seeds[0]) is int
        json.dumps(got.to_dict())  # numpy ints would not serialise
    state = stepping.prepare(gen, "a", GenerateConfig(steps=1), seed=np.int64(5))
    assert state.seeds == [5] and type(state.seeds[0]) is int


def test_every_reported_seed_is_a_valid_seed(gen, image_scorer):
    refused(lambda: GenerateConfig(seed=MAX_SEED, num_images_per_prompt=2), "seed", str(MAX_SEED - 1))
    result = gen.generate("a", seed=MAX_SEED - 1, num_images_per_prompt=2, output_type="latent", **GEN)
    assert result.seeds == [MAX_SEED - 1, MAX_SEED]
    for s in result.seeds:
        GenerateConfig(seed=s)  # what was reported is accepted back
    for kwargs in ({"seeds": [MAX_SEED], "num_images_per_prompt": 2},
                   {"seed": MAX_SEED, "candidates": 2, "scorer": image_scorer}):
        refused(lambda kw=kwargs: gen.generate("a", **GEN, **kw), "seed")
    refused(lambda: stepping.prepare(gen, "a", GenerateConfig(steps=1), seed=MAX_SEED, images=2), "seed")


def test_bad_prompts_name_their_index(gen):
    for prompts, needle in ((["a", None], "prompts[1]"), (["a", "b", 3], "prompts[2]"), (b"abc", "prompts"),
                            (["ok", "bad \udcff utf-8"], "prompts[1]"), (["x" * 2_000_000], "prompts[0]")):
        refused(lambda prompts=prompts: gen.generate(prompts, seed=1, **GEN), needle)
    for negative in ("\ud800", "n" * 2_000_000):
        refused(lambda n=negative: GenerateConfig(negative_prompt=n), "negative-prompt")
    refused(lambda: stepping.prepare(gen, "lone \udcff", GenerateConfig(steps=1)), "prompt")
    assert len(gen.generate("nul \x00 inside", seed=1, **GEN).images) == 1  # NUL is a character like others
    for field, value in (("guidance_scale", float("inf")), ("guidance_scale", float("-inf")),
                         ("guidance_scale", -0.5), ("strength", 1.0001), ("strength", -1e-9),
                         ("strength", float("nan")), ("eta", float("inf"))):
        refused(lambda kw={field: value}: GenerateConfig(**kw), field.replace("_", "-"))


def test_texts_with_lone_surrogates_or_huge_are_refused(text_scorer):
    assert len(text_scorer.score_texts(["fine", "nul \x00 too"])) == 2
    for texts, needle in ((["ok", "bad \udcff"], "texts[1]"), (["y" * 2_000_000], "texts[0]")):
        refused(lambda texts=texts: text_scorer.score_texts(texts), needle)
    prep = text_scorer.text_preprocessor  # the runtime's path: encode at submission
    refused(lambda: prep.encode("\ud800"), "surrogate")
    refused(lambda: prep.encode_batch(["ok", "\ud800"]), "texts[1]")


class _Counting(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(16, 3)
        self.calls = 0

    def forward(self, pixel_values):
        self.calls += 1
        return (self.fc(pixel_values.mean(dim=(2, 3)).repeat(1, 6)[:, :16]),)


def test_calibration_is_validated_before_any_work():
    from fastgen.models.component import Component
    from fastgen.quant.components import quantize_component
    from fastgen.quant.config import Int8StaticConfig

    module = _Counting()
    comp = Component("classifier", module, CLASSIFIER_SPEC, module)
    good = torch.randn(2, 3, 16, 16)
    config, first = Int8StaticConfig(skip=()), "calibration[0]"
    cases = [([], "calibration"), (42, "calibration"), ([(good, good)], first), ([("x",)], first),
             ([good, torch.randn(2, 3, 16)], "calibration[1]"), ([good.long()], first),
             ([{"pixels": good}], first), ([torch.randn(2, 3, 8, 8)], first),
             ([torch.full((1, 3, 16, 16), float("nan"))], first)]
    for calibration, needle in cases:
        refused(lambda c=calibration: quantize_component(comp, config, calibration=c), needle)
        assert module.calls == 0  # refused before the first forward pass
    quantized = quantize_component(comp, config, calibration=iter([(good,), {"pixel_values": good}]))
    assert module.calls == 0 and quantized.module.calls == 2  # a one-shot iterator still calibrates


def test_unet_calibration_loop_checks_its_arguments_up_front():
    from fastgen.models.component import Component
    from fastgen.models.metadata import UNetMetadata
    from fastgen.pipelines.calibration import denoise, unet_calibration_loop

    comp = Component("unet", torch.nn.Identity(), UNET_SPEC, torch.nn.Identity(),
                     metadata=UNetMetadata(scheduler=SCHEDULER))
    for kwargs, needle in (({"height": 40, "width": 32, "steps": 2}, "height"),
                           ({"height": 32, "width": 32, "steps": 0}, "steps"),
                           ({"height": 32, "width": 32, "steps": 2, "seeds": ()}, "seeds"),
                           ({"height": 32, "width": 32, "steps": 2, "seeds": (1, "2")}, "seeds")):
        refused(lambda kwargs=kwargs: unet_calibration_loop(comp, **kwargs), needle)  # before any loop runs
    for kwargs, needle in (({"batch": 0}, "batch"), ({"guidance": float("nan")}, "guidance"),
                           ({"seed": -1}, "seed")):
        refused(lambda kw=kwargs: denoise(comp.module, comp, height=32, width=32, steps=1, **kw), needle)


def test_image_inputs_reject_wrong_kinds_in_one_line():
    for bad in (np.zeros((4, 4, 3), np.uint16), io.BytesIO(b"x"), 3.5, np.zeros((0, 4, 3), np.uint8)):
        refused(lambda b=bad: ci.image_to_uint8(b, (8, 8)))
        refused(lambda b=bad: vae_images.load_image(b))
