"""``fastgen score`` with a detector: ``--conf`` / ``--iou`` reach every input, videos included."""

from __future__ import annotations

import json
from types import SimpleNamespace

from click.testing import CliRunner

from fastgen.cli.score import score as score_cli
from fastgen.pipelines.scorer import Scorer


class FakeDetector:
    """What the command reads of a detector; ``score_video`` records the thresholds it would score at
    (a real detector's frames go through ``detection_logits``, which reads these attributes)."""

    task, kind, labels = "detect", "image", ["car"]
    engine = SimpleNamespace(spec=SimpleNamespace(component="detector"), backend="onnxruntime", device="cpu",
                             precision="fp32")

    def __init__(self) -> None:
        self.conf, self.iou = 0.25, 0.45
        self.seen: list[tuple[float, float]] = []

    def __enter__(self) -> FakeDetector:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def score_video(self, video, *, frames=None, fps=None):
        self.seen.append((self.conf, self.iou))
        return SimpleNamespace(to_dict=lambda: {"probs": {"car": 0.5}, "top": [{"label": "car", "prob": 0.5}]})


def test_video_only_detector_run_uses_the_thresholds_given(tmp_path, monkeypatch):
    model, video = tmp_path / "det.onnx", tmp_path / "clip.mp4"  # a video by its extension, never decoded here
    model.write_bytes(b"")
    video.write_bytes(b"")
    detector = FakeDetector()
    monkeypatch.setattr(Scorer, "from_pretrained", lambda *a, **k: detector)
    result = CliRunner().invoke(score_cli, ["-m", str(model), str(video), "--json", "--conf", "0.6", "--iou", "0.3"])
    assert result.exit_code == 0, result.output
    assert detector.seen == [(0.6, 0.3)]  # not the detector's defaults: no image was given alongside
    assert json.loads(result.output)["results"][0]["kind"] == "video"
