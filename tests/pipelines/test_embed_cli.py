"""``fastgen score --embed`` (fastgen.cli.score), run in-process with CliRunner: the JSON equals the
library's embeddings, tables print, and bad combinations are one-line errors with exit code 2."""

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
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("embed-inputs")
    rng = np.random.default_rng(0)
    paths = []
    for name, shape in (("a.png", (32, 32, 3)), ("b.jpg", (41, 77, 3))):
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(root / name)
        paths.append(str(root / name))
    return paths


def invoke(*args: str):
    return CliRunner().invoke(score, ["--model", "tiny-embed", "--device", "cpu", "--embed", *args],
                              catch_exceptions=True)


def test_text_json_matches_the_library():
    result = invoke("--text", "buy now", "--text", "a red car on a road", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert (data["component"], data["pooling"], data["normalize"], data["dim"]) == ("text-encoder", "mean", True, 32)
    got = torch.tensor([r["embedding"] for r in data["results"]])
    assert [r["input"] for r in data["results"]] == ["buy now", "a red car on a road"]
    ref = Scorer.from_pretrained("tiny-embed", "text-encoder", device="cpu").embed(["buy now", "a red car on a road"])
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)


def test_images_and_normalize_flag(images):
    result = invoke(*images, "--json", "--normalize")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert (data["component"], data["pooling"], data["normalize"]) == ("image-encoder", "cls", True)
    got = torch.tensor([r["embedding"] for r in data["results"]])
    np.testing.assert_allclose(got.norm(dim=-1).numpy(), 1.0, atol=1e-5)
    ref = Scorer.from_pretrained("tiny-embed", "image-encoder", device="cpu").embed(images, normalize=True)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)


def test_table_output():
    result = invoke("--text", "hello", "--no-normalize")
    assert result.exit_code == 0, result.output
    assert "mean pooling" in result.output and "hello" in result.output and "normalized" not in result.output


@pytest.mark.parametrize(("args", "argument"), [
    (("{a}", "--text", "x"), "--embed"),
    (("--component", "image-encoder", "--text", "x"), "--text"),
    (("--component", "text-encoder", "{a}"), "FILES"),
])
def test_errors_are_one_line_invalid_argument(images, args, argument):
    args = [images[0] if a == "{a}" else a for a in args]
    result = invoke(*args)
    assert result.exit_code != 0
    assert isinstance(result.exception, InvalidArgumentError), result.output
    assert argument in str(result.exception) and "\n" not in str(result.exception)


def test_classifier_is_not_an_encoder():
    result = CliRunner().invoke(score, ["--model", "tiny", "--device", "cpu", "--embed", "--text", "x",
                                        "--component", "text-classifier"])
    assert isinstance(result.exception, InvalidArgumentError) and "not an encoder" in str(result.exception)
