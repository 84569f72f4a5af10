"""Condition images for ControlNets: Canny edges against cv2.Canny (live when OpenCV is installed, else its
recorded output) and hand-checked images; given maps and batching against diffusers' ControlNet pipeline."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from fastgen.errors import InvalidArgumentError
from fastgen.pipelines.control_images import canny, canny_image, control_batch, control_pixels, control_size

try:
    import cv2
except ImportError:  # the default: fastgen needs no OpenCV
    cv2 = None

# cv2.Canny (OpenCV 5.1.0) of _synthetic(), as np.packbits(edges.ravel() > 0).hex().
RECORDED = {
    (100, 200): "2004a7f000584110050002fc20184871e0844461c6444c060a848c2022884202c50210209079020904b21f1002312081a4824c0"
                "6792b70c99240f09b82009ca9e8082690788c",
    (30, 90): "24a4a7f803584110050002fc201a4871e0844461c6444c060a848c2322884a02c52213209379020954b29f1202312091a4824c06"
              "792b70c99240f09b82209ca9e80836d178ac",
}
RECORDED_GRAY_60_160 = ("6f006812100a4110007212fca4c2406662d40490804071484a04146420804842c705032088484208c64a1f04849000cc400"
                        "341a580291055028c7d3014205c011c3d7016391a")


def _synthetic() -> np.ndarray:
    """20 x 28 RGB: a disc in red, a rectangle in green, a ramp in blue, seeded noise on all."""
    h, w = 20, 28
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.zeros((h, w, 3), np.int32)
    img[..., 0] = np.where((yy - 10) ** 2 + (xx - 17) ** 2 <= 36, 220, 30)
    img[..., 1] = np.where((yy >= 3) & (yy < 12) & (xx >= 2) & (xx < 9), 180, 40)
    img[..., 2] = xx * 9
    noise = np.random.default_rng(7).integers(-25, 26, (h, w, 3))
    return np.clip(img + noise, 0, 255).astype(np.uint8)


def _unpacked(hex_bits: str, shape) -> np.ndarray:
    bits = np.unpackbits(np.frombuffer(bytes.fromhex(hex_bits), dtype=np.uint8))[:shape[0] * shape[1]]
    return bits.reshape(shape).astype(np.uint8) * 255


@pytest.mark.parametrize("thresholds", list(RECORDED))
def test_canny_equals_opencvs_recorded_output(thresholds):
    img = _synthetic()
    got = canny(img, *thresholds)
    assert got.dtype == np.uint8 and got.shape == img.shape[:2] and set(np.unique(got)) <= {0, 255}
    np.testing.assert_array_equal(got, _unpacked(RECORDED[thresholds], img.shape[:2]))
    np.testing.assert_array_equal(canny(_synthetic()[..., 1], 60, 160), _unpacked(RECORDED_GRAY_60_160, (20, 28)))


@pytest.mark.skipif(cv2 is None, reason="OpenCV not installed (the recorded outputs above still compare)")
@pytest.mark.parametrize("shape", [(17, 23), (64, 48, 3), (96, 130, 3)])
@pytest.mark.parametrize("thresholds", [(100, 200), (20.5, 80.9), (150, 50)])
def test_canny_equals_live_opencv(shape, thresholds):
    rng = np.random.default_rng(sum(shape))
    coarse = rng.integers(0, 256, (shape[0] // 6 + 2, shape[1] // 6 + 2, *shape[2:])).astype(np.uint8)
    img = cv2.resize(coarse, (shape[1], shape[0]), interpolation=cv2.INTER_CUBIC)
    np.testing.assert_array_equal(canny(img, *thresholds), cv2.Canny(img, *thresholds))


def test_canny_on_hand_checked_steps():
    # A vertical step at column 10: |dx| + |dy| = 4 * contrast on columns 9 and 10; of a two-pixel
    # plateau the first (left) one is the maximum, in every row (replicated borders: no dy at the top).
    step = np.zeros((12, 20), np.uint8)
    step[:, 10:] = 255
    want = np.zeros((12, 20), np.uint8)
    want[:, 9] = 255
    np.testing.assert_array_equal(canny(step), want)
    np.testing.assert_array_equal(canny(step.T.copy()), want.T)  # horizontal step: row 9
    # Hysteresis: contrast 60 (magnitude 240, strong) in the top rows continues into contrast 30
    # (120, weak) below; a weak-only corner (rows 8+, columns 15+) is not connected to anything strong.
    mixed = np.zeros((12, 20), np.uint8)
    mixed[:4, 5:] = 60
    mixed[4:, 5:] = 30
    mixed[8:, 15:] += 30
    edges = canny(mixed)
    # Rows 0-2 strong, rows 5-11 weak, kept because the corner at rows 3-4 (column 5) joins them.
    assert edges[:3, 4].all() and edges[3:5, 5].all() and edges[5:, 4].all()
    assert not edges[6:, 10:].any() and edges[3, 10:].all()  # (row 3: the weak 60/30 edge, joined on the left)
    mixed[:4, 5:] = 30  # no strong part left: nothing survives
    assert not canny(mixed).any()
    assert not canny(np.full((8, 8), 77, np.uint8)).any()
    # Below the low threshold: contrast 20 (magnitude 80 < 100) leaves nothing; a threshold of 79 finds it.
    faint = np.zeros((8, 8), np.uint8)
    faint[:, 4:] = 20
    assert not canny(faint).any() and canny(faint, 79, 79)[:, 3].all()
    # The strongest of the colour channels decides (cv2.Canny on RGB does the same).
    rgb = np.zeros((12, 20, 3), np.uint8)
    rgb[:, 10:, 2] = 255
    np.testing.assert_array_equal(canny(rgb), want)


def test_canny_image_is_white_edges_on_black_rgb(tmp_path):
    path = tmp_path / "in.png"
    Image.fromarray(_synthetic()).save(path)
    out = canny_image(path)
    assert out.mode == "RGB" and out.size == (28, 20)
    arr = np.asarray(out)
    np.testing.assert_array_equal(arr[..., 0], _unpacked(RECORDED[(100, 200)], (20, 28)))
    assert (arr == arr[..., :1]).all()


@pytest.mark.parametrize("bad", [{"low_threshold": -1}, {"high_threshold": float("inf")}, {"low_threshold": True}])
def test_canny_refuses_bad_arguments_in_one_line(bad):
    with pytest.raises(InvalidArgumentError, match="threshold") as info:
        canny(_synthetic(), **bad)
    assert "\n" not in str(info.value)
    with pytest.raises(InvalidArgumentError, match="pixels"):
        canny(_synthetic().astype(np.float32))
    with pytest.raises(InvalidArgumentError, match="pixels"):
        canny(np.zeros((0, 4), np.uint8))


def _diffusers_processor():
    from diffusers.image_processor import VaeImageProcessor

    # What StableDiffusionControlNetPipeline builds as its control_image_processor.
    return VaeImageProcessor(vae_scale_factor=8, do_convert_rgb=True, do_normalize=False)


def _maps():
    rng = np.random.default_rng(3)
    depth = Image.fromarray(rng.integers(0, 256, (50, 70), dtype=np.uint8), "L")  # grayscale depth map
    pose = Image.fromarray(rng.integers(0, 256, (64, 40, 4), dtype=np.uint8), "RGBA")
    return depth, pose, Image.fromarray(_synthetic())


@pytest.mark.parametrize(("height", "width"), [(32, 48), (70, 41), (64, 64)])
def test_control_pixels_match_diffusers_control_image_processor(height, width):
    maps = _maps()
    got = control_pixels(list(maps), height, width)
    want = _diffusers_processor().preprocess(list(maps), height=height, width=width).to(torch.float32)
    assert got.shape == want.shape == (3, 3, height // 8 * 8, width // 8 * 8)
    assert got.dtype == torch.float32 and 0 <= float(got.min()) and float(got.max()) <= 1
    torch.testing.assert_close(got, want, rtol=0, atol=1e-7)  # [0, 1]: no [-1, 1] normalisation
    arr = np.asarray(maps[2].resize((width // 8 * 8, height // 8 * 8), Image.LANCZOS), dtype=np.uint8)
    torch.testing.assert_close(control_pixels(arr, height, width)[0], want[2], rtol=0, atol=1e-7)


@pytest.mark.parametrize(("images", "prompts", "per_prompt"), [(1, 3, 2), (2, 2, 3), (1, 1, 1)])
@pytest.mark.parametrize(("guidance", "guess_mode"), [(True, False), (True, True), (False, False)])
def test_control_batch_matches_diffusers_prepare_image(images, prompts, per_prompt, guidance, guess_mode):
    from diffusers import StableDiffusionControlNetPipeline

    maps = list(_maps())[:images]
    pixels = control_pixels(maps, 32, 40)
    got = control_batch(pixels, prompts * per_prompt, per_prompt, guidance=guidance, guess_mode=guess_mode)
    fake = SimpleNamespace(control_image_processor=_diffusers_processor())
    want = StableDiffusionControlNetPipeline.prepare_image(
        fake, image=maps, width=40, height=32, batch_size=prompts * per_prompt, num_images_per_prompt=per_prompt,
        device="cpu", dtype=torch.float32, do_classifier_free_guidance=guidance, guess_mode=guess_mode)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-7)


def test_control_arguments_are_refused_in_one_line():
    with pytest.raises(InvalidArgumentError, match="height"):
        control_size(7, 64)
    with pytest.raises(InvalidArgumentError, match="control-image"):
        control_pixels([], 64, 64)
    with pytest.raises(InvalidArgumentError, match="control-image"):
        control_batch(torch.zeros(2, 3, 8, 8), 3, 1)
    with pytest.raises(InvalidArgumentError, match="image"):
        control_pixels(np.zeros((8, 8), np.float32), 64, 64)
