"""``fastgen generate --image IN --mask MASK``: inpainting from the command line, in-process."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from fastgen.cli.generate import generate
from fastgen.errors import InvalidArgumentError

BASE = ["--backend", "torch", "--device", "cpu", "--steps", "3", "--scheduler", "euler", "--no-progress"]


def _files(tmp_path, size=(80, 48)):
    from PIL import Image, ImageDraw

    width, height = size
    image, mask = tmp_path / "in.png", tmp_path / "mask.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)).save(image)
    drawn = Image.new("L", size, 0)
    ImageDraw.Draw(drawn).rectangle((40, 10, 70, 30), fill=255)
    drawn.save(mask)
    return image, mask


def _run(*args):
    return CliRunner().invoke(generate, [*BASE, *args], catch_exceptions=True)


def test_help_lists_the_inpainting_flags():
    result = CliRunner().invoke(generate, ["--help"])
    assert result.exit_code == 0
    for flag in ("--mask", "--mask-blur", "--padding-mask-crop"):
        assert flag in result.output, flag


@pytest.mark.parametrize("model", ["tiny-inpaint", "tiny"])
def test_inpaint_writes_what_the_library_returns(generator_for, tmp_path, model):
    from PIL import Image

    image, mask = _files(tmp_path)
    out = tmp_path / "out"
    result = _run("--model", model, "--prompt", "a red car", "--image", str(image), "--mask", str(mask),
                  "--strength", "1", "--mask-blur", "2", "--padding-mask-crop", "4", "--seed", "5", "--out", str(out))
    assert result.exit_code == 0, result.output + repr(result.exception)
    data = json.loads((out / "results.json").read_text())
    assert data["mode"] == "inpaint" and data["config"]["padding_mask_crop"] == 4 and data["config"]["mask_blur"] == 2
    png = np.asarray(Image.open(out / data["files"][0]))
    assert png.shape == (48, 80, 3)  # pasted back into the input image
    lib = generator_for(model, "torch").generate("a red car", image=str(image), mask_image=str(mask), strength=1.0,
                                                 mask_blur=2, padding_mask_crop=4, seed=5, steps=3, scheduler="euler",
                                                 output_type="uint8", progress=False)
    diff = np.abs(png.astype(np.int16) - lib.images[0].astype(np.int16))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-2


@pytest.mark.parametrize(("args", "needle"), [
    (["--model", "tiny", "--mask", "MASK"], "pass --image"),
    (["--model", "tiny", "--image", "IMAGE", "--mask", "/nonexistent/mask.png"], "mask_image"),
    (["--model", "tiny", "--image", "IMAGE", "--padding-mask-crop", "3"], "padding-mask-crop"),
    (["--model", "tiny-inpaint", "--image", "IMAGE"], "inpainting UNet"),
    (["--model", "tiny", "--image", "IMAGE", "--mask", "MASK", "--mask-blur", "-1"], "mask-blur"),
])
def test_bad_input_raises_and_writes_nothing(generator_for, tmp_path, args, needle):
    image, mask = _files(tmp_path)
    args = [str(image) if a == "IMAGE" else str(mask) if a == "MASK" else a for a in args]
    out = tmp_path / "out"
    result = _run("--prompt", "x", *args, "--out", str(out))
    assert result.exit_code != 0
    assert isinstance(result.exception, InvalidArgumentError), repr(result.exception)
    assert needle in str(result.exception) and "\n" not in str(result.exception)
    assert not out.exists()
