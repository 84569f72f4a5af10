"""``fastgen generate --control-image ...``: ControlNet from the command line, in-process."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from fastgen.cli.generate import generate
from fastgen.errors import InvalidArgumentError

BASE = ["--backend", "torch", "--device", "cpu", "--steps", "3", "--scheduler", "euler", "--no-progress"]


def _control(tmp_path, size=(72, 80), name="control.png"):
    """An odd-sized photo-like image (texture and a bright square): Canny finds edges in it."""
    from PIL import Image

    width, height = size
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 60, (height, width, 3), dtype=np.uint8)
    pixels[20:50, 15:45] = 230
    path = tmp_path / name
    Image.fromarray(pixels).save(path)
    return path


def _run(*args):
    return CliRunner().invoke(generate, [*BASE, *args], catch_exceptions=True)


def test_help_lists_the_controlnet_flags():
    result = CliRunner().invoke(generate, ["--help"])
    assert result.exit_code == 0
    for flag in ("--control-image", "--controlnet", "--controlnet-scale", "--control-guidance-start",
                 "--control-guidance-end", "--canny", "--guess-mode"):
        assert flag in result.output, flag


@pytest.mark.parametrize("canny", [False, True])
def test_controlnet_writes_what_the_library_returns(generator_for, tmp_path, canny):
    from PIL import Image

    from fastgen.pipelines.control_images import canny_image

    control = _control(tmp_path)
    out = tmp_path / "out"
    result = _run("--model", "tiny-controlnet", "--prompt", "a red car", "--control-image", str(control),
                  "--controlnet-scale", "0.7", "--control-guidance-start", "0.2", "--control-guidance-end", "0.9",
                  "--height", "64", "--width", "48", "--seed", "5", "--out", str(out), *(["--canny"] if canny else []))
    assert result.exit_code == 0, result.output + repr(result.exception)
    data = json.loads((out / "results.json").read_text())
    assert data["config"]["controlnet_conditioning_scale"] == 0.7 and data["config"]["control_guidance_end"] == 0.9
    assert data["control_images"] == [str(control)] and data["canny"] is canny
    png = np.asarray(Image.open(out / data["files"][0]))
    assert png.shape == (64, 48, 3)
    image = canny_image(str(control)) if canny else str(control)
    lib = generator_for("tiny-controlnet", "torch").generate(
        "a red car", control_image=image, controlnet_conditioning_scale=0.7, control_guidance_start=0.2,
        control_guidance_end=0.9, height=64, width=48, seed=5, steps=3, scheduler="euler", output_type="uint8",
        progress=False)
    assert np.array_equal(png, lib.images[0])


def test_two_controlnets_with_per_net_scales(generator_for, tmp_path):
    """--controlnet twice (the preset's own net and an engine folder), one --control-image and scale per net."""
    import fastgen
    from fastgen.pipelines.generator import Generator

    engine_dir = tmp_path / "net1"
    fastgen.build("tiny-controlnet", component="controlnet", backend="torch", device="cpu", out=engine_dir)
    first, second = _control(tmp_path), _control(tmp_path, (96, 64), "second.png")
    out = tmp_path / "out"
    result = _run("--model", "tiny-controlnet", "--prompt", "a house", "--controlnet", "tiny-controlnet",
                  "--controlnet", str(engine_dir), "--control-image", str(first), "--control-image", str(second),
                  "--controlnet-scale", "0.5", "--controlnet-scale", "1.5", "--height", "64", "--width", "64",
                  "--seed", "2", "--out", str(out))
    assert result.exit_code == 0, result.output + repr(result.exception)
    data = json.loads((out / "results.json").read_text())
    assert data["config"]["controlnet_conditioning_scale"] == [0.5, 1.5]
    assert data["controlnets"] == ["tiny-controlnet", str(engine_dir)]
    base = generator_for("tiny-controlnet", "torch")
    gen = Generator(unet=base.unet, vae_decoder=base.vae_decoder, text_encoder=base.text_encoder,
                    controlnet=[base.controlnets[0], fastgen.load_engine(engine_dir, device="cpu")])
    lib = gen.generate("a house", control_image=[str(first), str(second)], controlnet_conditioning_scale=(0.5, 1.5),
                       height=64, width=64, seed=2, steps=3, scheduler="euler", output_type="uint8", progress=False)
    from PIL import Image

    png = np.asarray(Image.open(out / data["files"][0]))
    assert np.abs(png.astype(np.int16) - lib.images[0].astype(np.int16)).max() <= 1


@pytest.mark.parametrize(("args", "needle"), [
    (["--model", "tiny-controlnet", "--controlnet-scale", "0.5"], "need --control-image"),
    (["--model", "tiny-controlnet", "--canny"], "canny"),
    (["--model", "tiny-controlnet", "--guess-mode"], "guess-mode"),
    (["--model", "tiny-controlnet", "--control-image", "/nonexistent/c.png"], "control-image"),
    (["--model", "tiny", "--control-image", "CONTROL"], "no ControlNet"),
    (["--model", "tiny-controlnet", "--control-image", "CONTROL", "--control-guidance-start", "0.8",
      "--control-guidance-end", "0.3"], "control-guidance-start"),
    (["--model", "tiny-controlnet", "--control-image", "CONTROL", "--control-guidance-end", "1.5"],
     "control-guidance-end"),
    (["--model", "tiny-controlnet", "--control-image", "CONTROL", "--controlnet-scale", "0.5",
      "--controlnet-scale", "0.7"], "one value per ControlNet"),
    (["--model", "tiny-controlnet", "--control-image", "CONTROL", "--control-image", "CONTROL",
      "--control-image", "CONTROL"], "1 image or one per prompt"),
    (["--model", "tiny-controlnet", "--control-image", "CONTROL", "--image", "CONTROL", "--mask", "CONTROL"],
     "inpainting"),
])
def test_bad_input_raises_and_writes_nothing(generator_for, tmp_path, args, needle):
    control = _control(tmp_path)
    args = [str(control) if a == "CONTROL" else a for a in args]
    out = tmp_path / "out"
    result = _run("--prompt", "x", *args, "--out", str(out))
    assert result.exit_code != 0
    assert isinstance(result.exception, (InvalidArgumentError, NotImplementedError)), repr(result.exception)
    assert needle in str(result.exception) and "\n" not in str(result.exception)
    assert not out.exists()


def test_usage_error_exits_2_in_one_line(tmp_path, capsys):
    from fastgen.cli.main import main

    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--model", "tiny-controlnet", "--prompt", "x", "--canny", "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "control-image" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
