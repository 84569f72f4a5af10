"""``benchmarks/bench_pipeline_dit.py`` on the tiny DiT presets: the JSON layout, and fastgen's images equal
diffusers' (the two sides share the modules; diffusers runs them with their own attention processors).
Figures are not judged (no timing assertions)."""

from __future__ import annotations

import datetime
import json

import bench_pipeline_dit
import pytest


@pytest.mark.parametrize("preset, pipeline", [("tiny-flux", "flux"), ("tiny-sd3", "sd3"), ("tiny-pixart", "pixart")])
def test_layout_and_parity(tmp_path, preset, pipeline, capsys):
    out = tmp_path / "result.json"
    assert bench_pipeline_dit.main(["--preset", preset, "--steps", "2", "--iters", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["benchmark"] == "pipeline_dit" and result["pipeline"] == pipeline
    assert result["device"].startswith("CPU: ") and result["height"] == 64
    datetime.date.fromisoformat(result["date"])
    assert {"fastgen", "torch", "diffusers"} <= set(result["versions"])
    ours, theirs = result["results"]["torch"], result["results"]["diffusers"]
    assert ours["psnr_vs_diffusers_db"] >= 100
    assert ours["speedup_vs_diffusers"] == pytest.approx(theirs["total_ms"] / ours["total_ms"])
    assert theirs["transformer_step_ms"] > 0 and ours["transformer_step_ms"] > 0
    assert "x), PSNR" in capsys.readouterr().out


def test_bad_arguments_exit_2():
    with pytest.raises(SystemExit) as exit_:
        bench_pipeline_dit.main(["--steps", "0"])
    assert exit_.value.code == 2
