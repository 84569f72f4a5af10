"""``benchmarks/bench_video.py --quick``: the JSON layout of a run (a 10 s clip at 64x48, one round).

Figures are not judged here (no timing assertions): only their shape and consistency, and that the three
contenders gave the same frames."""

from __future__ import annotations

import datetime
import json

import bench_video
import pytest


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("bench-video")
    out = tmp / "result.json"
    assert bench_video.main(["--quick", "--json", str(out)]) == 0
    assert not list(tmp.glob(".result.json.*"))  # written atomically
    return json.loads(out.read_text())


def test_layout(quick):
    assert quick["benchmark"] == "video" and quick["device"].startswith("CPU: ") and quick["quick"] is True
    datetime.date.fromisoformat(quick["date"])
    assert quick["command"].startswith("python benchmarks/bench_video.py") and "--quick" in quick["command"]
    assert {"fastgen", "av", "numpy", "python"} <= set(quick["versions"])
    clip = quick["clip"]
    assert (clip["seconds"], clip["fps"], clip["width"], clip["height"], clip["gop"]) == (10.0, 30, 64, 48, 250)
    assert clip["frames"] == 300 and 1 <= clip["keyframes"] < 300
    assert [c["case"] for c in quick["cases"]] == ["8 frames", "1 fps"]
    eight, per_second = quick["cases"]
    assert eight["frames"] == 8 and per_second["frames"] == 10  # 0 s ... 9 s of a 10 s clip
    for case in quick["cases"]:
        assert case["same_frames"] is True
        assert min(case["seek_ms"], case["full_decode_ms"], case["plain_loop_ms"]) > 0
        assert case["full_over_seek"] == pytest.approx(case["full_decode_ms"] / case["seek_ms"])
        assert case["plain_over_seek"] == pytest.approx(case["plain_loop_ms"] / case["seek_ms"])
        assert case["seeks"] >= 1 and case["frames"] <= case["seek_decoded_frames"] <= case["full_decode_decoded_frames"]


@pytest.mark.parametrize("argv", [["--seconds", "0"], ["--rounds", "0"], ["--size", "65x48"], ["--size", "x"],
                                  ["--gop", "0"]])
def test_bad_arguments_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        bench_video.main(argv)
    assert exit_.value.code == 2 and "error:" in capsys.readouterr().err
