"""``fastgen generate --lora PATH[:SCALE]`` (repeatable), in-process with click's CliRunner."""

from __future__ import annotations

import json

import lora_files
import numpy as np
import pytest
from click.testing import CliRunner

from fastgen.cli.generate import generate
from fastgen.errors import InvalidArgumentError

BASE = ["--model", "tiny", "--backend", "torch", "--device", "cpu", "--steps", "3", "--scheduler", "euler",
        "--no-progress", "--prompt", "a red car", "--seed", "5"]


@pytest.fixture(scope="module")
def two_files(models_for, lora_dir):
    models = models_for("tiny")
    a = lora_files.save_diffusers_lora(lora_dir / "cli-a", models, rank=4, alpha=4, seed=21)
    b = lora_files.to_kohya(lora_files.save_diffusers_lora(lora_dir / "cli-b", models, rank=2, alpha=2, seed=31),
                            lora_dir / "cli-b.safetensors")
    return a, b


def test_lora_flags_apply_the_adapters(generator_for, two_files, tmp_path):
    from PIL import Image

    a, b = two_files
    out = tmp_path / "out"
    result = CliRunner().invoke(generate, [*BASE, "--lora", f"{a.parent}:0.7", "--lora", str(b), "--out", str(out)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    data = json.loads((out / "results.json").read_text())
    assert data["loras"] == [{"path": str(a.parent), "scale": 0.7}, {"path": str(b), "scale": 1.0}]
    gen = generator_for("tiny", "torch")
    kwargs = {"seed": 5, "steps": 3, "scheduler": "euler", "output_type": "uint8", "progress": False}
    plain = gen.generate("a red car", **kwargs).images[0]
    try:
        gen.load_lora(a.parent, weight=0.7)
        gen.load_lora(b)
        assert gen.active_adapters == {"cli-a": 0.7, "cli-b": 1.0}
        want = gen.generate("a red car", **kwargs).images[0]
    finally:
        gen.unload_lora()
    got = np.asarray(Image.open(out / data["files"][0])).astype(np.int16)
    assert np.abs(got - want.astype(np.int16)).max() <= 1  # two loads of a torch engine may round differently
    assert np.abs(got - plain.astype(np.int16)).max() > 10  # and the LoRAs did change the picture


@pytest.mark.parametrize("flag, needle", [("/nonexistent/style.safetensors", "no such file"),
                                          ("x.safetensors:nan", "finite SCALE")])
def test_bad_lora_flag_fails_before_any_work(tmp_path, flag, needle):
    out = tmp_path / "out"
    result = CliRunner().invoke(generate, [*BASE, "--lora", flag, "--out", str(out)])
    assert isinstance(result.exception, InvalidArgumentError), repr(result.exception)
    assert needle in str(result.exception) and "\n" not in str(result.exception)
    assert not out.exists()
