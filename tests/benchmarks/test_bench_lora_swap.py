"""``benchmarks/bench_lora_swap.py --quick``: the JSON layout of a run (tiny UNet, both backends).

Figures are not judged here (no timing assertions): only their shape and consistency."""

from __future__ import annotations

import datetime
import json

import bench_lora_swap
import pytest


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("bench-lora")
    out = tmp / "result.json"
    assert bench_lora_swap.main(["--quick", "--json", str(out)]) == 0
    assert not list(tmp.glob(".result.json.*"))  # written atomically
    return json.loads(out.read_text())


def test_layout(quick, capsys):
    assert quick["benchmark"] == "lora_swap" and quick["device"].startswith("CPU: ") and quick["preset"] == "tiny"
    datetime.date.fromisoformat(quick["date"])
    assert {"fastgen", "torch", "onnxruntime", "python"} <= set(quick["versions"])
    assert [b["backend"] for b in quick["backends"]] == ["torch", "onnxruntime"]
    for per in quick["backends"]:
        (row,) = per["rows"]
        assert row["rank"] == 4 and row["lora_layers"] == 32 and row["swaps"] == 3  # tiny: 8 attentions x 4
        assert 0 < row["swap_ms_median"] <= row["swap_ms_max"]
        assert row["rebuild_over_swap"] == pytest.approx(row["rebuild_s"] * 1e3 / row["swap_ms_median"])
        assert row["meets_goal"] == (row["rebuild_over_swap"] >= 20)
    assert quick["meets_goal"] == all(r["meets_goal"] for b in quick["backends"] for r in b["rows"])


@pytest.mark.parametrize("argv", [["--backends", "tensorflow"], ["--ranks", "0"], ["--ranks", "x"], ["--swaps", "0"]])
def test_bad_arguments_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        bench_lora_swap.main(argv)
    assert exit_.value.code == 2 and "error:" in capsys.readouterr().err
