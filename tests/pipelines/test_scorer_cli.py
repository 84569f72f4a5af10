"""The ``score`` click command (fastgen.cli.score), run in-process with CliRunner."""

from __future__ import annotations

import json

import av
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from fastgen.cli.score import score
from fastgen.errors import InvalidArgumentError
from fastgen.pipelines.scorer import Scorer

LABELS = ["clean", "text-heavy", "low-quality", "unsafe"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("score-inputs")
    rng = np.random.default_rng(0)
    paths = {}
    for name, shape in (("a.png", (64, 64, 3)), ("b.jpg", (40, 90, 3))):
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(root / name)
        paths[name] = str(root / name)
    clip = root / "clip.mp4"
    with av.open(str(clip), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(12):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 20 * i, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    paths["clip.mp4"] = str(clip)
    odd = root / "clip.video"  # unknown extension: found by probing (PIL fails, PyAV succeeds)
    odd.write_bytes(clip.read_bytes())
    paths["clip.video"] = str(odd)
    bad = root / "bad.png"
    bad.write_bytes(b"not an image at all")
    paths["bad.png"] = str(bad)
    return paths


def invoke(*args: str):
    return CliRunner().invoke(score, list(args), catch_exceptions=True)


def test_table_output(inputs):
    result = invoke("--model", "tiny", "--device", "cpu", inputs["a.png"], inputs["b.jpg"], inputs["clip.mp4"])
    assert result.exit_code == 0, result.output
    out = result.output
    for name in ("a.png", "b.jpg", "clip.mp4"):
        assert name in out
    assert "video" in out and "image" in out
    assert "mean" in out and "max" in out  # the per-label table of the video
    assert sum(label in out for label in LABELS) == 4


def test_json_matches_the_library(inputs):
    files = [inputs["a.png"], inputs["clip.mp4"], inputs["b.jpg"], inputs["clip.video"]]
    result = invoke("--model", "tiny", "--device", "cpu", "--json", "--frames", "4", "--top", "2", *files)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["component"] == "classifier" and data["backend"] == "onnxruntime" and data["labels"] == LABELS
    rows = data["results"]
    assert [r["input"] for r in rows] == files
    assert [r["kind"] for r in rows] == ["image", "video", "image", "video"]
    scorer = Scorer.from_pretrained("tiny", device="cpu")
    expected = scorer.score_images([inputs["a.png"], inputs["b.jpg"]])
    for row, exp in zip((rows[0], rows[2]), expected):
        np.testing.assert_allclose([row["probs"][k] for k in LABELS], [exp.probs[k] for k in LABELS], atol=1e-6)
        assert len(row["top"]) == 2 and abs(sum(row["probs"].values()) - 1) < 1e-5
    vs = scorer.score_video(inputs["clip.mp4"], frames=4)
    for row in (rows[1], rows[3]):
        assert [f["index"] for f in row["frames"]] == vs.indices == [0, 4, 7, 11]
        np.testing.assert_allclose([row["mean"][k] for k in LABELS], [vs.mean[k] for k in LABELS], atol=1e-6)
        np.testing.assert_allclose([row["max"][k] for k in LABELS], [vs.max[k] for k in LABELS], atol=1e-6)


def test_text_inputs(inputs):
    result = invoke("--model", "tiny", "--device", "cpu", "--json", "--text", "buy now", "--text", "five stars",
                    "--backend", "torch")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["component"] == "text-classifier" and data["backend"] == "torch"
    assert [r["input"] for r in data["results"]] == ["buy now", "five stars"]
    assert all(r["kind"] == "text" and len(r["top"]) == 3 for r in data["results"])
    table = invoke("--model", "tiny", "--device", "cpu", "-c", "text-classifier", "-t", "free shipping")
    assert table.exit_code == 0 and "free shipping" in table.output and "compliant" in table.output


@pytest.mark.parametrize("args, argument", [
    ((), "inputs"),
    (("{missing}",), "missing.png"),
    (("{bad.png}",), "bad.png"),
    (("--component", "classifier", "--text", "hello"), "--text"),
    (("{a.png}", "--text", "hello"), "--text"),
    (("--component", "text-classifier", "{a.png}"), "FILES"),
])
def test_errors_are_one_line_invalid_argument(inputs, tmp_path, args, argument):
    paths = {**inputs, "missing": str(tmp_path / "missing.png")}
    args = [paths[a[1:-1]] if a.startswith("{") else a for a in args]
    result = invoke("--model", "tiny", "--device", "cpu", *args)
    assert result.exit_code != 0
    assert isinstance(result.exception, InvalidArgumentError), result.output
    msg = str(result.exception)
    assert argument in msg and "\n" not in msg


def test_usage_errors_exit_2(inputs):
    result = invoke("--model", "tiny", "--frames", "0", inputs["clip.mp4"])
    assert result.exit_code == 2
    result = invoke(inputs["a.png"])  # no --model
    assert result.exit_code == 2
