"""The ``generate`` click command, in-process (click.testing.CliRunner on the command object)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from fastgen.cli.generate import generate
from fastgen.errors import InvalidArgumentError

BASE = ["--model", "tiny", "--backend", "torch", "--device", "cpu", "--steps", "3", "--scheduler", "euler",
        "--no-progress"]


def _run(*args):
    return CliRunner().invoke(generate, [*BASE, *args], catch_exceptions=True)


def test_help_lists_config_flags():
    result = CliRunner().invoke(generate, ["--help"])
    assert result.exit_code == 0
    for flag in ("--prompt", "-n, --num-images-per-prompt", "--steps", "--guidance-scale", "--scheduler",
                 "--strength", "--seed", "--negative-prompt", "--image", "--candidates", "--keep", "--scorer",
                 "--height", "--width", "--eta", "--out"):
        assert flag in result.output, flag
    assert "euler-ancestral" in result.output and "dpm++" in result.output


def test_writes_pngs_and_results_json(generator_for, tmp_path):
    from PIL import Image

    out = tmp_path / "out"
    result = _run("--prompt", "a red car", "--prompt", "a blue shoe", "-n", "2", "--seed", "7",
                  "--negative-prompt", "blurry", "--out", str(out))
    assert result.exit_code == 0, result.output + repr(result.exception)
    files = ["0_seed7.png", "1_seed8.png", "2_seed7.png", "3_seed8.png"]
    assert sorted(p.name for p in out.iterdir()) == sorted([*files, "results.json"])  # no temp files left
    data = json.loads((out / "results.json").read_text())
    assert data["files"] == files and data["seeds"] == [7, 8, 7, 8]
    assert data["prompts"] == ["a red car"] * 2 + ["a blue shoe"] * 2
    assert data["config"]["negative_prompt"] == "blurry" and data["config"]["steps"] == 3
    assert data["backend"] == "torch" and data["scores"] is None and data["mode"] == "txt2img"
    assert len(data["latencies"]["denoising_step_ms"]) == 3 and data["latencies"]["total_ms"] > 0
    assert [row["file"] for row in data["images"]] == files
    # The PNGs hold what the library returns for the same request, within one uint8 step: two loads
    # of a torch engine may time different thread counts and round differently (docs/reliability.md).
    lib = generator_for("tiny", "torch").generate(["a red car", "a blue shoe"], seed=7, num_images_per_prompt=2,
                                                  negative_prompt="blurry", steps=3, scheduler="euler",
                                                  output_type="uint8", progress=False)
    for name, expected in zip(files, lib.images):
        diff = np.abs(np.asarray(Image.open(out / name)).astype(np.int16) - expected.astype(np.int16))
        assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (name, diff.max(), (diff > 0).mean())
    assert "4 images" in result.output


def test_img2img_flags(tmp_path):
    from PIL import Image

    src = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 80, 3), dtype=np.uint8)).save(src)
    out = tmp_path / "out"
    result = _run("--prompt", "poster", "--image", str(src), "--strength", "0.7", "--seed", "1", "--out", str(out))
    assert result.exit_code == 0, repr(result.exception)
    data = json.loads((out / "results.json").read_text())
    assert data["mode"] == "img2img" and (data["height"], data["width"]) == (48, 80)
    assert np.asarray(Image.open(out / data["files"][0])).shape == (48, 80, 3)


@pytest.mark.parametrize(("args", "needle"), [
    (["--prompt", "x", "--steps", "0"], "steps"),
    (["--prompt", "x", "--strength", "2"], "strength"),
    (["--prompt", "x", "--height", "40"], "multiples of 16"),
    (["--prompt", "x", "--image", "/nonexistent/in.png"], "image"),
    (["--prompt", "x", "--candidates", "3"], "scorer"),
])
def test_bad_input_raises_and_writes_nothing(tmp_path, args, needle):
    out = tmp_path / "out"
    result = _run(*args, "--out", str(out))
    assert result.exit_code != 0
    assert isinstance(result.exception, InvalidArgumentError), repr(result.exception)
    assert needle in str(result.exception) and "\n" not in str(result.exception)
    assert not out.exists()


def test_unknown_scheduler_is_a_usage_error():
    result = _run("--prompt", "x", "--scheduler", "k-lms")
    assert result.exit_code == 2 and "k-lms" in result.output


def test_best_of_n_with_the_real_scorer(tmp_path):
    pytest.importorskip("fastgen.pipelines.scorer")
    out = tmp_path / "out"
    result = _run("--prompt", "ad", "--seed", "3", "--candidates", "3", "--keep", "2", "--scorer", "tiny",
                  "--out", str(out))
    assert result.exit_code == 0, repr(result.exception)
    data = json.loads((out / "results.json").read_text())
    assert len(data["files"]) == 2 and set(data["seeds"]) <= {3, 4, 5}
    assert all(row["scores"] and row["rank_value"] is not None for row in data["images"])
    assert data["images"][0]["rank_value"] >= data["images"][1]["rank_value"]
