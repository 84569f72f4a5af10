"""fastgen.ops image conversions: the PyTorch path against an independent numpy reference, and the
C++ extension against the PyTorch path, bit-exact (torch.equal) over dtypes, odd sizes, special
values and non-contiguous layouts; the fallback; and argument validation."""

from __future__ import annotations

import contextlib
import types

import numpy as np
import pytest
import torch

from fastgen.errors import InvalidArgumentError, UnsupportedError
from fastgen.ops import _ext, available, normalize_nchw, to_uint8_nhwc

_EXT_REASON = _ext.unavailable_reason() or ""
requires_ext = pytest.mark.skipif(not _ext.available(), reason=f"ext-vs-torch test: {_EXT_REASON}")
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")

FLOATS = [torch.float32, torch.float16, torch.bfloat16]
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


# ------------------------------------------------------------------------------------------------
# Independent references (numpy, float32 arithmetic).

def numpy_to_uint8(images: torch.Tensor) -> torch.Tensor:
    x = images.float().numpy()  # 16-bit floats convert to float32 exactly
    with np.errstate(invalid="ignore", over="ignore"):
        v = x * np.float32(127.5)
        v = v + np.float32(127.5)
    v = np.clip(np.nan_to_num(v, nan=0.0, posinf=255.0, neginf=0.0), 0, 255)
    return torch.from_numpy(np.ascontiguousarray(np.rint(v).astype(np.uint8).transpose(0, 2, 3, 1)))


def numpy_normalize(images: torch.Tensor, mean, std, out_dtype: torch.dtype) -> torch.Tensor:
    x = images.numpy().astype(np.float32)  # (N, H, W, C)
    with np.errstate(over="ignore"):
        v = ((x / np.float32(255)) - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return torch.from_numpy(np.ascontiguousarray(v.transpose(0, 3, 1, 2))).to(out_dtype)


# ------------------------------------------------------------------------------------------------
# Inputs.

def boundary_values() -> torch.Tensor:
    """float32 values around every rounding boundary of x*127.5 + 127.5, plus specials."""
    k = torch.arange(-1, 257, dtype=torch.float32)
    centres = torch.cat([(k + 0.5 - 127.5) / 127.5, (k - 127.5) / 127.5])  # ties and integers
    vals = [centres]
    up, down = centres.clone(), centres.clone()
    for _ in range(8):  # 8 ulps either side
        up = torch.nextafter(up, torch.tensor(float("inf")))
        down = torch.nextafter(down, torch.tensor(float("-inf")))
        vals += [up, down]
    specials = torch.tensor([0.0, -0.0, 1.0, -1.0, 1.5, -1.5, 1e30, -1e30, 3.4e38, -3.4e38, 1e-40, -1e-40,
                             float("inf"), float("-inf"), float("nan"), -float("nan")])
    return torch.cat([*vals, specials])


def sample_images(shape, dtype, seed=0) -> torch.Tensor:
    """(N, C, H, W) random values in about [-1.3, 1.3], laced with boundary values and specials."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 0.6).clamp(-1.3, 1.3).reshape(-1)
    special = boundary_values()
    idx = torch.randperm(x.numel(), generator=g)[: min(x.numel() // 3, special.numel())]
    x[idx] = special[torch.randint(special.numel(), (idx.numel(),), generator=g)]
    if x.numel() >= 4:
        x[:4] = torch.tensor([float("nan"), float("inf"), float("-inf"), 0.5])
    return x.reshape(shape).to(dtype)


LAYOUTS = ["contiguous", "channel_slice", "transposed", "channels_last", "expanded", "cropped"]


def make_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """The same (N, C, H, W) values as a non-contiguous view (values may differ per layout)."""
    n, c, h, w = x.shape
    if layout == "contiguous":
        return x
    if layout == "channel_slice":  # channels c of a (c + 2)-channel tensor, starting at 1
        big = torch.cat([x[:, :1], x, x[:, :1]], dim=1)
        return big[:, 1:1 + c]
    if layout == "transposed":  # width stride != 1
        return x.transpose(2, 3).contiguous().transpose(2, 3)
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "expanded":  # zero batch stride
        return x[:1].expand(n, c, h, w)
    if layout == "cropped":  # odd offsets in height and width
        big = torch.nn.functional.pad(x.float(), (1, 2, 3, 1)).to(x.dtype)
        return big[:, :, 3:3 + h, 1:1 + w]
    raise AssertionError(layout)


@contextlib.contextmanager
def half_baseline_only():
    """Run the half -> float conversion on its portable SSE2/scalar code instead of F16C."""
    from fastgen import _C

    old = _C.set_half_baseline_only(True)
    try:
        yield
    finally:
        _C.set_half_baseline_only(old)


# ------------------------------------------------------------------------------------------------
# to_uint8_nhwc

@pytest.mark.parametrize("dtype", FLOATS)
def test_to_uint8_torch_path_matches_numpy(dtype):
    x = sample_images((2, 3, 17, 23), dtype)
    out = to_uint8_nhwc(x, backend="torch")
    assert out.dtype == torch.uint8 and out.shape == (2, 17, 23, 3) and out.is_contiguous()
    assert torch.equal(out, numpy_to_uint8(x))


def test_to_uint8_special_values_torch_path():
    x = torch.tensor([float("nan"), float("inf"), float("-inf"), -1.0, 1.0, 0.0, -0.0, 2.0, -2.0,
                      1 / 255, -1 / 255]).view(1, 1, 1, -1)
    got = to_uint8_nhwc(x, backend="torch").flatten().tolist()
    # 0 and -0 give 127.5, a tie that goes to the even 128; +-1/255 give about 128.0 and 127.0.
    assert got == [0, 255, 0, 0, 255, 128, 128, 255, 0, 128, 127]


@requires_ext
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape", [(1, 3, 1, 1), (3, 3, 77, 113), (1, 3, 64, 64), (8, 3, 9, 31),
                                   (2, 1, 5, 37), (2, 4, 11, 19), (1, 2, 3, 21)])
def test_to_uint8_ext_matches_torch(dtype, shape):
    x = sample_images(shape, dtype, seed=sum(shape))
    got = to_uint8_nhwc(x, backend="ext")
    assert got.shape == (shape[0], shape[2], shape[3], shape[1]) and got.is_contiguous()
    assert torch.equal(got, to_uint8_nhwc(x, backend="torch"))


@requires_ext
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("channels", [1, 3, 4])
def test_to_uint8_ext_non_contiguous(dtype, layout, channels):
    x = make_layout(sample_images((3, channels, 13, 29), dtype, seed=channels), layout)
    assert torch.equal(to_uint8_nhwc(x, backend="ext"), to_uint8_nhwc(x, backend="torch"))


@requires_ext
def test_to_uint8_ext_fp32_rounding_boundaries():
    vals = boundary_values()  # ~8k values, each a 1-pixel column of a 3-channel image
    x = vals[: vals.numel() // 3 * 3].view(1, 3, 1, -1)
    assert torch.equal(to_uint8_nhwc(x, backend="ext"), to_uint8_nhwc(x, backend="torch"))
    assert torch.equal(to_uint8_nhwc(x, backend="torch"), numpy_to_uint8(x))


@requires_ext
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("portable", [False, True], ids=["native", "portable"])
@pytest.mark.parametrize("flush_denormal", [False, True], ids=["denormals", "flush"])
def test_to_uint8_ext_every_16bit_pattern(dtype, portable, flush_denormal):
    """All 65536 values (NaNs, infinities, subnormals), on F16C and on the portable conversion,
    with and without denormal flushing in the calling thread."""
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.int16)
    x = torch.from_numpy(bits).view(dtype)  # (65536,)
    ctx = half_baseline_only() if portable else contextlib.nullcontext()
    try:
        if flush_denormal and not torch.set_flush_denormal(True):
            pytest.skip("this CPU cannot flush denormals")
        with ctx:
            for xs in [x.reshape(1, 1, 1, -1), x.reshape(1, 4, 1, -1), x.reshape(1, 1, -1, 16),
                       x.reshape(1, 2, 1, -1), x[:65535].reshape(1, 3, 1, -1), x[:65535].reshape(1, 3, -1, 5)]:
                for view in (xs, xs.transpose(2, 3)):
                    assert torch.equal(to_uint8_nhwc(view, backend="ext"), numpy_to_uint8(view)), view.shape
    finally:
        torch.set_flush_denormal(False)  # the default; torch has no getter to restore from


@requires_ext
@pytest.mark.parametrize("threads", [1, 2, 3, 64])
def test_to_uint8_ext_threads(threads):
    x = sample_images((2, 3, 130, 260), torch.float32, seed=threads)  # enough work for threads
    assert torch.equal(to_uint8_nhwc(x, backend="ext", threads=threads), to_uint8_nhwc(x, backend="torch"))


@requires_ext
def test_to_uint8_ext_empty_and_grad():
    assert to_uint8_nhwc(torch.empty(0, 3, 4, 5), backend="ext").shape == (0, 4, 5, 3)
    assert to_uint8_nhwc(torch.empty(2, 3, 0, 5), backend="ext").shape == (2, 0, 5, 3)
    x = sample_images((1, 3, 4, 5), torch.float32).requires_grad_(True)  # .numpy() needs detach
    assert torch.equal(to_uint8_nhwc(x, backend="ext"), to_uint8_nhwc(x.detach(), backend="torch"))


# ------------------------------------------------------------------------------------------------
# normalize_nchw

def sample_pixels(shape, seed=0) -> torch.Tensor:
    """(N, H, W, C) uint8 with every value 0..255 present."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8).reshape(-1)
    ramp = torch.arange(256, dtype=torch.uint8)
    x[: min(256, x.numel())] = ramp[: min(256, x.numel())]
    return x.reshape(shape)


def stats_for(c: int):
    if c == 3:
        return IMAGENET
    mean = tuple(0.5 - 0.1 * i for i in range(c))
    std = tuple((-1) ** i * (0.25 + 0.05 * i) for i in range(c))  # a negative std is allowed
    return mean, std


@pytest.mark.parametrize("out_dtype", FLOATS)
def test_normalize_torch_path_matches_numpy(out_dtype):
    x = sample_pixels((2, 9, 31, 3))
    out = normalize_nchw(x, *IMAGENET, out_dtype=out_dtype, backend="torch")
    assert out.dtype == out_dtype and out.shape == (2, 3, 9, 31) and out.is_contiguous()
    assert torch.equal(out, numpy_normalize(x, *IMAGENET, out_dtype))


@requires_ext
@pytest.mark.parametrize("out_dtype", FLOATS)
@pytest.mark.parametrize("shape", [(1, 1, 1, 3), (3, 77, 113, 3), (8, 16, 24, 3), (1, 5, 7, 1),
                                   (2, 9, 33, 4), (2, 3, 5, 2), (1, 4, 6, 5)])
def test_normalize_ext_matches_torch(out_dtype, shape):
    x = sample_pixels(shape, seed=sum(shape))
    mean, std = stats_for(shape[3])
    got = normalize_nchw(x, mean, std, out_dtype=out_dtype, backend="ext")
    assert got.shape == (shape[0], shape[3], shape[1], shape[2]) and got.is_contiguous()
    assert got.dtype == out_dtype
    assert torch.equal(got, normalize_nchw(x, mean, std, out_dtype=out_dtype, backend="torch"))


@requires_ext
@pytest.mark.parametrize("layout", ["from_nchw", "channel_slice", "transposed", "expanded", "cropped"])
@pytest.mark.parametrize("channels", [1, 3, 4])
def test_normalize_ext_non_contiguous(layout, channels):
    base = sample_pixels((3, 11, 27, channels), seed=channels)
    if layout == "from_nchw":  # an NCHW tensor viewed as NHWC
        x = base.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)
    elif layout == "channel_slice":  # channels 1.. of a (channels + 1)-channel tensor
        x = torch.cat([base[..., :1], base], dim=3)[..., 1:]
    elif layout == "transposed":
        x = base.transpose(1, 2).contiguous().transpose(1, 2)
    elif layout == "expanded":
        x = base[:1].expand(3, 11, 27, channels)
    else:
        x = torch.nn.functional.pad(base.permute(0, 3, 1, 2), (2, 1, 1, 3)).permute(0, 2, 3, 1)[:, 1:12, 2:29]
    assert not x.is_contiguous() or (layout == "from_nchw" and channels == 1)
    mean, std = stats_for(channels)
    for out_dtype in FLOATS:
        got = normalize_nchw(x, mean, std, out_dtype=out_dtype, backend="ext")
        assert torch.equal(got, normalize_nchw(x, mean, std, out_dtype=out_dtype, backend="torch"))


@requires_ext
def test_normalize_ext_overflow_and_threads():
    x = sample_pixels((2, 40, 300, 3))
    mean, std = (0.0, 0.5, 1.0), (1e-5, -1e-5, 3.0)  # float16 overflows to +-inf in both paths
    for threads in (1, 2, 5):
        got = normalize_nchw(x, mean, std, out_dtype=torch.float16, backend="ext", threads=threads)
        assert torch.equal(got, normalize_nchw(x, mean, std, out_dtype=torch.float16, backend="torch"))
    assert torch.isinf(got).any()


@requires_ext
def test_normalize_accepts_tensor_stats_and_empty():
    x = sample_pixels((1, 4, 5, 3))
    a = normalize_nchw(x, torch.tensor(IMAGENET[0]), np.array(IMAGENET[1]), backend="ext")
    assert torch.equal(a, normalize_nchw(x, *IMAGENET, backend="torch"))
    assert normalize_nchw(torch.empty(0, 4, 5, 3, dtype=torch.uint8), *IMAGENET).shape == (0, 3, 4, 5)


# ------------------------------------------------------------------------------------------------
# Dispatch and fallback.

def test_disable_env_forces_torch_path(monkeypatch):
    monkeypatch.setenv("FASTGEN_DISABLE_EXT", "1")
    assert not available() and not _ext.available()
    assert "FASTGEN_DISABLE_EXT" in _ext.unavailable_reason()
    x = sample_images((2, 3, 5, 7), torch.float32)
    assert torch.equal(to_uint8_nhwc(x), numpy_to_uint8(x))
    u = sample_pixels((2, 5, 7, 3))
    assert torch.equal(normalize_nchw(u, *IMAGENET), numpy_normalize(u, *IMAGENET, torch.float32))
    with pytest.raises(UnsupportedError, match="FASTGEN_DISABLE_EXT"):
        to_uint8_nhwc(x, backend="ext")


def test_missing_extension_falls_back(monkeypatch):
    monkeypatch.delenv("FASTGEN_DISABLE_EXT", raising=False)
    monkeypatch.setattr(_ext, "_tried", True)
    monkeypatch.setattr(_ext, "_module", None)
    monkeypatch.setattr(_ext, "_error", "ImportError: simulated")
    assert not available()
    x = sample_images((1, 3, 4, 6), torch.float16)
    assert torch.equal(to_uint8_nhwc(x), numpy_to_uint8(x))
    u = sample_pixels((1, 4, 6, 3))
    assert torch.equal(normalize_nchw(u, *IMAGENET, out_dtype=torch.float16),
                       numpy_normalize(u, *IMAGENET, torch.float16))
    with pytest.raises(UnsupportedError, match="not built"):
        normalize_nchw(u, *IMAGENET, backend="ext")


@requires_ext
def test_auto_uses_extension_on_cpu(monkeypatch):
    real = _ext.load()
    calls = []

    def spy(name):
        def call(*args):
            calls.append(name)
            return getattr(real, name)(*args)
        return call

    fake = types.SimpleNamespace(to_uint8_nhwc=spy("to_uint8_nhwc"), normalize_nchw_lut=spy("normalize_nchw_lut"))
    monkeypatch.setattr(_ext, "load", lambda: fake)
    to_uint8_nhwc(sample_images((1, 3, 2, 2), torch.float32))
    normalize_nchw(sample_pixels((1, 2, 2, 3)), *IMAGENET)
    to_uint8_nhwc(sample_images((1, 3, 2, 2), torch.float32), backend="torch")
    assert calls == ["to_uint8_nhwc", "normalize_nchw_lut"]


# ------------------------------------------------------------------------------------------------
# Validation.

def _raises(argument, fn, *args, **kwargs):
    with pytest.raises(InvalidArgumentError) as info:
        fn(*args, **kwargs)
    assert info.value.argument == argument
    assert "\n" not in str(info.value)
    return info.value


def test_to_uint8_rejects_bad_input():
    good = torch.zeros(1, 3, 2, 2)
    _raises("images", to_uint8_nhwc, good.numpy())
    _raises("images", to_uint8_nhwc, torch.zeros(3, 2, 2))
    _raises("images", to_uint8_nhwc, torch.zeros(1, 3, 2, 2, dtype=torch.float64))
    _raises("images", to_uint8_nhwc, torch.zeros(1, 3, 2, 2, dtype=torch.uint8))
    err = _raises("images", to_uint8_nhwc, torch.zeros(1, 8, 8, 3))  # NHWC passed as NCHW
    assert "channels" in str(err)
    _raises("images", to_uint8_nhwc, torch.zeros(1, 0, 2, 2))
    _raises("backend", to_uint8_nhwc, good, backend="cuda")
    for bad in (0, -1, True, 1.5, "2"):
        _raises("threads", to_uint8_nhwc, good, threads=bad)
    assert to_uint8_nhwc(good, threads=np.int64(2)).shape == (1, 2, 2, 3)
    _raises("images", to_uint8_nhwc, torch.zeros(1, 3, 2, 2).to_sparse())


def test_normalize_rejects_bad_input():
    good = torch.zeros(1, 2, 2, 3, dtype=torch.uint8)
    _raises("images_uint8_nhwc", normalize_nchw, torch.zeros(1, 2, 2, 3), *IMAGENET)
    _raises("images_uint8_nhwc", normalize_nchw, torch.zeros(2, 2, 3, dtype=torch.uint8), *IMAGENET)
    _raises("images_uint8_nhwc", normalize_nchw, [[1, 2, 3]], *IMAGENET)
    _raises("images_uint8_nhwc", normalize_nchw, torch.zeros(1, 2, 2, 0, dtype=torch.uint8), (), ())
    err = _raises("mean", normalize_nchw, torch.zeros(1, 3, 4, 4, dtype=torch.uint8), *IMAGENET)  # NCHW
    assert "4 channels" in str(err)
    _raises("mean", normalize_nchw, good, (0.5, 0.5), IMAGENET[1])
    _raises("mean", normalize_nchw, good, "abc", IMAGENET[1])
    _raises("mean", normalize_nchw, good, (0.5, float("nan"), 0.5), IMAGENET[1])
    _raises("std", normalize_nchw, good, IMAGENET[0], (0.2, 0.0, 0.2))
    _raises("std", normalize_nchw, good, IMAGENET[0], 0.5)
    _raises("std", normalize_nchw, good, IMAGENET[0], (0.2, 0.2, 0.2, 0.2))
    _raises("out_dtype", normalize_nchw, good, *IMAGENET, out_dtype=torch.int32)
    _raises("backend", normalize_nchw, good, *IMAGENET, backend="numpy")
    _raises("threads", normalize_nchw, good, *IMAGENET, threads=0)


# ------------------------------------------------------------------------------------------------
# CUDA: the PyTorch path runs there; the extension does not.

@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("dtype", FLOATS)
def test_to_uint8_cuda_matches_cpu(dtype):
    x = make_layout(sample_images((2, 3, 33, 45), dtype), "channel_slice")
    got = to_uint8_nhwc(x.cuda())
    assert got.is_cuda and torch.equal(got.cpu(), numpy_to_uint8(x))
    with pytest.raises(UnsupportedError, match="CPU"):
        to_uint8_nhwc(x.cuda(), backend="ext")


@pytest.mark.cuda
@requires_cuda
def test_normalize_cuda_matches_cpu():
    x = sample_pixels((2, 33, 45, 3))
    got = normalize_nchw(x.cuda(), *IMAGENET)
    # CUDA divides by a scalar through its reciprocal: equal to the CPU result within an ulp or so.
    torch.testing.assert_close(got.cpu(), numpy_normalize(x, *IMAGENET, torch.float32), rtol=1e-6, atol=1e-6)
