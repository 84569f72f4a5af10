"""``fastgen score`` with a two-tower model: the image-text similarity matrix (CliRunner, in-process)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from fastgen.cli.score import score
from fastgen.errors import InvalidArgumentError
from fastgen.pipelines.scorer import Scorer


@pytest.fixture(scope="module")
def pngs(tmp_path_factory):
    root = tmp_path_factory.mktemp("similarity-inputs")
    rng = np.random.default_rng(0)
    paths = []
    for name, shape in (("a.png", (64, 64, 3)), ("b.png", (40, 90, 3))):
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(root / name)
        paths.append(str(root / name))
    return paths


def invoke(*args: str):
    return CliRunner().invoke(score, list(args), catch_exceptions=True)


@pytest.mark.parametrize("preset", ["tiny-clip", "tiny-siglip"])
def test_similarity_matrix_json(pngs, preset):
    texts = ["a red car", "a shoe", "luxury watch on black marble"]
    args = [a for t in texts for a in ("--text", t)]
    result = invoke(preset, "--image", pngs[0], "--image", pngs[1], "--device", "cpu", "--json", *args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["images"] == pngs and data["texts"] == texts and data["family"] == preset.removeprefix("tiny-")
    scorer = Scorer.from_pretrained(preset, device="cpu")
    expected = scorer.similarity(pngs, texts)
    assert np.allclose(data["similarity"], expected.numpy(), rtol=1e-5, atol=1e-7)
    assert np.allclose(data["logits"], scorer.similarity(pngs, texts, logits=True).numpy(), rtol=1e-5, atol=1e-6)
    if preset == "tiny-siglip":
        assert np.allclose(data["similarity"], torch.sigmoid(torch.tensor(data["logits"])).numpy(), rtol=1e-5)


def test_similarity_table_and_model_option(pngs):
    result = invoke("--model", "tiny-clip", "--device", "cpu", pngs[0], "-t", "a red car", "-t", "a shoe")
    assert result.exit_code == 0, result.output
    assert "a red car" in result.output and "a shoe" in result.output and "a.png" in result.output


def test_similarity_errors(pngs):
    for args, needle in ((["tiny-clip", pngs[0]], "--text"),
                         (["tiny-clip", "--text", "a shoe"], "component")):
        result = invoke(*args, "--device", "cpu")
        assert isinstance(result.exception, InvalidArgumentError), result.output
        assert needle in str(result.exception) and "\n" not in str(result.exception)
    assert invoke(pngs[0], "--text", "a shoe").exit_code == 2  # an image file is not a model: --model is missing
