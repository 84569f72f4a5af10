"""``benchmarks/bench_contention.py --quick``: the JSON layout of a run (torch, both scenarios), in seconds.

The figures themselves are docs/benchmarks.md's business: only their shape and consistency are checked
here (a 2-core CI box shared with other jobs measures nothing reliable in a few calls)."""

from __future__ import annotations

import datetime
import json

import bench_contention
import pytest

from fastgen.core import cpus


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("bench-contention")
    out = tmp / "result.json"
    assert bench_contention.main(["--quick", "--backends", "torch", "--cache", str(tmp / "cache"),
                                  "--json", str(out)]) == 0
    assert not list(tmp.glob(".result.json.*"))  # written atomically: no temporary left behind
    return json.loads(out.read_text())


def test_header(quick):
    assert quick["benchmark"] == "contention" and quick["device"].startswith("CPU: ")
    datetime.date.fromisoformat(quick["date"])
    assert {"fastgen", "torch", "onnxruntime", "python"} <= set(quick["versions"])
    assert quick["cpus"]["usable"] == cpus.usable_cpus()
    assert quick["settings"]["quick"] is True and quick["settings"]["busy"] == [0, 1]
    assert "1.5x" in quick["goal"] and isinstance(quick["meets_goal"], bool)


def test_scenarios_side_by_side(quick):
    usable = cpus.usable_cpus()
    assert [s["busy_processes"] for s in quick["scenarios"]] == [0, 1]
    for i, scenario in enumerate(quick["scenarios"]):
        assert set(scenario["load_before"]) == {"loadavg_1min", "others_running", "cpu_pressure_avg10"}
        assert list(scenario["workloads"]) == ["unet"]  # --quick: no generation step
        got = scenario["workloads"]["unet"]["torch"]
        labels = {"default", *(f"threads={n}" for n in range(1, usable + 1))} | ({"default_carried"} if i else set())
        assert set(got["configs"]) == labels
        for label, config in got["configs"].items():
            assert config["min_ms"] <= config["median_ms"] <= config["max_ms"] and len(config["blocks_ms"]) == 1
            assert config["threads"] in range(1, usable + 1), label  # the torch default's timed choice too
        assert got["best"] in labels and got["best"].startswith("threads=")
        best = got["configs"][got["best"]]["median_ms"]
        assert got["default_over_best"] == pytest.approx(got["configs"]["default"]["median_ms"] / best, rel=1e-2)
        assert got["default_over_best"] > 0 and "own_count_over_best" in got
        assert got["meets_goal"] == (got["default_over_best"] <= 1.5)


@pytest.mark.parametrize("argv", [["--backends", "tensorflow"], ["--busy", "-1"], ["--busy", "x"], ["--rounds", "-2"],
                                  ["--block-s", "-1"]])
def test_bad_arguments_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        bench_contention.main(argv)
    assert exit_.value.code == 2 and "error:" in capsys.readouterr().err
