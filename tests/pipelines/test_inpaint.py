"""fastgen.pipelines.inpaint: the 9-channel UNet presets export and verify; mask processing, crop
box, fit and paste-back equal diffusers' VaeImageProcessor's over odd sizes; errors are one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastgen.errors import InvalidArgumentError
from fastgen.pipelines import inpaint
from fastgen.pipelines.config import GenerateConfig


def _image(width, height, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def _mask(width, height, box, fill=255):
    from PIL import Image, ImageDraw

    mask = Image.new("L", (width, height), 0)
    ImageDraw.Draw(mask).rectangle(box, fill=fill)
    return mask


@pytest.fixture(scope="module")
def processor():
    from diffusers.image_processor import VaeImageProcessor

    return VaeImageProcessor(vae_scale_factor=8, do_normalize=False, do_binarize=True, do_convert_grayscale=True)


# --- presets and export -----------------------------------------------------------------------------

@pytest.mark.parametrize(("preset", "base"), [("tiny-inpaint", "tiny"), ("tiny-sdxl-inpaint", "tiny-sdxl")])
def test_inpaint_presets_export_and_verify(tmp_path, preset, base):
    """9 input channels, the rest of the UNet and every other component the base preset's; the
    ONNX export verifies against the module at min, opt and max shapes."""
    from fastgen.export import export
    from fastgen.models import load_component, model_components, preset_config

    generation = ("unet", "vae-decoder", "vae-encoder", "text-encoder", "text-encoder-2")
    assert model_components(preset) == [c for c in model_components(base) if c in generation]
    _, cls, config = preset_config(preset, "unet")
    assert config == {**preset_config(base, "unet")[2], "in_channels": 9} and cls == "UNet2DConditionModel"
    assert all(preset_config(preset, c) == preset_config(base, c) for c in model_components(preset) if c != "unet")
    # A narrower profile than the preset's (max batch 8 at 128x128) keeps the three verifications short.
    comp = load_component(preset, "unet", profile="batch=1:2:3,height=32:64:96,width=32:64:96")
    assert comp.spec.inputs[0].shape[1] == 9 and comp.spec.outputs[0].shape[1] == 4
    assert comp.metadata.pipeline == load_component(base, "unet").metadata.pipeline
    result = export(comp, tmp_path / "unet")
    assert [v["shape"] for v in result.verification] == [comp.spec.profile.shape(w) for w in ("min", "opt", "max")]
    for v in result.verification:
        for stats in v["outputs"].values():
            assert stats["cosine"] > 0.9999 and stats["max_rel"] < 1e-3


# --- processing against diffusers -------------------------------------------------------------------

CROPS = [  # (image width, height, mask box, output width, height, pad)
    (96, 80, (58, 10, 80, 30), 64, 64, 6),  # wider box than tall after padding
    (96, 80, (5, 5, 12, 70), 64, 64, 0),  # tall box at the left edge
    (97, 61, (90, 50, 96, 60), 64, 32, 9),  # bottom-right corner, odd sizes, wide output
    (50, 90, (0, 0, 49, 89), 32, 64, 3),  # the whole image
    (64, 64, (30, 30, 30, 30), 64, 64, 0),  # one pixel
    (33, 71, (10, 20, 25, 22), 40, 48, 100),  # padding past every edge
]


@pytest.mark.parametrize(("iw", "ih", "box", "w", "h", "pad"), CROPS)
def test_crop_region_matches_diffusers(processor, iw, ih, box, w, h, pad):
    mask = _mask(iw, ih, box)
    assert inpaint.crop_region(mask, w, h, pad) == processor.get_crop_region(mask, w, h, pad=pad)


@pytest.mark.parametrize(("iw", "ih", "box", "w", "h", "pad"), CROPS)
@pytest.mark.parametrize("blur", [0, 2.5])
@pytest.mark.parametrize("crop", [False, True])
def test_processed_mask_and_image_match_diffusers(processor, iw, ih, box, w, h, pad, blur, crop):
    """Binarized mask and [-1, 1] pixels as diffusers' mask and image processors make them."""
    from diffusers.image_processor import VaeImageProcessor

    image, mask = _image(iw, ih), _mask(iw, ih, box, fill=180)
    ref_mask = processor.blur(mask, blur) if blur else mask
    coords = processor.get_crop_region(ref_mask, w, h, pad=pad) if crop else None
    mode = "fill" if crop else "default"
    cfg = GenerateConfig(mask_blur=blur, padding_mask_crop=pad if crop else None)
    source = inpaint.prepare_source(image, mask, h, w, cfg)
    assert source.crop == coords
    expected_mask = processor.preprocess(ref_mask, height=h, width=w, resize_mode=mode, crops_coords=coords)
    torch.testing.assert_close(source.mask, expected_mask, atol=0, rtol=0)
    expected = VaeImageProcessor(vae_scale_factor=8).preprocess(image, height=h, width=w, resize_mode=mode,
                                                                crops_coords=coords)
    torch.testing.assert_close(source.pixels, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(source.masked_pixels, expected * (expected_mask < 0.5), atol=1e-6, rtol=0)


@pytest.mark.parametrize(("iw", "ih", "box", "w", "h", "pad"), CROPS)
def test_paste_back_matches_apply_overlay(processor, iw, ih, box, w, h, pad):
    from diffusers.image_processor import VaeImageProcessor

    image, mask = _image(iw, ih, 1), _mask(iw, ih, box, fill=200)
    generated = _image(w, h, 2)
    source = inpaint.prepare_source(image, mask, h, w, GenerateConfig(mask_blur=1.5, padding_mask_crop=pad))
    expected = VaeImageProcessor().apply_overlay(processor.blur(mask, 1.5), image, generated, source.crop)
    assert np.array_equal(np.asarray(inpaint.paste_back(source, generated)), np.asarray(expected))


@pytest.mark.parametrize("kind", ["L", "RGB", "RGBA", "array2", "array1", "array3", "array4", "path"])
def test_mask_inputs(tmp_path, kind):
    from PIL import Image

    gray = np.zeros((9, 7), np.uint8)
    gray[2:5, 1:4] = 255
    rgb = np.repeat(gray[..., None], 3, axis=2)
    items = {"L": Image.fromarray(gray, "L"), "RGB": Image.fromarray(rgb, "RGB"),
             "RGBA": Image.fromarray(np.dstack([rgb, np.full_like(gray, 255)]), "RGBA"),
             "array2": gray, "array1": gray[..., None], "array3": rgb, "array4": np.dstack([rgb, gray])}
    if kind == "path":
        Image.fromarray(gray, "L").save(tmp_path / "m.png")
        item = tmp_path / "m.png"
    else:
        item = items[kind]
    mask = inpaint.load_mask(item)
    assert mask.mode == "L" and np.array_equal(np.asarray(mask), gray)


# --- errors --------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("item", "needle"), [
    (np.zeros((4, 4), np.float32), "mask_image"),
    (np.zeros((4, 4, 2), np.uint8), "mask_image"),
    (np.zeros((0, 4), np.uint8), "mask_image"),
    (3, "mask_image"),
])
def test_bad_masks_are_one_line_errors(item, needle):
    with pytest.raises(InvalidArgumentError, match=needle) as info:
        inpaint.load_mask(item)
    assert "\n" not in str(info.value)


def test_mask_size_and_empty_crop_errors():
    image = _image(32, 32)
    with pytest.raises(InvalidArgumentError, match="mask_image.*input image's size"):
        inpaint.prepare_source(image, _mask(16, 32, (1, 1, 5, 5)), 32, 32, GenerateConfig())
    with pytest.raises(InvalidArgumentError, match="all-black"):
        inpaint.prepare_source(image, _mask(32, 32, (0, 0, 0, 0), fill=0), 32, 32,
                               GenerateConfig(padding_mask_crop=4))
    # Without cropping an all-black mask is valid: nothing is regenerated.
    source = inpaint.prepare_source(image, _mask(32, 32, (0, 0, 0, 0), fill=0), 32, 32, GenerateConfig())
    assert float(source.mask.sum()) == 0


@pytest.mark.parametrize(("field", "value"), [
    ("mask_blur", -1), ("mask_blur", float("nan")), ("mask_blur", True), ("mask_blur", 1e9),
    ("padding_mask_crop", -1), ("padding_mask_crop", 2.5), ("padding_mask_crop", True),
])
def test_config_validation(field, value):
    with pytest.raises(InvalidArgumentError, match=field.replace("_", "-")) as info:
        GenerateConfig(**{field: value})
    assert "\n" not in str(info.value)


def test_config_round_trip():
    cfg = GenerateConfig(mask_blur=np.float32(2), padding_mask_crop=np.int64(8))
    assert type(cfg.mask_blur) is float and type(cfg.padding_mask_crop) is int
    assert GenerateConfig.from_dict(cfg.to_dict()) == cfg
